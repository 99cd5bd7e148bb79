"""A latent-diffusion text-to-image model (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models": Stable Diffusion's recipe) in miniature: a frozen KL-VAE (models/vae.py), a frozen text encoder
(the text tower of a vlmkit dual encoder, models/dual_encoder.py) and a trained DiT denoiser (vlmkit.diffusion.dit)
over the VAE's latents, trained with rectified flow (vlmkit.diffusion.flow). The baseline that tiny-janus
(autoregressive codes), tiny-showo (mask-predict codes) and Transfusion (diffusion inside the LM) are compared with.

Decisions:

- **Config**: :class:`LDMConfig` *is* a :class:`~vlmkit.diffusion.dit.DiTConfig` (the denoiser's fields at the top
  level, so its errors name ``model.width``, ``model.patch_size``, ... as the recipe writes them) plus the frozen
  parts' configs (``vae``, ``text``), where a from-scratch model takes them from (``vae_from``, ``text_from``: trained
  checkpoints, as tiny-janus takes its VQ from ``gen.vq_from``), the sampler's defaults (``steps``, ``shift``) and
  the training timesteps' density (``timesteps``, ``t_mean``, ``t_std``: SD3's logit-normal by default).
- **Text conditioning** (:meth:`LDMModel.encode_text`): the tower's final-LayerNormed token states [n, S, D] go to
  the DiT's cross-attention with a key padding mask (a real token: an id other than ``pad_token_id``), as SD reads
  CLIP's last hidden states; the tower's pooled, projected vector (its CLIP embedding) is added to the timestep
  embedding (``pooled_dim``), as SD-XL and SD3 add their pooled CLIP vectors. A text with no real token (the
  unconditional prompt: no ids) gets an all-False mask and a zero pooled vector: the DiT's exact "no text".
  CLIP's tower is causal, so padding after the end of a text changes none of its states; SigLIP's attends both ways
  and pools the last position, as it was trained on texts padded to its context, so its texts are padded so.
- **Frozen parts**: the VAE and the text tower never receive gradients (they run under ``no_grad``) and a recipe
  trains the DiT alone (``train: [generation]``); their weights are saved with the model, so a checkpoint draws
  on its own.
- **Training forward** (:meth:`LDMModel.forward`): given clean latents, t, noise and the text condition, the flow
  loss ``mean((dit(x_t, t, text) - (noise - x0))^2)`` with ``x_t = (1 - t) x0 + t noise`` (flow.flow_loss), and the
  per-sample losses. The draws (t, noise, condition dropout) are the objective's (objectives/diffusion.py), so a
  test can fix them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import ModelConfig
from vlmkit.diffusion.dit import DiT, DiTConfig
from vlmkit.diffusion.flow import TIMESTEP_KINDS, add_noise, flow_loss
from vlmkit.errors import ConfigError
from vlmkit.models.dual_encoder import ContrastiveConfig, TextConfig, TextTower
from vlmkit.models.vae import VAEConfig, VAEModel, build_vae

MAX_STEPS = 1000  # ImageGenerationConfig's bound on gen.steps


@dataclass
class LDMConfig(DiTConfig, ModelConfig):
    """A latent-diffusion model (module docstring): the DiT's fields, the frozen VAE and text tower, the sampler's
    defaults and the training timesteps."""

    family: str = "ldm"
    latent_size: tuple[int, int] = (16, 16)
    vae: VAEConfig = field(default_factory=VAEConfig)
    # a trained VAE checkpoint (vlmkit train tiny-vae) whose config and weights a from-scratch model takes
    vae_from: str = ""
    cross_attention_dim: int = 512  # the text tower's width (the defaults: CLIP's text tower)
    text: TextConfig = field(default_factory=TextConfig)
    text_embed_dim: int = 512  # the text tower's projection (its dual encoder's contrastive.embed_dim)
    text_projection: str = "clip"  # clip: bias-free projection; siglip: with a bias (the dual encoder's)
    # a trained dual encoder checkpoint (vlmkit train tiny-clip) whose text tower and tokenizer a from-scratch
    # model takes
    text_from: str = ""
    pad_token_id: int = 0  # the tokenizer's padding id: text positions holding it are masked out
    steps: int = 20  # Euler steps when a request gives 0
    shift: float = 1.0  # SD3's timestep shift at sampling (1: none)
    timesteps: str = "logit_normal"  # training t: logit_normal (SD3) | uniform
    t_mean: float = 0.0
    t_std: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if tuple(self.vae.grid) != tuple(self.latent_size) or self.vae.latent_channels != self.latent_channels:
            raise ConfigError(f"model.latent_size {list(self.latent_size)} and model.latent_channels "
                              f"{self.latent_channels} must be the VAE's latent grid {list(self.vae.grid)} x "
                              f"{self.vae.latent_channels} (model.vae, or the checkpoint of model.vae_from)")
        if self.cross_attention_dim != self.text.width:
            raise ConfigError(f"model.cross_attention_dim must be the text tower's width model.text.width "
                              f"{self.text.width}, got {self.cross_attention_dim}")
        if self.pooled_dim not in (0, self.text_embed_dim):
            raise ConfigError(f"model.pooled_dim must be 0 (no pooled text vector) or model.text_embed_dim "
                              f"{self.text_embed_dim}, got {self.pooled_dim}")
        if self.text_projection not in ("clip", "siglip"):
            raise ConfigError(f"model.text_projection must be clip or siglip, got {self.text_projection!r}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"model.steps must be in 1..{MAX_STEPS} (the default Euler steps), got {self.steps}")
        if not self.shift > 0:
            raise ConfigError(f"model.shift must be > 0 (1: no shift), got {self.shift}")
        if self.timesteps not in TIMESTEP_KINDS:
            raise ConfigError(f"model.timesteps must be one of {', '.join(TIMESTEP_KINDS)}, got {self.timesteps!r}")
        if not self.t_std > 0:
            raise ConfigError(f"model.t_std must be > 0, got {self.t_std}")

    def dit_config(self) -> DiTConfig:
        """The denoiser's own config (the DiTConfig fields of this one)."""
        from dataclasses import fields

        return DiTConfig(**{f.name: getattr(self, f.name) for f in fields(DiTConfig)})


