"""A diffusion transformer (DiT, Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") over latent
patches, conditioned on the timestep, on a pooled vector and on a text encoder's token states: the denoiser of
vlmkit's latent-diffusion baseline, whose blocks Transfusion-style models may reuse.

- **Patches**: the latents [n, C, h, w] (a VAE's) are cut into p x p patches (vlmkit.diffusion.embed.patchify),
  each mapped to the model's width by one Linear (DiT's convolutional patch embedding, flattened), plus a position
  embedding: DiT's fixed 2D sine-cosine one (:func:`sincos_2d`, ``pos_embed: sincos``) or a learned one
  (``learned``, for a fixed latent size).
- **Conditioning vector** c: the timestep embedding (:class:`~vlmkit.diffusion.embed.TimestepEmbedding`), plus, when
  ``pooled_dim`` is set, a projection of a pooled vector (a class one-hot, a text encoder's pooled state; SD3 adds
  its pooled CLIP vectors to the timestep embedding the same way). The projection has no biases, so a zero vector
  adds exactly nothing: zeros are the unconditional input classifier-free guidance needs.
- **adaLN-Zero** (DiT's best conditioning): each block's LayerNorms have no affine parameters; c -> SiLU -> Linear
  gives a shift, a scale and a gate for the attention branch and for the MLP branch,
  ``x + gate * branch(norm(x) * (1 + scale) + shift)``. That Linear is initialised to zero, so every gate starts at
  0 and each block is the identity at initialisation; the final layer (adaLN shift/scale, Linear to the patch
  values) is zero-initialised too, so a fresh DiT outputs exactly zero.
- **Self-attention** over the patches (every patch sees every patch, no mask), with
  ``torch.nn.functional.scaled_dot_product_attention`` (vlmkit.nn.Attention), and DiT's MLP (GELU, tanh form).
- **Cross-attention to text** (``cross_attention_dim``; PixArt-alpha, Chen et al. 2023, which conditions a DiT on
  T5's token states this way): between the two, ``x + cross_attn(norm(x), text_states)``, the text's padding keys
  masked out (``text_mask`` [n, S], True = a real token); the layer is vlmkit.fusion's CrossAttention (Flamingo's,
  no biases, where PixArt's has them). As PixArt's, its output projection is zero-initialised, so
  the block stays the identity at initialisation; unlike PixArt's there is a LayerNorm (with affine parameters)
  before it, as Stable Diffusion's transformer blocks have. A sample whose mask has no real token gets no
  cross-attention output at all (an all-padding text is "no text": the unconditional input for guidance, and no
  NaN from a softmax over nothing).

``DiT.forward(z_t, t, text_states=None, text_mask=None, pooled=None)`` returns the velocity (vlmkit.diffusion.flow's
convention) with the latents' shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmkit.diffusion.embed import TimestepEmbedding, patchify, unpatchify
from vlmkit.errors import ConfigError
from vlmkit.fusion.cross_attention import CrossAttention
from vlmkit.nn import MLP, Attention
from vlmkit.nn import sincos_2d as _sincos_2d

POS_EMBEDS = ("sincos", "learned")

__all__ = ["POS_EMBEDS", "DiT", "DiTBlock", "DiTConfig", "FinalLayer", "modulate", "sincos_2d"]


@dataclass
class DiTConfig:
    """A DiT denoiser (module docstring). The defaults are a tiny one; DiT-S/2 is width 384, depth 12, heads 6."""

    latent_channels: int = 4  # C of the latents [n, C, h, w] (the VAE's)
    latent_size: tuple[int, int] = (8, 8)  # (h, w): the learned position embedding's grid; sincos adapts to any
    patch_size: int = 2  # p: a patch is p x p latent cells
    width: int = 128
    depth: int = 4  # DiT blocks
    heads: int = 4
    mlp_ratio: float = 4.0  # the MLP's hidden width is mlp_ratio * width
    pos_embed: str = "sincos"  # sincos (DiT's fixed 2D sine-cosine) | learned
    freq_dim: int = 256  # the timestep's sinusoidal frequencies before its MLP
    cross_attention_dim: int = 0  # the text states' width; 0: no cross-attention
    pooled_dim: int = 0  # the pooled vector's width, added to the timestep embedding; 0: none

    def __post_init__(self):
        self.latent_size = tuple(self.latent_size)
        for name in ("latent_channels", "patch_size", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.pos_embed not in POS_EMBEDS:
            raise ConfigError(f"model.pos_embed must be one of {', '.join(POS_EMBEDS)}, got {self.pos_embed!r}")
        if self.width % self.heads:
            raise ConfigError(f"model.width {self.width} must be a multiple of model.heads {self.heads}")
        if self.pos_embed == "sincos" and self.width % 4:
            raise ConfigError(f"model.width {self.width} must be a multiple of 4 for pos_embed: sincos (a quarter of "
                              "the channels each for sin/cos of the row and of the column)")
        h, w = self.latent_size
        if h < 1 or w < 1 or h % self.patch_size or w % self.patch_size:
            raise ConfigError(f"model.latent_size {list(self.latent_size)} must be positive multiples of "
                              f"model.patch_size {self.patch_size}")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.freq_dim < 2:
            raise ConfigError(f"model.freq_dim must be >= 2, got {self.freq_dim}")
        for name in ("cross_attention_dim", "pooled_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0 (0: none), got {getattr(self, name)}")

    @property
    def patch_values(self) -> int:
        """C * p * p: the values of one patch, the patch embedding's input and the final layer's output."""
        return self.latent_channels * self.patch_size ** 2


def sincos_2d(width: int, h: int, w: int) -> torch.Tensor:
    """DiT's fixed 2D sine-cosine position embedding [h * w, width] of an h x w patch grid (row-major), in DiT's
    (MAE's ``get_2d_sincos_pos_embed``) channel order: the first half encodes the column (its ``meshgrid(grid_w,
    grid_h)`` puts w first), the second the row, each half sin then cos at periods up to 10000. vlmkit.nn.sincos_2d
    (the ViT towers') has the halves the other way round; this reorders its output."""
    if width % 4:
        raise ConfigError(f"a 2D sine-cosine position embedding needs a width divisible by 4, got {width}")
    rows_then_cols = _sincos_2d(h, w, width)
    return torch.cat([rows_then_cols[:, width // 2:], rows_then_cols[:, :width // 2]], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [n, L, D] * (1 + scale) + shift, shift and scale [n, D] per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _zero_(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def adaln(width: int, chunks: int) -> nn.Sequential:
    """c [n, width] -> SiLU -> Linear to ``chunks`` modulation vectors, initialised to zero (adaLN-Zero)."""
    return nn.Sequential(nn.SiLU(), _zero_(nn.Linear(width, chunks * width)))


def text_attention_mask(text_states: torch.Tensor, text_mask: torch.Tensor | None):
    """(mask [n, 1, 1, S] for SDPA, True = may attend; has_text [n, 1, 1]) from a key padding mask [n, S] (True =
    a real token; None: all real). A sample with no real token attends to everything and its output is zeroed."""
    n, s = text_states.shape[:2]
    if text_mask is None:
        return None, None
    if text_mask.shape != (n, s):
        raise ValueError(f"text_mask must be [n, S] = {[n, s]} like text_states' first two dimensions, got "
                         f"{list(text_mask.shape)}")
    real = text_mask.to(device=text_states.device, dtype=torch.bool)
    has = real.any(-1)
    return (real | ~has[:, None])[:, None, None, :], has[:, None, None]


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention and MLP, with an optional cross-attention to text states between them (module
    docstring); the identity at initialisation."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4, cross_attention_dim: int | None = None):
        super().__init__()
        if width % heads:
            raise ConfigError(f"the DiT block's width {width} must be a multiple of its heads {heads}")
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qkv_bias=True, out_bias=True)
        self.cross_attn = self.norm_cross = None
        if cross_attention_dim:
            self.norm_cross = nn.LayerNorm(width, eps=1e-6)
            self.cross_attn = CrossAttention(width, cross_attention_dim, heads)
            _zero_(self.cross_attn.o_proj)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio), act="gelu_tanh")
        self.adaLN_modulation = adaln(width, 6)

    def cross(self, x: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """The cross-attention branch: x [n, L, D] reads text_states [n, S, D_text] through the key padding mask."""
        mask, has = text_attention_mask(text_states, text_mask)
        out = self.cross_attn(self.norm_cross(x), text_states.to(x.dtype), mask)
        return out if has is None else out * has.to(out.dtype)

    def forward(self, x: torch.Tensor, c: torch.Tensor, text_states: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, L, width], c [n, width]; text_states [n, S, cross_attention_dim] (None: no text, the branch is
        skipped), text_mask [n, S] True = real token."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if text_states is not None:
            if self.cross_attn is None:
                raise ValueError("text_states were given to a DiT block without cross-attention (set "
                                 "model.cross_attention_dim to the text states' width)")
            x = x + self.cross(x, text_states, text_mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then Linear to the patch values, all zero-initialised (DiT's final layer)."""

    def __init__(self, width: int, patch_values: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = _zero_(nn.Linear(width, patch_values))
        self.adaLN_modulation = adaln(width, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The denoiser: latents z_t [n, C, h, w] and t [n] (plus text states / a pooled vector) -> velocity
    [n, C, h, w] (module docstring)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.x_embedder = nn.Linear(cfg.patch_values, cfg.width)
        gh, gw = cfg.latent_size[0] // cfg.patch_size, cfg.latent_size[1] // cfg.patch_size
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, gh * gw, cfg.width))
        else:
            self.register_buffer("pos_embed", sincos_2d(cfg.width, gh, gw)[None], persistent=False)
        self.t_embedder = TimestepEmbedding(cfg.width, cfg.freq_dim)
        self.pooled_embedder = None
        if cfg.pooled_dim:  # no biases: a zero vector adds nothing (the unconditional input)
            self.pooled_embedder = nn.Sequential(nn.Linear(cfg.pooled_dim, cfg.width, bias=False), nn.SiLU(),
                                                 nn.Linear(cfg.width, cfg.width, bias=False))
        self.blocks = nn.ModuleList([DiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.cross_attention_dim or None)
                                     for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.width, cfg.patch_values)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform Linears with zero biases, N(0, 0.02) for the timestep (and pooled)
        MLPs and a learned position embedding, then adaLN-Zero: every modulation Linear, the final Linear and the
        cross-attention output projections at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for mlp in (self.t_embedder.mlp, self.pooled_embedder):
            for m in (mlp or []):
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            _zero_(block.adaLN_modulation[-1])
            if block.cross_attn is not None:
                _zero_(block.cross_attn.o_proj)
        _zero_(self.final_layer.adaLN_modulation[-1])
        _zero_(self.final_layer.linear)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """The position embedding [1, (h/p) * (w/p), width] of an h x w latent grid."""
        p = self.cfg.patch_size
        if (h, w) == tuple(self.cfg.latent_size):
            return self.pos_embed
        if self.cfg.pos_embed == "learned":
            raise ConfigError(f"latents of {h}x{w} with model.pos_embed: learned, which was made for "
                              f"model.latent_size {list(self.cfg.latent_size)} (pos_embed: sincos adapts to any size)")
        return sincos_2d(self.cfg.width, h // p, w // p)[None].to(self.pos_embed)

    def condition(self, t: torch.Tensor | float, n: int, pooled: torch.Tensor | None) -> torch.Tensor:
        """c [n, width]: the timestep embedding (``t`` a number or [n]) plus the pooled vector's projection."""
        device = self.x_embedder.weight.device
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        t = t.expand(n) if t.dim() == 0 else t
        c = self.t_embedder(t)
        if pooled is not None:
            if self.pooled_embedder is None:
                raise ValueError("a pooled vector was given to a DiT without one (set model.pooled_dim to its width)")
            if pooled.shape != (n, self.cfg.pooled_dim):
                raise ValueError(f"pooled must be [n, model.pooled_dim] = {[n, self.cfg.pooled_dim]}, got "
                                 f"{list(pooled.shape)}")
            c = c + self.pooled_embedder(pooled.to(c.dtype))
        return c

    def forward(self, z_t: torch.Tensor, t: torch.Tensor | float, text_states: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity [n, C, h, w] at z_t [n, C, h, w], t [n] (or a number); ``text_states`` [n, S, D_text]
        with ``text_mask`` [n, S] (True = real token), ``pooled`` [n, pooled_dim]; None: that condition absent."""
        if z_t.dim() != 4 or z_t.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"z_t must be latents [n, model.latent_channels={self.cfg.latent_channels}, h, w], "
                             f"got shape {list(z_t.shape)}")
        n, _, h, w = z_t.shape
        p = self.cfg.patch_size
        x = self.x_embedder(patchify(z_t, p)) + self.positions(h, w)
        c = self.condition(t, n, pooled)
        for block in self.blocks:
            x = block(x, c, text_states, text_mask)
        return unpatchify(self.final_layer(x, c), p, h, w)
