"""The ``vq`` stage objective: a VQ image tokenizer (family ``vq``, models/vq.py) learns to reconstruct images
through its codebook.

Data: the distinct images of the recipe's ``data.train`` image-caption files (ShapesWorld's ``pairs_train.csv``:
its ``image`` column; the captions are not read beyond the file's check), prepared by the model's processor
(resized, normalised to [-1, 1]); validation on the first ``data.val_samples`` distinct images of ``data.val``.

The model's interface for it: ``model(pixels [n, 3, H, W])`` returns an output with ``loss`` (reconstruction +
commitment + codebook), ``reconstruction`` (normalised pixels) and ``codes`` [n, h, w], and ``metrics()`` (the
reconstruction, commitment and codebook losses, the batch's codebook usage and perplexity), all logged per step,
with the batch's PSNR. Validation logs ``val_loss``, ``val_recon_loss``, ``val_psnr`` (dB, on de-normalised pixels
clamped to [0, 1]), ``val_codebook_usage`` (the fraction of the codebook the validation images use) and
``val_perplexity``.

A VQ stage runs on one process (``distributed = False``): under torchrun every rank runs the same steps, since
the EMA codebook and dead-code restarts are updated from each forward's own batch (all-reducing them is not done).
"""

from __future__ import annotations

import math
import os

import torch

from vlmkit.errors import ConfigError
from vlmkit.objectives import Objective, StepResult, register
from vlmkit.objectives.contrastive import load_pairs
from vlmkit.train.precision import autocast
from vlmkit.train.stream import BatchStream


def psnr(reconstruction: torch.Tensor, target: torch.Tensor, mean, std) -> torch.Tensor:
    """Per-image PSNR (dB) of images in a processor's normalisation (``mean``, ``std``), de-normalised to [0, 1]
    and clamped there."""
    m = torch.tensor(mean, device=target.device, dtype=target.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=target.device, dtype=target.dtype).view(1, -1, 1, 1)
    a, b = (reconstruction.detach() * s + m).clamp(0, 1), (target * s + m).clamp(0, 1)
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def distinct_images(pairs) -> list:
    """The image paths of ``pairs``, each once, in order."""
    return list(dict.fromkeys(p.image for p in pairs))


@torch.no_grad()
def validate(model, processor, images: list, batch_size: int) -> dict[str, float]:
    """Held-out reconstruction of ``images`` (module docstring), the model in eval mode (no codebook update)."""
    training = model.training
    model.eval()
    losses, recons, psnrs, codes = [], [], [], []
    for start in range(0, len(images), batch_size):
        pixels = processor.prepare_images(images[start:start + batch_size], "data.val").pixel_values
        out = model(pixels.to(next(model.parameters()).device))
        losses.append(float(out.loss) * len(pixels))
        recons.append(float(out.recon_loss) * len(pixels))
        psnrs.append(psnr(out.reconstruction, pixels, processor.cfg.mean, processor.cfg.std).cpu())
        codes.append(out.codes.flatten().cpu())
    model.train(training)
    codes = torch.cat(codes)
    counts = torch.bincount(codes, minlength=model.codebook_size).float()
    p = counts / counts.sum()
    perplexity = math.exp(float(-(p * torch.log(p.clamp_min(1e-10))).sum()))
    n = len(images)
    return {"val_loss": sum(losses) / n, "val_recon_loss": sum(recons) / n, "val_psnr": float(torch.cat(psnrs).mean()),
            "val_codebook_usage": float((counts > 0).float().mean()), "val_perplexity": perplexity}


@register
class VQObjective(Objective):
    """a VQ image tokenizer's reconstruction + commitment loss on images (codebook usage, perplexity, PSNR)"""

    name = "vq"
    distributed = False

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("a vq stage trains on one process: its EMA codebook and dead-code restarts are updated "
                              "from each forward's own batch, and are not all-reduced across ranks; run it without "
                              "torchrun")
        if recipe.train.grad_accum != 1:
            raise ConfigError(f"train.grad_accum {recipe.train.grad_accum}: a vq stage updates its codebook on every "
                              f"forward; set grad_accum: 1 and the batch you want as train.batch_size")

    def __init__(self, run):
        super().__init__(run)
        pairs, val_pairs, self.report = load_pairs(run.recipe, run.log)
        self.images = distinct_images(pairs)
        self.val_images = distinct_images(val_pairs)[:run.recipe.data.val_samples]
        self.last: dict[str, float] = {}

    def bind(self, model, processor) -> None:
        self.processor = processor
        recipe = self.run.recipe
        if recipe.train.batch_size > len(self.images):
            raise ConfigError(f"train.batch_size {recipe.train.batch_size} is larger than the {len(self.images)} "
                              f"training images")
        position = self.run.state.get("stream_position", 0) if self.run.state else 0
        self.stream = BatchStream(len(self.images), recipe.train.batch_size, recipe.train.seed, position)

    def describe(self) -> str:
        return f"{len(self.images)} training images, {len(self.val_images)} validation images"

    def first_rows(self) -> list[dict]:
        return [{"event": "data", "step": 0, "images": len(self.images), "val_images": len(self.val_images),
                 "skipped_rows": self.report.skipped}]

    def step(self, net, model) -> StepResult:
        idx = self.stream.next()
        pixels = self.processor.prepare_images([self.images[i] for i in idx], "data.train").pixel_values
        pixels = pixels.to(next(model.parameters()).device)
        with autocast(self.run.recipe.train.precision):
            out = net(pixels)
        out.loss.backward()
        cfg = self.processor.cfg
        self.last = {**out.metrics(), "psnr": float(psnr(out.reconstruction.float(), pixels, cfg.mean, cfg.std).mean())}
        return StepResult(float(out.loss.detach()), samples=len(idx), metrics=self.last)

    def row(self, result: StepResult) -> dict:
        run = self.run
        return {**result.metrics, "samples_per_second": run.samples / max(run.elapsed, 1e-9), "elapsed": run.elapsed}

    def postfix(self, result: StepResult) -> dict:
        m = result.metrics
        return {"psnr": f"{m['psnr']:.1f}", "usage": f"{m['codebook_usage']:.2f}"}

    def validate(self, model, last: bool) -> dict[str, float]:
        if not self.val_images:
            return {}
        return validate(model, self.processor, self.val_images, self.run.recipe.train.batch_size)

    def state(self) -> dict:
        return {"stream_position": self.stream.position}


__all__ = ["VQObjective", "distinct_images", "psnr", "validate"]

