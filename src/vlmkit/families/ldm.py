"""Latent diffusion (models/ldm.py): a DiT denoising a frozen KL-VAE's latents, conditioned on a frozen dual
encoder's text tower: Stable Diffusion's recipe in miniature, the text-to-image baseline (tiny-dit).

Decisions in the family interface's terms:

- capabilities: it draws (``generate_images``) and does not chat, score or embed (``generate=False``,
  ``embed=False``); it has continuous latents (``image_latents``: ``Pipeline.encode_latents`` / ``decode_latents``
  reach its VAE); no codebook;
- objectives: ``diffusion`` alone (objectives/diffusion.py: the flow loss on text-to-image pairs);
- text: the text encoder's own tokenizer and processor settings (a dual encoder's ``TextLayout``, which refuses
  every chat, prompt and score by name); :meth:`LDMLayout.image_prompt` is the caption as the text tower reads it
  (``<s> caption </s>``, cut to its context) and the unconditional prompt is no ids at all (all padding once
  batched: the DiT's "no text");
- ``model.vae_from`` / ``model.text_from``: a from-scratch model takes a trained VAE's config and weights (as
  tiny-janus takes its VQ) and a trained dual encoder's text tower, tokenizer and text settings; both are required
  (a DiT over an untrained VAE or text tower learns nothing worth drawing);
- drawing (:meth:`LDM.draw_images`): Euler steps of the flow ODE from noise (flow.euler_sample; ``gen.steps``, 0:
  ``model.steps``, 20), the conditional and unconditional texts as one batch for classifier-free guidance
  (``gen.cfg_scale``), noise from ``gen.seed``; the latents decoded by the VAE. ``temperature`` and ``top_k`` have
  no meaning for an ODE sampler and are refused (as Transfusion's);
- no Hugging Face mapping (``hf=None``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmkit.config import apply_overrides
from vlmkit.errors import ConfigError, DataError
from vlmkit.families.vae import load_vae_weights, vae_config_from
from vlmkit.family import Capabilities, Family, register
from vlmkit.models.ldm import MAX_STEPS, LDMConfig, build_ldm
from vlmkit.processing.image import ImageProcessor
from vlmkit.processing.processor import Processor
from vlmkit.processing.text import TextLayout, TextProcessorConfig
from vlmkit.processing.vq import empty_tokenizer


class LDMLayout(TextLayout):
    """A dual encoder's text layout whose one prompt is an image-generation prompt (module docstring)."""

    def why(self, what: str) -> str:
        return (f"{what} needs a model that writes text; this is a latent-diffusion text-to-image model "
                f"({self.cfg.family}): it draws images (generate_image, POST /v1/images/generations)")

    def image_prompt(self, text, grid, unconditional=False, where="prompt"):
        """``<s> text </s>`` as the text tower reads it; ``unconditional``: no ids."""
        if unconditional:
            return []
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: a text-to-image prompt must be a non-empty string")
        return self.tokenize_texts([text], where)[0][0]


def text_encoder_from(folder: str, key: str = "model.text_from"):
    """(config, processor) of the trained dual encoder checkpoint ``folder``; ConfigError naming ``key`` otherwise."""
    from vlmkit.checkpoint import read_config
    from vlmkit.models.dual_encoder import DualEncoderConfig

    if not Path(folder).is_dir():
        raise ConfigError(f"{key}: {folder!r} is not a folder; point it at a trained dual encoder's checkpoint "
                          f"(vlmkit train tiny-clip writes runs/tiny-clip/checkpoint)")
    cfg, _ = read_config(folder)
    if not isinstance(cfg, DualEncoderConfig):
        raise ConfigError(f"{key} {folder!r} is a {cfg.family} model; give a dual encoder's checkpoint (clip or "
                          f"siglip: vlmkit train tiny-clip), whose text tower conditions the DiT")
    return cfg, Processor.from_pretrained(folder)


def load_text_weights(module, folder: str) -> None:
    """The text tower's weights of the dual encoder checkpoint ``folder`` into ``module`` (a TextTower)."""
    from vlmkit.checkpoint import check_folder

    weights = load_file(str(check_folder(folder) / "model.safetensors"))
    module.load_state_dict({k[len("text."):]: v for k, v in weights.items() if k.startswith("text.")})


