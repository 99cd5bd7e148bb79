"""Llama 3.2 Vision's image tower (transformers' ``MllamaVisionModel``; Meta's llama-models ``VisionEncoder``).

An image is cut into up to ``max_tiles`` tiles (processing/mllama.py); every image arrives as exactly
``max_tiles`` tiles, the ones it does not use all zeros, with its aspect-ratio id (which rows x cols layout it
has; 0 = none) and a mask of its real tiles. Per image:

1. each tile through a bias-free patch convolution; a gated *pre-tile* embedding per (layout, tile) is added;
2. a class token in front of each tile's patches; positions: ``(1 - tanh(g)) * learned`` per patch plus
   ``tanh(g) * learned`` per (layout, tile, patch) (the gated positional embedding), then a LayerNorm;
3. each tile's P = patches + 1 tokens padded with zeros to a multiple of 8, and the *local* transformer (pre-norm
   ViT blocks without attention biases) runs over all tiles of the image at once, its outputs after the
   ``intermediate_layers`` kept;
4. a LayerNorm, a gated *post-tile* embedding, and the *global* transformer, whose blocks gate both branches
   with learned tanh gates;
5. the padding tokens dropped; the output per token is the global features followed by the intermediate ones,
   interleaved as transformers stacks them: [n, tiles, P, width * (1 + len(intermediate_layers))].

The attention mask is transformers' (and Meta's): only pairs of two padding tokens (padding patches, or tokens of
unused tiles) are masked, so real tokens also attend to the padding, and the unused tiles' features are computed
too; the LM's cross-attention then reads only the real tiles of the images a token sees.

:class:`TiledEncoder` applies any single-image tower (vlmkit's CNN) to every tile instead, for from-scratch models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.encoders.vit import ViTBlock
from vlmkit.processing.mllama import aspect_ratios


class GatedViTBlock(ViTBlock):
    """x + tanh(gate_attn) * attn(norm(x)); x + tanh(gate_ffn) * mlp(norm(x)) (Mllama's global layers; the gates
    start at pi / 4 as transformers' module)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
        self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x = x + self.gate_attn.tanh() * self.attn(self.norm1(x), mask=mask, is_causal=is_causal, rope=rope)
        return x + self.gate_ffn.tanh() * self.mlp(self.norm2(x))


class TileEmbedding(nn.Module):
    """One learned [tiles, D] (or [tiles, P, D]) addition per aspect-ratio id, scaled by tanh(gate)."""

    def __init__(self, n_ratios: int, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape
        self.embedding = nn.Embedding(n_ratios + 1, math.prod(shape))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(aspect_ratio_ids).reshape(-1, *self.shape)  # [n, *shape]


class MllamaVisionEncoder(nn.Module):
    """Tiles of images -> features [n, tiles, P, width * (1 + len(intermediate_layers))] (module docstring)."""

    def __init__(self, cfg: VisionConfig, max_tiles: int, global_depth: int, intermediate_layers: list[int]):
        super().__init__()
        if cfg.image_size[0] != cfg.image_size[1]:
            raise ValueError(f"vision.image_size {tuple(cfg.image_size)}: Mllama's tiles are square")
        if any(not 0 <= i < cfg.depth for i in intermediate_layers):
            raise ValueError(f"mllama.intermediate_layers {intermediate_layers} must be local layers "
                             f"0..{cfg.depth - 1}")
        D, self.max_tiles, self.intermediate_layers = cfg.width, max_tiles, list(intermediate_layers)
        self.image_size, self.width = tuple(cfg.image_size), D
        self.grid = cfg.grid
        self.num_tokens = cfg.num_patches + 1  # P: the patches and the class token of one tile
        self.out_dim = D * (1 + len(intermediate_layers))
        n_ratios = len(aspect_ratios(max_tiles))
        P = self.num_tokens
        self.patch_embed = nn.Conv2d(cfg.channels, D, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(D) * D**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(P, D) * D**-0.5)
        self.pos_gate = nn.Parameter(torch.zeros(1))
        self.tile_pos_embed = nn.Embedding(n_ratios + 1, max_tiles * P * D)
        self.pre_tile_embed = TileEmbedding(n_ratios, (max_tiles, 1, D))
        self.post_tile_embed = TileEmbedding(n_ratios, (max_tiles, 1, D))
        self.pre_norm = nn.LayerNorm(D)  # eps 1e-5 whatever vision.norm_eps says (transformers' layernorm_pre)
        self.post_norm = nn.LayerNorm(D)
        args = (D, cfg.heads, cfg.mlp_dim, cfg.act, "layernorm", cfg.norm_eps, False)  # no attention biases
        self.blocks = nn.ModuleList(ViTBlock(*args) for _ in range(cfg.depth))
        self.global_blocks = nn.ModuleList(GatedViTBlock(*args) for _ in range(global_depth))

    @staticmethod
    def attention_mask(aspect_ratio_mask: torch.Tensor, P: int, L: int) -> torch.Tensor:
        """[n, 1, tiles * L, tiles * L] booleans (True = may attend): everything but padding -> padding, where
        padding is the L - P padding tokens of every tile and all tokens of an image's unused tiles."""
        n, tiles = aspect_ratio_mask.shape
        pad = torch.ones(n, tiles, L, dtype=torch.bool, device=aspect_ratio_mask.device)
        pad[:, :, :P] = ~aspect_ratio_mask.bool()[:, :, None]
        pad = pad.reshape(n, tiles * L)
        return ~(pad[:, :, None] & pad[:, None, :])[:, None]

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values [n * tiles, C, H, W] (each image's ``max_tiles`` tiles in a row), aspect_ratio_ids [n],
        aspect_ratio_mask [n, tiles] -> [n, tiles, P, out_dim]."""
        n, T, D, P = aspect_ratio_ids.shape[0], self.max_tiles, self.width, self.num_tokens
        if pixel_values.shape[0] != n * T or tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(f"the Mllama tower takes {T} tiles of {self.image_size} per image ({n} images), got "
                             f"pixel values {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [n*T, D, gh, gw]
        x = x.flatten(2).transpose(1, 2).reshape(n, T, P - 1, D)
        x = x + self.pre_tile_embed(aspect_ratio_ids) * self.pre_tile_embed.gate.tanh()
        cls = self.class_embedding.expand(n, T, 1, D)
        x = torch.cat([cls, x], dim=2)  # [n, T, P, D]
        gate = self.pos_gate.tanh()
        x = x + (1 - gate) * self.pos_embed.view(1, 1, P, D)
        x = x + gate * self.tile_pos_embed(aspect_ratio_ids).reshape(n, T, P, D)
        x = self.pre_norm(x)
        L = P + (8 - P % 8) % 8  # tokens per tile, padded to a multiple of 8
        x = F.pad(x, (0, 0, 0, L - P)).reshape(n, T * L, D)
        mask = self.attention_mask(aspect_ratio_mask, P, L)
        kept = {}
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask)
            if i in self.intermediate_layers:
                kept[i] = x
        x = self.post_norm(x).reshape(n, T, L, D)
        x = x + self.post_tile_embed(aspect_ratio_ids) * self.post_tile_embed.gate.tanh()
        x = x.reshape(n, T * L, D)
        for block in self.global_blocks:
            x = block(x, mask=mask)
        x = x.reshape(n, T, L, D)[:, :, :P]
        # transformers stacks the intermediate outputs on a last axis: channel d of layer k lands at d * K + k
        inter = torch.stack([kept[i] for i in self.intermediate_layers], dim=-1)  # [n, T*L, D, K]
        inter = inter.reshape(n, T, L, -1)[:, :, :P]  # [n, T, P, D * K]
        return torch.cat([x, inter], dim=-1)


class TiledEncoder(nn.Module):
    """A single-image tower ([B, C, H, W] -> [B, N, D], e.g. vlmkit's CNN) applied to every tile, with the tiled
    tower's interface: [n * tiles, C, H, W] -> [n, tiles, N, D]."""

    def __init__(self, encoder: nn.Module, max_tiles: int):
        super().__init__()
        self.encoder, self.max_tiles = encoder, max_tiles
        self.num_tokens, self.out_dim, self.grid = encoder.num_tokens, encoder.width, encoder.grid

    @property
    def tile_encoder(self) -> nn.Module:
        """The tower of one tile (what a cell_labels stage pretrains on whole images)."""
        return self.encoder

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.encoder(pixel_values)  # [n * tiles, N, D]
        return feats.reshape(aspect_ratio_ids.shape[0], self.max_tiles, *feats.shape[1:])
