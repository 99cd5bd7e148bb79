"""The Pixtral vision tower (Mistral AI's Pixtral-12B and Mistral Small 3.x) and Mistral 3's projector with its patch
merger: transformers' ``PixtralVisionModel`` and ``Mistral3MultiModalProjector``.

Images keep their own aspect ratio (processing/mistral3.py resizes each so that its longer side fits the
processor's longest edge, both sides rounded up to whole merge windows) and come in as flattened patches
[N, C * p * p], each image's patches row-major, with each image's patch grid ``grid`` [n_images, 2] (rows, cols).
The tower:

- patch embedding: a convolution with stride equal to its kernel and no bias (``patch_conv``), i.e. one linear map
  per flattened patch; then RMSNorm (``ln_pre``);
- 2D rotary embeddings on each patch's (row, col) inside its own image (:class:`PixtralRotary`): the head's
  frequencies ``theta ** (-2i / head_dim)`` alternate between the axes (even ones rotate with the row, odd ones
  with the column), laid out as transformers' ``PixtralVisionRotaryEmbedding`` in the rotate-half layout;
- pre-norm blocks: RMSNorm (eps 1e-5, as transformers hard-codes it), attention without biases, RMSNorm, SwiGLU
  feed-forward without biases; every image attends only to its own patches (a block-diagonal mask in transformers,
  one attention call per image here);
- the features of hidden state ``feature_layer`` (0 = after ``ln_pre``, -1 = the last block's output).

Mistral 3's projector (the connector, :class:`Mistral3Projector`): RMSNorm, the patch merger (each image's
merge x merge windows of neighbouring patches unfolded into one vector, channel-major as ``torch.nn.functional.unfold``
gives it, then a Linear back to the tower width), and Linear -> GELU -> Linear to the LM width. Pixtral-12B (its Hub
format is ``LlavaForConditionalGeneration`` with this tower) has LLaVA's projector instead, Linear -> GELU -> Linear
without norm or merger (:class:`PixtralLlavaProjector`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.nn import RMSNorm, SwiGLU, activation, apply_rope

PIXTRAL_NORM_EPS = 1e-5  # transformers' Pixtral tower hard-codes its RMSNorms' eps


def grid_positions(grid: torch.Tensor, device=None) -> torch.Tensor:
    """(row, col) ids [N, 2] of every patch of every image (each image's grid row-major)."""
    out = [torch.stack(torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                      indexing="ij"), dim=-1).reshape(-1, 2) for h, w in grid.tolist()]
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.long, device=device)


class PixtralRotary(nn.Module):
    """Pixtral's axial 2D rotary embedding: frequencies ``theta ** (-2i / head_dim)`` for i < head_dim / 2, the even
    ones for the row and the odd ones for the column, so that (cos, sin) of a patch are
    [row * f_even, col * f_odd] repeated twice (rotate-half layout)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"Pixtral's 2D rotary embedding needs a head size divisible by 4, got {head_dim}")
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq_row", inv[0::2].clone(), persistent=False)
        self.register_buffer("inv_freq_col", inv[1::2].clone(), persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [1, N, head_dim] of (row, col) ids ``pos`` [N, 2]."""
        freqs = torch.cat([pos[:, :1].float() * self.inv_freq_row, pos[:, 1:].float() * self.inv_freq_col], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)[None]
        return emb.cos(), emb.sin()


