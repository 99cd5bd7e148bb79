"""Qwen2-VL's vision tower (Wang et al. 2024, "Qwen2-VL") and its patch merger.

Images of any size come in as the processor's flattened patches [N, C * T * p * p] (processing/qwen2_vl.py)
with their grids ``grid_thw`` [n_images, 3]. The tower is a ViT without a class token or learned positions:

- patch embedding: a 3D convolution over temporal_patch_size frames x p x p pixels with stride equal to its
  kernel, i.e. one linear map per flattened patch (an image is its frame repeated);
- 2D rotary embeddings on (row, column) patch ids, listed in the processor's merge-window order, half of each
  head's rotary frequencies for the row and half for the column (transformers' axial ``rot_pos_emb``);
- pre-norm blocks: LayerNorm, fused qkv attention with bias, LayerNorm, two-layer MLP (quick-GELU);
  attention never crosses images: each image (each frame) attends within itself only;
- the patch merger (the connector): LayerNorm, then each merge_size x merge_size window of patches (consecutive
  in this order) concatenated and mapped by Linear -> GELU -> Linear to the LM width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.nn import MLP, Rotary2D, apply_rope, make_norm


def window_positions(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(row, col) ids [N, 2] of every patch of every image in the processor's order: window by window (each
    merge_size x merge_size window row-major inside, windows row-major), all frames alike."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        blocks = (h // merge_size, merge_size, w // merge_size, merge_size)
        rows = rows.reshape(blocks).transpose(1, 2).flatten()
        cols = cols.reshape(blocks).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.long)


class PackedAttention(nn.Module):
    """Self-attention over the patches of several images packed in one sequence [N, D], each segment (an image's
    frame) attending only within itself. Fused ``qkv`` and ``proj`` with biases, as Qwen2-VL's tower."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"vision width {dim} is not divisible by its {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)  # each [H, N, hd]
        q, k = apply_rope(q[None], k[None], *rope)  # [1, H, N, hd]
        v = v[None]
        out = [F.scaled_dot_product_attention(qs, ks, vs) for qs, ks, vs in
               zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2))]
        out = torch.cat(out, dim=2)[0].transpose(0, 1).reshape(n, self.heads * self.head_dim)  # [N, D]
        return self.proj(out)


class Qwen2VLVisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.width, cfg.norm_eps)
        self.attn = PackedAttention(cfg.width, cfg.heads)
        self.norm2 = make_norm(cfg.norm, cfg.width, cfg.norm_eps)
        self.mlp = self.make_mlp(cfg)

    @staticmethod
    def make_mlp(cfg: VisionConfig) -> nn.Module:
        return MLP(cfg.width, cfg.mlp_dim, act=cfg.act)

    def residual_outputs(self) -> tuple[nn.Linear, ...]:
        """The projections that write into the residual stream (scaled by depth at a from-scratch init)."""
        return self.attn.proj, self.mlp.output

    def forward(self, x: torch.Tensor, rope, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class Qwen2VLVisionEncoder(nn.Module):
    """Flattened patches [N, C * T * p * p] + grid_thw [n, 3] -> patch features [N, width] (same order)."""

    Block = Qwen2VLVisionBlock  # Qwen2.5-VL's tower (encoders/qwen2_5_vl.py) has its own

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.temporal_patch_size < 1 or cfg.merge_size < 1:
            raise ValueError(f"vision temporal_patch_size and merge_size must be >= 1, got "
                             f"{cfg.temporal_patch_size} and {cfg.merge_size}")
        self.channels, self.patch_size = cfg.channels, cfg.patch_size
        self.temporal_patch_size, self.merge_size, self.width = cfg.temporal_patch_size, cfg.merge_size, cfg.width
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.patch_embed = nn.Conv3d(cfg.channels, cfg.width, kernel, stride=kernel, bias=False)
        self.rope = Rotary2D(cfg.width // cfg.heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(self.Block(cfg) for _ in range(cfg.depth))

    @property
    def patch_dim(self) -> int:
        return self.channels * self.temporal_patch_size * self.patch_size**2

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixel_values, grid_thw)
        rope = self.rope.at(window_positions(grid_thw, self.merge_size).to(x.device))  # ([1, N, hd], [1, N, hd])
        lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]  # attention segments: frames
        for block in self.blocks:
            x = block(x, rope, lengths)
        return x

    def embed(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The patch embeddings [N, width] of the processor's flattened patches, checked against the grids."""
        if pixel_values.ndim != 2 or pixel_values.shape[1] != self.patch_dim:
            raise ValueError(f"the qwen2_vl tower takes flattened patches [N, {self.patch_dim}] (channels x "
                             f"temporal_patch_size x patch_size^2), got {tuple(pixel_values.shape)}; check the "
                             f"processor's patch_size and temporal_patch_size")
        n = int(grid_thw.prod(-1).sum()) if len(grid_thw) else 0
        if n != pixel_values.shape[0]:
            raise ValueError(f"image_grid_thw {grid_thw.tolist()} accounts for {n} patches, pixel_values has "
                             f"{pixel_values.shape[0]}")
        dtype = self.patch_embed.weight.dtype
        x = pixel_values.to(dtype).view(-1, self.channels, self.temporal_patch_size, self.patch_size, self.patch_size)
        return self.patch_embed(x).view(-1, self.width)  # [N, D]


class PatchMerger(nn.Module):
    """LayerNorm (Qwen2.5-VL's: RMSNorm, ``norm="rmsnorm"``), then each merge_size**2 consecutive patch features
    (one window) concatenated and mapped by Linear -> GELU -> Linear to the LM width:
    [N, D_v] -> [N / merge_size**2, D_lm]."""

    def __init__(self, d_vision: int, d_lm: int, merge_size: int, act: str = "gelu", eps: float = 1e-6,
                 norm: str = "layernorm"):
        super().__init__()
        self.merge_size = merge_size
        self.hidden = d_vision * merge_size**2
        self.norm = make_norm(norm, d_vision, eps)
        self.mlp = MLP(self.hidden, self.hidden, act=act, out_dim=d_lm)

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return n // self.merge_size**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x).reshape(-1, self.hidden))
