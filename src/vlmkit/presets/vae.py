"""Presets of the continuous-latent image autoencoders (family ``vae``, models/vae.py)."""

from __future__ import annotations

from vlmkit.models.vae import VAEConfig
from vlmkit.presets import PRESETS, Preset
from vlmkit.processing.vq import VQProcessorConfig


@PRESETS.register("tiny-vae", "from-scratch KL-VAE for ShapesWorld's 64x64 images: f 4 (a 16x16x4 latent grid), "
                              "each latent from its own 4x4 patch, tiny-vq's decoder, L2 + 1e-6 KL, estimated "
                              "scaling factor")
def tiny_vae() -> Preset:
    # f 4, not 8: at f 8 (an 8x8x4 grid) a small object is one latent position and its shape is lost (judge 0.961,
    # val PSNR 30.6) against 0.998 and 34.3 dB at f 4. KL weight 1e-6 against 1e-8 / 1e-4 (models/vae.py's
    # docstring); tiny-vq's patch encoder and decoder widths. docs/generation.md ("Continuous latents: tiny-vae")
    model = VAEConfig(image_size=(64, 64), channels=16, channel_mult=(1, 2, 4), res_blocks=1, norm_groups=0,
                      z_channels=64, latent_channels=4, kl_weight=1e-6, recon_loss="l2", scaling_factor=0.0,
                      encoder="patch")
    proc = VQProcessorConfig(family="vae", image_size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return Preset(model, proc, source="Kingma & Welling 2014 (VAE), Rombach et al. 2022 (LDM's AutoencoderKL: KL "
                                      "term, log-variance clamp, Stable Diffusion's scaling factor)")