class PixtralAttention(nn.Module):
    """Self-attention over several images' patches [N, D], each image attending only to itself; q, k, v, o without
    biases."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"vision width {dim} is not divisible by its {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]

        def heads(t):
            return t.view(n, self.heads, self.head_dim).transpose(0, 1)[None]  # [1, H, N, hd]

        q, k = apply_rope(heads(self.q_proj(x)), heads(self.k_proj(x)), *rope)
        v = heads(self.v_proj(x))
        out = [F.scaled_dot_product_attention(qs, ks, vs) for qs, ks, vs in
               zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2))]
        out = torch.cat(out, dim=2)[0].transpose(0, 1).reshape(n, self.heads * self.head_dim)
        return self.o_proj(out)


class PixtralBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attention = PixtralAttention(cfg.width, cfg.heads)
        self.ffn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.width, cfg.mlp_dim, act=cfg.act)

    def residual_outputs(self) -> tuple[nn.Linear, ...]:
        """The projections that write into the residual stream (scaled by depth at a from-scratch init)."""
        return self.attention.o_proj, self.feed_forward.down_proj

    def forward(self, x: torch.Tensor, rope, lengths: list[int]) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, lengths)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralVisionEncoder(nn.Module):
    """Flattened patches [N, C * p * p] + grid [n, 2] -> patch features [N, width] (same order)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        depth = cfg.depth
        layer = cfg.feature_layer if cfg.feature_layer >= 0 else depth + 1 + cfg.feature_layer
        if not 0 <= layer <= depth:
            raise ValueError(f"vision.feature_layer {cfg.feature_layer} is not a hidden state of a {depth}-layer "
                             f"tower (0 .. {depth}, or -1 .. -{depth + 1})")
        self.channels, self.patch_size, self.width, self.merge_size = cfg.channels, cfg.patch_size, cfg.width, \
            cfg.merge_size
        self.used_layers = layer
        self.patch_conv = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.ln_pre = RMSNorm(cfg.width, cfg.norm_eps)
        self.rope = PixtralRotary(cfg.width // cfg.heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(PixtralBlock(cfg) for _ in range(depth))

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size**2

    def forward(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 2 or pixel_values.shape[1] != self.patch_dim:
            raise ValueError(f"the pixtral tower takes flattened patches [N, {self.patch_dim}] (channels x "
                             f"patch_size^2), got {tuple(pixel_values.shape)}; check the processor's patch_size")
        lengths = [int(h) * int(w) for h, w in grid.tolist()]
        if sum(lengths) != pixel_values.shape[0]:
            raise ValueError(f"the image grids {grid.tolist()} account for {sum(lengths)} patches, pixel_values has "
                             f"{pixel_values.shape[0]}")
        weight = self.patch_conv.weight
        x = F.linear(pixel_values.to(weight.dtype), weight.reshape(self.width, -1))  # the conv, patch by patch
        x = self.ln_pre(x)
        rope = self.rope(grid_positions(grid, x.device))
        for block in self.blocks[:self.used_layers]:
            x = block(x, rope, lengths)
        return x


class PatchMerger(nn.Module):
    """Each image's merge x merge windows of neighbouring patch features unfolded into one (channel-major, as
    ``F.unfold``), mapped back to the tower width by a Linear without bias: [N, D] -> [N / merge**2, D]."""

    def __init__(self, dim: int, merge: int):
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(dim * merge**2, dim, bias=False)

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        d, m, out = x.shape[-1], self.merge, []
        for feats, (h, w) in zip(x.split([int(h) * int(w) for h, w in grid.tolist()]), grid.tolist()):
            image = feats.view(h, w, d).permute(2, 0, 1)[None]  # [1, D, h, w]
            out.append(F.unfold(image, kernel_size=m, stride=m).view(d * m * m, -1).t())
        return self.merging_layer(torch.cat(out) if out else x.new_zeros(0, d * m * m))


class Mistral3Projector(nn.Module):
    """Mistral 3's multimodal projector: RMSNorm -> patch merger -> Linear -> act -> Linear ([N, D_v] + grid ->
    [N / merge**2, D_lm])."""

    def __init__(self, d_vision: int, d_lm: int, merge: int, act: str = "gelu", bias: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        self.merge = merge
        self.norm = RMSNorm(d_vision, eps)
        self.patch_merger = PatchMerger(d_vision, merge)
        self.linear_1 = nn.Linear(d_vision, d_lm, bias=bias)
        self.linear_2 = nn.Linear(d_lm, d_lm, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.patch_merger(self.norm(x), grid))))


class PixtralLlavaProjector(nn.Module):
    """Pixtral-12B's projector (``LlavaMultiModalProjector`` on a Pixtral tower): Linear -> act -> Linear, every patch
    one LM token (no merger: ``merge`` 1)."""

    merge = 1

    def __init__(self, d_vision: int, d_lm: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(d_vision, d_lm, bias=bias)
        self.linear_2 = nn.Linear(d_lm, d_lm, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


__all__ = ["Mistral3Projector", "PatchMerger", "PixtralLlavaProjector", "PixtralRotary", "PixtralVisionEncoder",
           "grid_positions"]
