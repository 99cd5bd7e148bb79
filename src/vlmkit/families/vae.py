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

from pathlib import Path

from vlmkit.config import apply_overrides
from vlmkit.errors import ConfigError
from vlmkit.family import Capabilities, Family, register
from vlmkit.models.vae import VAEConfig, build_vae
from vlmkit.processing.image import ImageProcessor
from vlmkit.processing.vq import ImageOnlyLayout, VQProcessorConfig, empty_tokenizer


class LatentLayout(ImageOnlyLayout):
    """Every prompt refused: this model reads no text, it maps images to latents and back."""

    def why(self, what: str) -> str:
        return (f"{what} needs a model that reads text; this is an image autoencoder ({self.cfg.family}), which "
                f"turns images into continuous latents and back (encode_latents / decode_latents)")


@register
class VAE(Family):
    """KL-VAE image autoencoder: conv or patch encoder, diagonal Gaussian latents, conv decoder (LDM's AutoencoderKL)"""

    name = "vae"
    Config = VAEConfig
    ProcessorConfig = VQProcessorConfig
    capabilities = Capabilities(generate=False, embed=False, shared_prefix=False, image_latents=True)
    objectives = ("vae",)
    image_groups = ("encoder",)

    def build(self, cfg, image_token_id=None, init=True):
        return build_vae(cfg, init)

    def image_processor(self, pcfg):
        return ImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        return LatentLayout(pcfg, tokenizer)

    def new_tokenizer(self, texts, vocab_size):
        """No text: the two special tokens a checkpoint's tokenizer.json needs (``texts`` is empty)."""
        return empty_tokenizer()

    def configure(self, cfg, pcfg, tokenizer):
        """The processor's images are the model's size; its special tokens the tokenizer's."""
        return cfg, apply_overrides(pcfg, {"family": cfg.family, "image_size": list(cfg.image_size),
                                           "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token})

    def image_tokens(self, model) -> str:
        h, w = model.latent_grid
        return f"{h * w} ({h}x{w}x{model.latent_channels} latents)"


def vae_config_from(folder: str, pcfg, key: str) -> VAEConfig:
    """The config of the trained VAE checkpoint ``folder`` (recipe option ``key``), whose processor must read images
    as ``pcfg`` does (image_size, mean, std); ConfigError naming ``key`` otherwise."""
    from vlmkit.checkpoint import read_config
    from vlmkit.processing import Processor

    if not Path(folder).is_dir():
        raise ConfigError(f"{key}: {folder!r} is not a folder; point it at a trained VAE's checkpoint "
                          f"(vlmkit train tiny-vae writes runs/tiny-vae/checkpoint)")
    vae_cfg, _ = read_config(folder)
    if vae_cfg.family != "vae":
        raise ConfigError(f"{key} {folder!r} is a {vae_cfg.family} model; give a VAE's checkpoint "
                          f"(vlmkit train tiny-vae)")
    vae_proc = Processor.from_pretrained(folder).cfg
    for name in ("image_size", "mean", "std"):
        if tuple(getattr(vae_proc, name)) != tuple(getattr(pcfg, name)):
            raise ConfigError(f"{key} {folder!r} reads images with {name} {list(getattr(vae_proc, name))}, this "
                              f"model's processor with {list(getattr(pcfg, name))}; set processor.{name} to match")
    return vae_cfg


def load_vae_weights(module, folder: str) -> None:
    """The weights (and the estimated latent_scale) of the VAE checkpoint ``folder`` into ``module`` (a VAEModel
    of its config)."""
    from safetensors.torch import load_file

    from vlmkit.checkpoint import check_folder

    module.load_state_dict(load_file(str(check_folder(folder) / "model.safetensors")))


__all__ = ["VAE", "LatentLayout", "load_vae_weights", "vae_config_from"]
