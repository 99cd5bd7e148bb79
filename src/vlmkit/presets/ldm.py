"""Presets of the latent-diffusion family (models/ldm.py): vlmkit's from-scratch tiny-dit for ShapesWorld."""

from __future__ import annotations

from vlmkit.models.ldm import LDMConfig
from vlmkit.presets import PRESETS, Preset
from vlmkit.presets.dual_encoder import tiny_clip
from vlmkit.presets.vae import tiny_vae
from vlmkit.processing.text import TextProcessorConfig


@PRESETS.register("tiny-dit", "from-scratch latent diffusion for ShapesWorld: a DiT (width 128, 4 blocks, patch 2: "
                              "64 tokens, 1.57M trained parameters) over tiny-vae's 16x16x4 latents, cross-attending to a "
                              "frozen tiny-clip text tower; rectified flow, 20 Euler steps")
def tiny_dit() -> Preset:
    # 16x16x4 latents in 2x2 patches: 64 DiT tokens (tiny-showo and tiny-janus sequence 256 codes). Width 128 and
    # depth 4 give 1.57M trainable parameters (the VAE's 0.46M and the text tower's 0.75M frozen), in the range of
    # the tiny early-fusion models' trained LMs, so the comparison is at about equal trained parameters. The VAE and
    # the text tower here are placeholders of the right shape: a recipe points model.vae_from / model.text_from at
    # trained checkpoints, whose configs replace these (families/ldm.py)
    vae = tiny_vae()
    clip = tiny_clip().model
    model = LDMConfig(vae=vae.model, latent_size=tuple(vae.model.grid), latent_channels=vae.model.latent_channels,
                      patch_size=2, width=128, depth=4, heads=4, mlp_ratio=4.0, pos_embed="sincos",
                      text=clip.text, text_embed_dim=clip.contrastive.embed_dim, cross_attention_dim=clip.text.width,
                      pooled_dim=clip.contrastive.embed_dim, steps=20)
    proc = TextProcessorConfig(family="ldm", image_size=tuple(vae.processor.image_size), mean=vae.processor.mean,
                               std=vae.processor.std, image_token="", max_length=clip.text.context_length,
                               pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    return Preset(model, proc, source="Peebles & Xie 2023 (DiT, adaLN-Zero), Chen et al. 2023 (PixArt-alpha's "
                                      "cross-attention), Rombach et al. 2022 (latent diffusion), Esser et al. 2024 "
                                      "(rectified flow, logit-normal t)")
