"""VQ image tokenizers (VQ-VAE / VQGAN, models/vq.py): images -> a grid of discrete codes -> images. The codes are
the image tokens that early-fusion families (Chameleon, Emu3, Janus) read and generate.

Decisions such a model forces, in the family interface's terms:

- capabilities: it neither generates text nor embeds (``generate=False``, ``embed=False``); it has a codebook
  (``image_codes=True``), so ``Pipeline.encode_codes`` / ``decode_codes`` call the model's ``encode_codes`` /
  ``decode_codes``;
- objectives: ``vq`` alone (reconstruction + commitment, objectives/vq.py);
- text: none. The checkpoint format and the Processor keep a tokenizer, so ``new_tokenizer`` gives the smallest one
  (the pad and end tokens: processing/vq.py ``empty_tokenizer``), trained on nothing, and the layout refuses every
  prompt by name;
- images: the base ``ImageProcessor`` (resize to the model's size, normalise to [-1, 1]).

A from-scratch early-fusion model takes a trained VQ tokenizer's config and weights from its checkpoint
(tiny-janus' ``model.gen.vq_from``, tiny-chameleon's ``model.vq_from``): :func:`vq_config_from` and
:func:`load_vq_weights`.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.config import apply_overrides
from vlmkit.errors import ConfigError
from vlmkit.family import Capabilities, Family, register
from vlmkit.models.vq import VQConfig, build_vq
from vlmkit.processing.image import ImageProcessor
from vlmkit.processing.vq import ImageOnlyLayout, VQProcessorConfig, empty_tokenizer


@register
class VQ(Family):
    """VQ image tokenizer: conv encoder, vector quantiser (EMA or straight-through), conv decoder (VQ-VAE / VQGAN)"""

    name = "vq"
    Config = VQConfig
    ProcessorConfig = VQProcessorConfig
    capabilities = Capabilities(generate=False, embed=False, shared_prefix=False, image_codes=True)
    objectives = ("vq",)
    image_groups = ("encoder",)

    def build(self, cfg, image_token_id=None, init=True):
        return build_vq(cfg, init)

    def image_processor(self, pcfg):
        return ImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        return ImageOnlyLayout(pcfg, tokenizer)

    def new_tokenizer(self, texts, vocab_size):
        """No text: the two special tokens a checkpoint's tokenizer.json needs (``texts`` is empty)."""
        return empty_tokenizer()

    def configure(self, cfg, pcfg, tokenizer):
        """The processor's images are the model's size; its special tokens the tokenizer's."""
        return cfg, apply_overrides(pcfg, {"family": cfg.family, "image_size": list(cfg.image_size),
                                           "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token})

    def image_tokens(self, model) -> str:
        h, w = model.grid
        return f"{h * w} ({h}x{w} codes)"


def vq_config_from(folder: str, pcfg, key: str) -> VQConfig:
    """The config of the trained VQ tokenizer checkpoint ``folder`` (recipe option ``key``), whose processor must
    read images as ``pcfg`` does (image_size, mean, std); ConfigError naming ``key`` otherwise."""
    return pretrained_image_config(folder, pcfg, key, "vq", "VQ tokenizer's", "tiny-vq")


def pretrained_image_config(folder: str, pcfg, key: str, family: str, what: str, recipe: str):
    """The config of the trained ``family`` checkpoint ``folder`` that another model takes as its image tokenizer
    or autoencoder (recipe option ``key``): ConfigError naming ``key`` when it is not a folder, is another family's
    (``what``: "VQ tokenizer's", "VAE's"; ``recipe``: the recipe that trains one), or its processor reads images
    otherwise than ``pcfg`` (image_size, mean, std)."""
    from vlmkit.checkpoint import read_config
    from vlmkit.processing import Processor

    if not Path(folder).is_dir():
        raise ConfigError(f"{key}: {folder!r} is not a folder; point it at a trained {what} checkpoint "
                          f"(vlmkit train {recipe} writes runs/{recipe}/checkpoint)")
    cfg, _ = read_config(folder)
    if cfg.family != family:
        raise ConfigError(f"{key} {folder!r} is a {cfg.family} model; give a {what} checkpoint "
                          f"(vlmkit train {recipe})")
    proc = Processor.from_pretrained(folder).cfg
    for name in ("image_size", "mean", "std"):
        if tuple(getattr(proc, name)) != tuple(getattr(pcfg, name)):
            raise ConfigError(f"{key} {folder!r} reads images with {name} {list(getattr(proc, name))}, this "
                              f"model's processor with {list(getattr(pcfg, name))}; set processor.{name} to match")
    return cfg


def load_vq_weights(module, folder: str) -> None:
    """The weights of the checkpoint ``folder`` (a VQ tokenizer's, or a VAE's with its estimated latent_scale) into
    ``module`` (a model of its config)."""
    from safetensors.torch import load_file

    from vlmkit.checkpoint import check_folder

    module.load_state_dict(load_file(str(check_folder(folder) / "model.safetensors")))


__all__ = ["VQ", "load_vq_weights", "pretrained_image_config", "vq_config_from"]
