"""LLaVA-NeXT and LLaVA-OneVision: LLaVA (ViT tower -> two-layer MLP -> splice into a decoder LM) on AnyRes
tiles.

The processor gives every tile of every image (processing/llava_next.py). The tower and projector run on
all tiles at once; each image's tile features are then put back into their grid, the rows or columns that
only saw padding are cropped ("unpadding"), OneVision shrinks a grid larger than ``anyres.max_tiles`` tiles
by bilinear interpolation, a learned ``image_newline`` vector closes every feature row, and the base image's
features go first. An image the processor did not tile (OneVision's multi-image mode) is its base features
and one newline. The result, [total image tokens, D], is spliced into the placeholder positions as for
LLaVA. This is transformers' ``pack_image_features`` of LlavaNextModel / LlavaOnevisionModel, step for step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import VLMConfig
from vlmkit.connectors import build_connector
from vlmkit.encoders.vit import ViTEncoder
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import init_from_scratch
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.batch import Features, MediaInputs
from vlmkit.processing.llava_next import AnyResConfig, check_anyres, reduced_size, tile_grid, unpad_slice


@dataclass
class LlavaNextConfig(VLMConfig):
    """LLaVA-NeXT / LLaVA-OneVision: LLaVA's parts on AnyRes tiles (``anyres``)."""

    family: str = "llava_next"
    anyres: AnyResConfig = field(default_factory=AnyResConfig)


class LlavaNextModel(VisionLanguageModel):
    """VisionLanguageModel whose images are AnyRes tiles; ``image_seq_len`` is the tokens of one tile (the
    base image's), an image's total depends on its size (the processor counts them the same way)."""

    def __init__(self, encoder: ViTEncoder, connector: nn.Module, lm: DecoderLM, image_token_id: int,
                 grid_pinpoints: list[tuple[int, int]], max_tiles: int = 0):
        super().__init__(encoder, connector, lm, image_token_id)
        h, w = encoder.image_size
        gh, gw = encoder.grid
        if h != w or gh != gw:
            raise ValueError(f"vision.image_size {encoder.image_size}: AnyRes tiles are square")
        if encoder.num_tokens != gh * gw:
            raise ValueError("AnyRes reassembles a tile's patch grid: the tower must not keep a class token "
                             "(vision.drop_class_token: true, or a tower without one)")
        check_anyres(grid_pinpoints, h, "anyres.grid_pinpoints")
        self.tile, self.side = h, gh
        self.grid_pinpoints = [tuple(p) for p in grid_pinpoints]
        self.max_tiles = max_tiles
        self.image_newline = nn.Parameter(torch.zeros(lm.embed_tokens.weight.shape[1]))

    def encode_media(self, media: MediaInputs) -> Features:
        """The processor's MediaInputs (all tiles [total_tiles, C, H, W], ``image_sizes``, ``image_tiles``) ->
        LM-space features [total image tokens, D_lm], images in reading order."""
        sizes, tiles = media.extra.get("image_sizes"), media.extra.get("image_tiles")
        if sizes is None or tiles is None:
            raise ValueError("LLaVA-NeXT/OneVision lays out each image's features by its size and tile count: pass "
                             "the 'anyres' image processor's MediaInputs (extra image_sizes and image_tiles)")
        counts = [int(n) for n in tiles]
        if sum(counts) != media.pixel_values.shape[0]:
            raise ValueError(f"image_tiles sum to {sum(counts)} but pixel_values holds "
                             f"{media.pixel_values.shape[0]} tiles")
        feats = self.connector(self.encoder(media.pixel_values), self.encoder.grid)  # [T, N, D]
        out = [self.pack(f, tuple(int(v) for v in size)) for f, size in zip(feats.split(counts), sizes)]
        return Features(torch.cat(out), [len(o) for o in out])

    def pack(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One image's tile features [tiles, side*side, D] (base first) -> its LM-space sequence [M, D]."""
        newline = self.image_newline.to(feats.dtype)
        if feats.shape[0] == 1:  # not tiled: base features and one newline
            return torch.cat([feats[0], newline[None]])
        rows, cols = tile_grid(size, self.grid_pinpoints, self.tile)
        if rows * cols != feats.shape[0] - 1:
            raise ValueError(f"an image of {size} (height, width) is cut into {rows}x{cols} tiles, but "
                             f"{feats.shape[0] - 1} tiles (and the base image) were given")
        s, d = self.side, feats.shape[-1]
        grid = feats[1:].view(rows, cols, s, s, d).permute(4, 0, 2, 1, 3).reshape(d, rows * s, cols * s)
        axis, pad = unpad_slice(size, grid.shape[1:])
        grid = grid[:, pad:grid.shape[1] - pad] if axis == 1 else grid[:, :, pad:grid.shape[2] - pad]
        reduced = reduced_size(grid.shape[1:], s, self.max_tiles)
        if reduced is not None:
            grid = F.interpolate(grid[None], list(reduced), mode="bilinear")[0]
        grid = torch.cat([grid, newline[:, None, None].expand(d, grid.shape[1], 1)], dim=-1)  # [D, h, w + 1]
        return torch.cat([feats[0], grid.flatten(1).transpose(0, 1)])


def build_llava_next(cfg: LlavaNextConfig, image_token_id: int, init: bool = True) -> LlavaNextModel:
    """ModelConfig (family llava_next or llava_onevision) -> LlavaNextModel. ``init`` gives the from-scratch
    initialisation of the shared parts (the newline at the LM's embedding scale)."""
    if cfg.vision.arch != "vit":
        raise ValueError(f"vision.arch {cfg.vision.arch!r}: {cfg.family} tiles for a ViT tower (arch: vit)")
    if cfg.connector.kind not in ("mlp", "linear"):
        raise ValueError(f"connector.kind {cfg.connector.kind!r}: {cfg.family} keeps one token per patch "
                         f"(mlp or linear)")
    encoder, lm = ViTEncoder(cfg.vision), DecoderLM(cfg.lm)
    connector = build_connector(cfg.connector, cfg.vision.width, cfg.lm.width)
    model = LlavaNextModel(encoder, connector, lm, image_token_id, cfg.anyres.grid_pinpoints, cfg.anyres.max_tiles)
    if init and not any(p.is_meta for p in model.parameters()):
        init_from_scratch(model, cfg)
        with torch.no_grad():
            model.image_newline.normal_(std=cfg.lm.width**-0.5)
    return model
