"""Presets of the Transfusion family (models/transfusion.py): vlmkit's from-scratch tiny-transfusion for
ShapesWorld."""

from __future__ import annotations

from vlmkit.models.transfusion import TransfusionConfig, TransfusionGenConfig
from vlmkit.presets import PRESETS, Preset
from vlmkit.presets.splice import tiny_llava
from vlmkit.presets.vae import tiny_vae
from vlmkit.processing.transfusion import TransfusionProcessorConfig


@PRESETS.register("tiny-transfusion", "from-scratch Transfusion for ShapesWorld: tiny-vae's 16x16x4 latents in 2x2 "
                                      "patches (64 per image) in tiny-llava's 3-layer LM, causal over text and "
                                      "bidirectional in each image; reads images as clean patches, draws them by "
                                      "flow matching in 20 Euler steps")
def tiny_transfusion() -> Preset:
    # tiny-llava's LM (as tiny-janus', tiny-chameleon's and tiny-showo's), so the early-fusion families compare at
    # one LM size; the VAE is tiny-vae's (a recipe points model.gen.vae_from at a trained one). Patch size 2: 64
    # patches per image, tiny-janus' generation grid (models/transfusion.py). The vocabulary is filled in from the
    # recipe's tokenizer (families/transfusion.py configure): this one is a placeholder
    vae = tiny_vae()
    lm = tiny_llava().model.lm
    lm.vocab_size = 1024
    model = TransfusionConfig(lm=lm, gen=TransfusionGenConfig(vae=vae.model, patch_size=2, steps=20))
    c, (h, w) = vae.model.latent_channels, vae.model.grid
    gh, gw = h // 2, w // 2
    proc = TransfusionProcessorConfig(family="transfusion", image_size=tuple(vae.model.image_size),
                                      mean=vae.processor.mean, std=vae.processor.std, resample="bicubic",
                                      image_seq_len=gh * gw, latent_shape=(c, h, w))
    return Preset(model, proc, source="Zhou et al. 2024, Transfusion (architecture only: one transformer, causal text "
                                      "and bidirectional image blocks, linear patch in/out, LM + lambda * diffusion "
                                      "loss; rectified flow in place of DDPM); tiny-llava's LM, tiny-vae's latents")
