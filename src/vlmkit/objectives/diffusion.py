"""The ``diffusion`` stage objective: a latent-diffusion model (family ``ldm``, models/ldm.py) learns the
rectified-flow velocity of its frozen VAE's latents given its frozen text encoder's states.

Data: the stage's ``pairs`` file (text-to-image pairs, ``t2i_pairs_train.csv`` from ``vlmkit data shapes --t2i N``,
read with data.pairs.read_pairs) under ``data.path``; validation on the first ``data.val_samples`` pairs of the
``_val`` file beside it (``t2i_pairs_val.csv``), when there is one.

Computed once, when the stage binds (both parts are frozen, so the values are fixed for the whole run):

- each image's latents: the VAE posterior's **mean** times its scaling factor (``encode_latents``), not a sample.
  The mean is what the VAE's own evaluation decodes and what it was measured on; tiny-vae's posterior standard
  deviation is about 0.4 in scaled units (models/vae.py), so a posterior sample per step would add noise of 40% of
  the signal's scale to every target, which the DiT would have to model as image content;
- each caption's text states, mask and pooled vector (``LDMModel.encode_text``), kept for the run (about
  ``pairs x longest caption x text width`` floats: 8000 x 20 x 128 x 4 B = 82 MB at tiny-clip's width), so a step
  runs the DiT alone.

Each step: the next batch of a seeded, resumable stream over the pairs (train.stream.BatchStream), and, from a
generator seeded by (``train.seed``, the global step) alone (:func:`draws`), the timesteps (``sample_timesteps``:
``model.timesteps``, SD3's logit-normal by default), the noise and the condition dropout (each sample's text
replaced by "no text", an all-padding mask and a zero pooled vector, with probability ``cond_dropout``; what
classifier-free guidance compares with). A resumed run draws exactly what an uninterrupted one does.

Validation: the mean flow loss on the held-out pairs at timesteps and noise drawn once from a fixed seed, the
conditional text always, so every evaluation measures the same thing (``val_loss``).

A diffusion stage runs on one process (``distributed = False``: every rank would run the same steps) with
``grad_accum: 1`` and trains the DiT alone (``train: [generation]``, the model's group of it).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from vlmkit.diffusion.flow import sample_timesteps
from vlmkit.errors import ConfigError
from vlmkit.objectives import Objective, StepResult, register
from vlmkit.objectives.unified import check_pair_stages, read_stage_pairs
from vlmkit.train.precision import autocast
from vlmkit.train.stream import BatchStream


class EncodedPairs:
    """Pairs as the frozen parts see them: latents [N, C, h, w], text states [N, S, D], mask [N, S], pooled
    [N, E] (module docstring)."""

    def __init__(self, pairs, processor, model, where: str, progress: bool = False, batch_size: int = 64):
        from tqdm.auto import tqdm

        from vlmkit.families.ldm import text_batch

        device = next(model.parameters()).device
        paths = list(dict.fromkeys(p.image for p in pairs))
        latents: dict[Path, torch.Tensor] = {}
        for start in tqdm(range(0, len(paths), batch_size), desc="latents", unit="batch", disable=not progress,
                          dynamic_ncols=True):
            chunk = paths[start:start + batch_size]
            media = processor.prepare_images(chunk, where).to(device)
            latents.update(zip(chunk, model.encode_latents(media.pixel_values).cpu()))
        self.latents = torch.stack([latents[p.image] for p in pairs])
        ids = text_batch([processor.image_prompt(p.caption, model.image_grid, where=p.source or where)
                          for p in pairs], model.cfg.pad_token_id)
        parts = [model.encode_text(ids[s:s + batch_size]) for s in range(0, len(ids), batch_size)]
        self.states, self.mask, self.pooled = (torch.cat([p[k].cpu() for p in parts]) for k in range(3))

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, idx, drop: torch.Tensor | None = None):
        """(latents, states, mask, pooled) of the pairs ``idx``; ``drop`` [len(idx)] True: that sample's text
        replaced by "no text"."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        mask, pooled = self.mask[idx], self.pooled[idx]
        if drop is not None:
            mask = mask & ~drop[:, None]
            pooled = pooled.masked_fill(drop[:, None], 0.0)
        return self.latents[idx], self.states[idx], mask, pooled