@dataclass
class DiffusionOutput:
    """The training forward's result: the mean flow loss and each sample's."""

    loss: torch.Tensor
    per_sample: torch.Tensor


class LDMModel(nn.Module):
    """Frozen VAE + frozen text tower + DiT (module docstring)."""

    def __init__(self, cfg: LDMConfig):
        super().__init__()
        self.cfg = cfg
        self.vae: VAEModel = build_vae(cfg.vae)
        self.text_encoder = TextTower(cfg.text, ContrastiveConfig(embed_dim=cfg.text_embed_dim,
                                                                  projection=cfg.text_projection))
        self.dit = DiT(cfg.dit_config())

    # ------------------------------------------------------------------ what shared code reads
    @property
    def image_grid(self) -> tuple[int, int]:
        """The latent grid (h, w) a drawn image is denoised on."""
        return tuple(self.cfg.latent_size)

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    @property
    def default_steps(self) -> int:
        return self.cfg.steps

    def module_groups(self) -> dict[str, nn.Module]:
        """``generation`` (the DiT: what a recipe trains; the name recipes already use for Janus' image-generation
        part), ``vae`` and ``text`` (frozen: separately trained checkpoints)."""
        return {"generation": self.dit, "vae": self.vae, "text": self.text_encoder}

    def image_tower(self) -> nn.Module:
        raise ConfigError("ldm draws images and reads none: there is no image tower to pretrain (objective "
                          "cell_labels)")

    # ------------------------------------------------------------------ the frozen parts
    @torch.no_grad()
    def encode_latents(self, pixels, sample: bool = False, generator=None) -> torch.Tensor:
        return self.vae.encode_latents(pixels, sample, generator)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_latents(z)

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids [n, S] (right-padded with ``pad_token_id``; a row of padding alone is "no text") -> (states
        [n, S, text.width] after the tower's final LayerNorm, mask [n, S] True = a real token, pooled [n,
        text_embed_dim]: the tower's embedding, zero for a row without text)."""
        tower = self.text_encoder
        ids = ids.to(tower.token_embed.weight.device)
        if tower.cfg.pool == "last" and ids.shape[1] < tower.cfg.context_length:  # SigLIP's: padded to its context
            ids = F.pad(ids, (0, tower.cfg.context_length - ids.shape[1]), value=self.cfg.pad_token_id)
        mask = ids != self.cfg.pad_token_id
        x = tower.token_embed(ids) + tower.pos_embed[:ids.shape[1]]
        for block in tower.blocks:
            x = block(x, is_causal=tower.cfg.causal)
        states = tower.norm(x)
        has = mask.any(1)
        pooled = torch.zeros(len(ids), self.cfg.text_embed_dim, device=ids.device, dtype=states.dtype)
        if bool(has.any()):
            rows = has.nonzero().flatten()
            at = tower.pool_index(ids[rows])
            pooled[rows] = tower.proj(states[rows, at])
        return states, mask, pooled

    # ------------------------------------------------------------------ the denoiser
    def velocity(self, z_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor | None, mask: torch.Tensor | None,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        return self.dit(z_t, t, states, mask, pooled if self.cfg.pooled_dim else None)

    def forward(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, states: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> DiffusionOutput:
        """The flow loss of clean ``latents`` [n, C, h, w] noised to ``t`` [n] with ``noise``, the DiT reading the
        text condition (module docstring)."""
        per_sample = flow_loss(self.velocity(add_noise(latents, noise, t), t, states, mask, pooled), latents, noise,
                               reduction="none")
        return DiffusionOutput(per_sample.mean(), per_sample)


def build_ldm(cfg: LDMConfig, init: bool = True) -> LDMModel:
    """The model of ``cfg``: the DiT initialised as DiT's (adaLN-Zero), the frozen parts left for their checkpoints
    (``vae_from``, ``text_from`` or the model's own) to fill."""
    return LDMModel(cfg)


__all__ = ["DiffusionOutput", "LDMConfig", "LDMModel", "MAX_STEPS", "build_ldm"]
