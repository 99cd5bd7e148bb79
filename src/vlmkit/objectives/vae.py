"""The ``vae`` stage objective: a continuous-latent image autoencoder (family ``vae``, models/vae.py) learns to
reconstruct images through its Gaussian latents.

Data: as the ``vq`` objective's (objectives/vq.py, whose loading, stream and PSNR this reuses): the distinct images
of the recipe's ``data.train`` image-caption files, prepared by the model's processor; validation on the first
``data.val_samples`` distinct images of ``data.val``.

The model's interface for it: ``model(pixels [n, 3, H, W])`` returns an output with ``loss`` (reconstruction +
kl_weight * KL), ``reconstruction`` (normalised pixels), ``recon_loss`` and ``kl``, and ``metrics()`` (the
reconstruction loss, the KL, the posterior means' standard deviation ``latent_std``, the mean posterior standard
deviation ``posterior_std`` and the scaling factor ``latent_scale``), all logged per step with the batch's PSNR.
Validation (the model in eval mode: the posterior mean is decoded, the running scale is not updated) logs
``val_loss``, ``val_recon_loss``, ``val_psnr`` (dB, de-normalised pixels clamped to [0, 1]), ``val_kl`` (per
image) and ``val_latent_std`` (the standard deviation of every validation latent value, unscaled).

A vae stage runs on one process (``distributed = False``: every rank would run the same steps) with
``grad_accum: 1`` (one batch per step).
"""

from __future__ import annotations

import torch

from vlmkit.errors import ConfigError
from vlmkit.objectives import StepResult, register
from vlmkit.objectives.vq import VQObjective, psnr


@torch.no_grad()
def validate(model, processor, images: list, batch_size: int) -> dict[str, float]:
    """Held-out reconstruction of ``images`` (module docstring), the model in eval mode."""
    training = model.training
    model.eval()
    losses, recons, kls, psnrs, means = [], [], [], [], []
    for start in range(0, len(images), batch_size):
        pixels = processor.prepare_images(images[start:start + batch_size], "data.val").pixel_values
        pixels = pixels.to(next(model.parameters()).device)
        out = model(pixels)
        losses.append(float(out.loss) * len(pixels))
        recons.append(float(out.recon_loss) * len(pixels))
        kls.append(float(out.kl) * len(pixels))
        psnrs.append(psnr(out.reconstruction, pixels, processor.cfg.mean, processor.cfg.std).cpu())
        means.append(model.posterior(pixels)[0].flatten().cpu())
    model.train(training)
    n = len(images)
    return {"val_loss": sum(losses) / n, "val_recon_loss": sum(recons) / n, "val_psnr": float(torch.cat(psnrs).mean()),
            "val_kl": sum(kls) / n, "val_latent_std": float(torch.cat(means).std())}


@register
class VAEObjective(VQObjective):
    """a continuous-latent autoencoder's reconstruction + KL loss on images (PSNR, KL, latent std)"""

    name = "vae"
    distributed = False

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.train.grad_accum != 1:
            raise ConfigError(f"train.grad_accum {recipe.train.grad_accum}: a vae stage takes one batch per step; "
                              f"set grad_accum: 1 and the batch you want as train.batch_size")

    def postfix(self, result: StepResult) -> dict:
        m = result.metrics
        return {"psnr": f"{m['psnr']:.1f}", "kl": f"{m['kl']:.0f}"}

    def validate(self, model, last: bool) -> dict[str, float]:
        if not self.val_images:
            return {}
        return validate(model, self.processor, self.val_images, self.run.recipe.train.batch_size)


__all__ = ["VAEObjective", "validate"]
