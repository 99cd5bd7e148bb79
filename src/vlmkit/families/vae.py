"""Continuous-latent image autoencoders (KL-VAE, models/vae.py): images -> a grid of Gaussian latents -> images.
The latents are what a latent-diffusion model (Transfusion, a DiT) denoises in place of pixels.

Decisions such a model forces, in the family interface's terms (the ``vq`` family's, families/vq.py, but with no
codebook):

- capabilities: it neither generates text nor embeds (``generate=False``, ``embed=False``) and has no codebook
  (``image_codes=False``); it has continuous latents (``image_latents=True``), so ``Pipeline.encode_latents`` /
  ``decode_latents`` call the model's ``encode_latents`` / ``decode_latents`` (what a latent-diffusion family
  calls on the model it holds);
- objectives: ``vae`` alone (reconstruction + KL, objectives/vae.py);
- text: none; as the VQ tokenizer's, its checkpoint keeps the smallest tokenizer (processing/vq.py
  ``empty_tokenizer``) and its layout refuses every prompt by name (:class:`LatentLayout`);
- images: the base ``ImageProcessor`` (resize to the model's size, normalise to [-1, 1]; VQProcessorConfig).

A latent-diffusion model takes a trained VAE's config and weights from its checkpoint: :func:`vae_config_from` and
:func:`load_vae_weights` (as families/vq.py's vq_config_from / load_vq_weights for the early-fusion families).
"""

from __future__ import annotations

from vlmkit.families.vq import VQ, load_vq_weights, pretrained_image_config
from vlmkit.family import Capabilities, register
from vlmkit.models.vae import VAEConfig, build_vae
from vlmkit.processing.vq import ImageOnlyLayout


class LatentLayout(ImageOnlyLayout):
    """Every prompt refused: this model reads no text, it maps images to latents and back."""

    def why(self, what: str) -> str:
        return (f"{what} needs a model that reads text; this is an image autoencoder ({self.cfg.family}), which "
                f"turns images into continuous latents and back (encode_latents / decode_latents)")


@register
class VAE(VQ):
    """KL-VAE image autoencoder: conv or patch encoder, diagonal Gaussian latents, conv decoder (LDM's AutoencoderKL)"""

    # the VQ family's images, empty tokenizer and configure; latents instead of a codebook
    name = "vae"
    Config = VAEConfig
    capabilities = Capabilities(generate=False, embed=False, shared_prefix=False, image_latents=True)
    objectives = ("vae",)

    def build(self, cfg, image_token_id=None, init=True):
        return build_vae(cfg, init)

    def layout(self, pcfg, tokenizer, files):
        return LatentLayout(pcfg, tokenizer)

    def image_tokens(self, model) -> str:
        h, w = model.latent_grid
        return f"{h * w} ({h}x{w}x{model.latent_channels} latents)"


def vae_config_from(folder: str, pcfg, key: str) -> VAEConfig:
    """The config of the trained VAE checkpoint ``folder`` (recipe option ``key``), whose processor must read images
    as ``pcfg`` does (image_size, mean, std); ConfigError naming ``key`` otherwise."""
    return pretrained_image_config(folder, pcfg, key, "vae", "VAE's", "tiny-vae")


load_vae_weights = load_vq_weights  # the weights and the estimated latent_scale, from model.safetensors


__all__ = ["VAE", "LatentLayout", "load_vae_weights", "vae_config_from"]
