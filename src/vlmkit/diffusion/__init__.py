"""vlmkit's continuous diffusion parts, shared by the families that draw with them (Transfusion-style models, the
latent-diffusion DiT baseline): flow matching and its Euler sampler with classifier-free guidance (flow.py), the
timestep embedding and latent patches (embed.py), and DiT blocks (dit.py). docs/generation.md, "Diffusion parts"."""

from vlmkit.diffusion.dit import DiT, DiTBlock, DiTConfig, FinalLayer, sincos_2d
from vlmkit.diffusion.embed import TimestepEmbedding, patchify, unpatchify
from vlmkit.diffusion.flow import (
    add_noise,
    euler_sample,
    flow_loss,
    sample_timesteps,
    shift_timesteps,
    velocity_target,
)

__all__ = [
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "FinalLayer",
    "TimestepEmbedding",
    "add_noise",
    "euler_sample",
    "flow_loss",
    "patchify",
    "sample_timesteps",
    "shift_timesteps",
    "sincos_2d",
    "unpatchify",
    "velocity_target",
]
