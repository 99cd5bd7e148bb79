"""InternViT (Chen et al. 2024, "InternVL"), the image tower of InternVL 2.5 / 3, as transformers'
``InternVLVisionModel``.

A ViT with a class token and learned absolute positions, whose pre-norm blocks scale each branch by a learned
per-channel vector before the residual ("layer scale": x + lambda_1 * attn(norm(x)); x + lambda_2 * mlp(norm(x))).
Its options: LayerNorm or RMSNorm (``vision.norm``), biases on q, k and v (``vision.qkv_bias``; the output
projection always has one), and an RMSNorm over the whole width of the queries and keys before they are split into
heads (``qk_norm``, InternViT-6B). The features are those of ``vision.feature_layer`` (0 = the embeddings, -1 =
after the last block and the final LayerNorm, which exists only when ``vision.post_norm``: transformers'
``use_mean_pooling: false``), with the class token dropped. Tiles are always the tower's size, so the positions are
never interpolated (a tile of another size is refused).

Family-owned: only InternVL (models/internvl.py) builds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.nn import MLP, make_norm
from vlmkit.nn.norm import RMSNorm


@dataclass
class InternViTConfig:
    """What InternViT adds to ``VisionConfig``: the query/key norm and the layer scales' from-scratch value."""

    qk_norm: bool = False  # use_qk_norm: RMSNorm (eps 1e-6) over the whole width of q and k
    layer_scale_init: float = 0.1  # layer_scale_init_value: lambda_1, lambda_2 at a from-scratch init


class InternViTAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v (biases optional), optional q/k RMSNorm over the width, and
    an output projection with bias."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"vision.width {dim} is not divisible by vision.heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.o_proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim, 1e-6) if qk_norm else None
        self.k_norm = RMSNorm(dim, 1e-6) if qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(B, N, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, N, D))


class InternViTBlock(nn.Module):
    """x + lambda_1 * attn(norm1(x)); x + lambda_2 * mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, extra: InternViTConfig):
        super().__init__()
        d = cfg.width
        self.norm1 = make_norm(cfg.norm, d, cfg.norm_eps)
        self.attn = InternViTAttention(d, cfg.heads, cfg.qkv_bias, extra.qk_norm)
        self.norm2 = make_norm(cfg.norm, d, cfg.norm_eps)
        self.mlp = MLP(d, cfg.mlp_dim, act=cfg.act)
        self.lambda_1 = nn.Parameter(torch.full((d,), float(extra.layer_scale_init)))
        self.lambda_2 = nn.Parameter(torch.full((d,), float(extra.layer_scale_init)))

    def residual_outputs(self) -> tuple[nn.Linear, ...]:
        """The projections that write into the residual stream (scaled by depth at a from-scratch init)."""
        return self.attn.o_proj, self.mlp.output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.lambda_1 * self.attn(self.norm1(x))
        return x + self.lambda_2 * self.mlp(self.norm2(x))


class InternViTEncoder(nn.Module):
    """Patch embedding -> class token -> positions -> layer-scaled blocks -> [final LayerNorm] -> patch features
    [B, gh * gw, D] of ``cfg.feature_layer`` (class token dropped)."""

    def __init__(self, cfg: VisionConfig, extra: InternViTConfig):
        super().__init__()
        if not cfg.class_token or cfg.pos_embed != "learned" or not cfg.drop_class_token:
            raise ValueError("InternViT has a class token (vision.class_token: true, dropped from the features: "
                             "drop_class_token: true) and learned positions (pos_embed: learned)")
        if cfg.stem != "patch" or not cfg.patch_bias or cfg.pre_norm:
            raise ValueError("InternViT embeds patches with one strided convolution with bias (vision.stem: patch, "
                             "patch_bias: true) and has no pre_norm")
        self.image_size = tuple(cfg.image_size)
        self.grid = tuple(cfg.grid)
        self.width = cfg.width
        self.depth = cfg.depth
        self.feature_layer = cfg.feature_layer
        gh, gw = self.grid
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, cfg.patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, gh * gw + 1, cfg.width) * 0.02)
        idx = cfg.feature_layer if cfg.feature_layer >= 0 else cfg.depth + 1 + cfg.feature_layer
        if not 0 <= idx <= cfg.depth:
            raise ValueError(f"vision.feature_layer {cfg.feature_layer} is outside 0..{cfg.depth} "
                             f"(or -1..-{cfg.depth + 1})")
        # blocks after the feature layer never reach the output; the final norm applies at layer -1 only, as
        # transformers reads last_hidden_state there and hidden_states[k] (before the norm) elsewhere
        self.blocks = nn.ModuleList(InternViTBlock(cfg, extra) for _ in range(idx))
        last = cfg.feature_layer == -1
        self.post_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.post_norm and last else None

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, H, W] (tiles of the tower's size) -> features [B, gh * gw, D]."""
        if tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(f"InternViT takes tiles of {self.image_size} (H, W), got "
                             f"{tuple(pixel_values.shape[-2:])}; check the processor's image_size")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        if self.post_norm is not None:
            x = self.post_norm(x)
        return x[:, 1:]