def draws(seed: int, step: int, n: int, shape, cond_dropout: float, kind: str = "logit_normal", mean: float = 0.0,
          std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t [n], noise [n, *shape], drop [n] bool) of global step ``step`` of a run seeded ``seed``: one generator
    seeded by the two, so the same step always draws the same."""
    g = torch.Generator().manual_seed(random.Random(f"{seed}:diffusion:{step}").getrandbits(63))
    t = sample_timesteps(n, g, kind, mean, std)
    noise = torch.randn((n, *shape), generator=g)
    drop = torch.rand(n, generator=g) < cond_dropout
    return t, noise, drop


@torch.no_grad()
def validation_loss(model, pairs: EncodedPairs, t: torch.Tensor, noise: torch.Tensor, batch_size: int = 64) -> float:
    """The mean flow loss over ``pairs`` at fixed ``t`` and ``noise``, conditional texts, the model in eval mode."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for s in range(0, len(pairs), batch_size):
        idx = list(range(s, min(len(pairs), s + batch_size)))
        x0, states, mask, pooled = (v.to(device) for v in pairs.batch(idx))
        out = model(x0, t[idx].to(device), noise[idx].to(device), states, mask, pooled)
        total += float(out.per_sample.sum())
    model.train(training)
    return total / max(len(pairs), 1)


@register
class DiffusionObjective(Objective):
    """a latent-diffusion model's flow-matching loss on text-to-image pairs (frozen VAE latents and text states)"""

    name = "diffusion"
    distributed = False
    stage_options = ("pairs", "cond_dropout")
    trains = ["generation"]

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.train.grad_accum != 1:
            raise ConfigError(f"train.grad_accum {recipe.train.grad_accum}: a diffusion stage takes one batch per "
                              f"step; set grad_accum: 1 and the batch you want as train.batch_size")
        check_pair_stages(recipe, cls.name)

    def __init__(self, run):
        super().__init__(run)
        self.stage_cfg = next(s for s in run.recipe.stages if s.objective == self.name)
        self.pairs_path, self.pair_rows, self.val_rows = read_stage_pairs(run.recipe, self.stage_cfg)

    def bind(self, model, processor) -> None:
        if not processor.family.capabilities.generate_images or "diffusion" not in processor.family.objectives:
            raise ConfigError(f"objective diffusion trains a latent-diffusion model; the {processor.family.name} "
                              f"family is not one (train it with: {', '.join(processor.family.objectives)})")
        recipe, t0 = self.run.recipe, time.perf_counter()
        self.model_cfg = model.cfg
        self.pairs = EncodedPairs(self.pair_rows, processor, model, str(self.pairs_path), self.run.progress)
        self.val = EncodedPairs(self.val_rows, processor, model, "val pairs") if self.val_rows else None
        self.run.log(f"  latents and text states of {len(self.pairs):,} pairs in {time.perf_counter() - t0:.1f} s")
        if recipe.train.batch_size > len(self.pairs):
            raise ConfigError(f"train.batch_size {recipe.train.batch_size} is larger than the {len(self.pairs)} "
                              f"training pairs")
        position = self.run.state.get("diffusion_position", 0) if self.run.state else 0
        self.stream = BatchStream(len(self.pairs), recipe.train.batch_size, recipe.train.seed, position)
        if self.val is not None:
            c = model.cfg
            self.val_t, self.val_noise, _ = draws(-1, 0, len(self.val), self.val.latents.shape[1:], 0.0,
                                                  c.timesteps, c.t_mean, c.t_std)

    def describe(self) -> str:
        return f"{len(self.pair_rows)} text-to-image pairs ({len(self.val_rows)} held out)"

    def start(self, stage, si: int, model) -> None:
        self.stage_cfg = stage

    def step_draws(self, n: int):
        c = self.model_cfg
        return draws(self.run.recipe.train.seed, self.run.step, n, self.pairs.latents.shape[1:],
                     self.stage_cfg.cond_dropout, c.timesteps, c.t_mean, c.t_std)

    def step(self, net, model) -> StepResult:
        idx = self.stream.next()
        t, noise, drop = self.step_draws(len(idx))
        device = next(model.parameters()).device
        x0, states, mask, pooled = (v.to(device) for v in self.pairs.batch(idx, drop))
        with autocast(self.run.recipe.train.precision):
            out = net(x0, t.to(device), noise.to(device), states, mask, pooled)
        out.loss.backward()
        return StepResult(float(out.loss.detach()), samples=len(idx), metrics={"dropped": int(drop.sum())})

    def row(self, result: StepResult) -> dict:
        run = self.run
        return {**result.metrics, "samples_per_second": run.samples / max(run.elapsed, 1e-9), "elapsed": run.elapsed}

    def validate(self, model, last: bool) -> dict[str, float]:
        if self.val is None:
            return {}
        return {"val_loss": validation_loss(model, self.val, self.val_t, self.val_noise)}

    def state(self) -> dict:
        return {"diffusion_position": self.stream.position}


__all__ = ["DiffusionObjective", "EncodedPairs", "draws", "validation_loss"]