@register
class LDM(Family):
    """latent diffusion: a DiT over a frozen KL-VAE's latents, cross-attending to a frozen CLIP text tower"""

    name = "ldm"
    Config = LDMConfig
    ProcessorConfig = TextProcessorConfig
    capabilities = Capabilities(generate=False, embed=False, generate_images=True, image_latents=True,
                                shared_prefix=False)
    objectives = ("diffusion",)
    image_groups = ("generation",)
    hf = None

    def build(self, cfg, image_token_id=None, init=True):
        return build_ldm(cfg, init)

    def image_processor(self, pcfg):
        return ImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        return LDMLayout(pcfg, tokenizer)

    def new_tokenizer(self, texts, vocab_size):
        """A placeholder: a from-scratch model takes the text encoder's tokenizer (:meth:`new_model`)."""
        return empty_tokenizer()

    def configure(self, cfg, pcfg, tokenizer):
        """The VAE's config from ``vae_from`` (its processor must read images as this one); the text tower's, its
        projection and its padding id from ``text_from``; the DiT's latent shape and text widths theirs."""
        for key in ("vae_from", "text_from"):
            if not getattr(cfg, key):
                what = "VAE (vlmkit train tiny-vae)" if key == "vae_from" else "dual encoder (vlmkit train tiny-clip)"
                raise ConfigError(f"model.{key} must point at a trained {what} checkpoint: a from-scratch ldm model "
                                  f"denoises its latents / reads its text")
        vae = vae_config_from(cfg.vae_from, pcfg, "model.vae_from")
        enc, enc_proc = text_encoder_from(cfg.text_from)
        pooled = enc.contrastive.embed_dim if cfg.pooled_dim else 0
        cfg = dataclasses.replace(cfg, vae=vae, latent_size=tuple(vae.grid), latent_channels=vae.latent_channels,
                                  text=enc.text, text_embed_dim=enc.contrastive.embed_dim,
                                  text_projection=enc.contrastive.projection, cross_attention_dim=enc.text.width,
                                  pooled_dim=pooled, pad_token_id=enc_proc.tokenizer.pad_id)
        e = enc_proc.cfg
        pcfg = apply_overrides(pcfg, {"family": cfg.family, "max_length": e.max_length, "pad_token": e.pad_token,
                                      "eos_token": e.eos_token, "bos_token": e.bos_token, "text_padding": "longest"})
        return cfg, pcfg

    def new_model(self, cfg, pcfg, tokenizer):
        """A from-scratch DiT with ``vae_from``'s trained VAE and ``text_from``'s trained text tower and tokenizer."""
        cfg, pcfg = self.configure(cfg, pcfg, tokenizer)
        model = self.build(cfg, None, init=True)
        load_vae_weights(model.vae, cfg.vae_from)
        load_text_weights(model.text_encoder, cfg.text_from)
        return cfg, model, Processor(pcfg, text_encoder_from(cfg.text_from)[1].tokenizer)

    def can_draw(self, model) -> bool:
        return True  # its VAE always decodes

    def draw_images(self, model, cond, uncond, gen, progress=False):
        """Pixels [n, 3, H, W] in [-1, 1]: Euler steps of the flow ODE, guided, decoded by the VAE (module
        docstring)."""
        from vlmkit.diffusion.flow import euler_sample
        from vlmkit.image_generation import check_ode_sampling

        check_ode_sampling(gen, "ldm")
        steps = gen.steps or model.default_steps
        if not 1 <= steps <= MAX_STEPS:
            raise ConfigError(f"steps must be in 0..{MAX_STEPS} (0: this model's default {model.default_steps} "
                              f"Euler steps), got {gen.steps}")
        guided = gen.cfg_scale != 1.0
        device = next(model.parameters()).device
        states, mask, pooled = model.encode_text(text_batch([cond] * gen.n + ([uncond] * gen.n if guided else []),
                                                            model.cfg.pad_token_id))

        def velocity(x, t):
            if not guided:
                return model.velocity(x, t, states, mask, pooled)
            v = model.velocity(torch.cat([x, x]), torch.cat([t, t]), states, mask, pooled)
            return v[:gen.n], v[gen.n:]

        generator = torch.Generator().manual_seed(gen.seed) if gen.seed is not None else None
        h, w = model.image_grid
        noise = torch.randn(gen.n, model.latent_channels, h, w, generator=generator)
        latents = euler_sample(velocity, noise.shape, steps, cfg_scale=gen.cfg_scale, shift=model.cfg.shift,
                               progress=progress, device=device, noise=noise.to(device))
        return model.decode_latents(latents)

    def image_tokens(self, model) -> str:
        h, w = model.image_grid
        p = model.cfg.patch_size
        return f"{(h // p) * (w // p)} ({h}x{w}x{model.latent_channels} latents in {p}x{p} patches)"


def text_batch(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Token id rows right-padded with ``pad_id`` into [n, max(1, longest)] (an empty row: all padding)."""
    width = max([1] + [len(r) for r in rows])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids


__all__ = ["LDM", "LDMLayout", "load_text_weights", "text_batch", "text_encoder_from"]
