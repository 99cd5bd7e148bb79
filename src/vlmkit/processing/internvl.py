"""InternVL's dynamic tiling (transformers' ``GotOcr2ImageProcessorPil`` with ``crop_to_patches``, as
``InternVLProcessor`` calls it) and each image's placeholder text.

1. Among the grids of columns x rows tiles with ``min_tiles`` <= columns * rows <= ``max_tiles`` (listed by
   width then height, stably sorted by tile count), the one whose aspect ratio (columns / rows) is closest to the
   image's (width / height); on a tie, the later grid wins while the image's area exceeds half of that grid's
   pixel area (``get_optimal_tiled_canvas``, the same float expressions).
2. The image is resized to (columns * tile, rows * tile) and cut into tiles row by row; when that makes more than
   one tile, the whole image resized to one tile (the thumbnail) follows. With ``max_tiles`` 1 (or tiling off) the
   image is resized to one tile.
3. Each tile is rescaled by 1/255 and normalised (the shared :class:`ImageTransform`).

Each image's placeholder (the ``<IMG_CONTEXT>`` token in the text) becomes ``<img>`` + ``<IMG_CONTEXT>`` x
(tokens per tile x tiles) + ``</img>`` (``InternVLProcessor.replace_image_token``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
from PIL import Image

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import ConfigError
from vlmkit.processing.image import RESAMPLE, ImageProcessor, PreparedPlaceholders


@dataclass
class TilingConfig:
    """GotOcr2's ``crop_to_patches`` (enabled), ``min_patches`` and ``max_patches``; the tile is the processor's
    ``image_size``."""

    enabled: bool = True
    min_tiles: int = 1
    max_tiles: int = 12


@dataclass
class InternVLProcessorConfig(ProcessorConfig):
    """InternVL's processor: ``image_size`` is a tile, ``image_seq_len`` a tile's tokens, ``image_token`` the
    context token (``<IMG_CONTEXT>``) that is both the placeholder in the text and the features' positions."""

    tiling: TilingConfig = field(default_factory=TilingConfig)
    start_image_token: str = "<img>"
    end_image_token: str = "</img>"


@lru_cache(maxsize=16)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(columns, rows) grids with min_tiles <= columns * rows <= max_tiles, by tile count (transformers'
    ``get_all_supported_aspect_ratios``)."""
    grids = [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
             if min_tiles <= w * h <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def best_grid(size: tuple[int, int], tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of tiles for an image of ``size`` (height, width) (transformers'
    ``get_optimal_tiled_canvas``)."""
    h, w = size
    aspect, area = w / h, w * h
    best, best_diff = (1, 1), float("inf")
    for grid in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * tile * tile * grid[0] * grid[1]:
            best = grid
    return best


def tile_count(size: tuple[int, int], tile: int, tiling: TilingConfig) -> int:
    """Tiles an image of ``size`` (height, width) becomes, the thumbnail included."""
    if not tiling.enabled or tiling.max_tiles <= 1:
        return 1
    cols, rows = best_grid(size, tile, tiling.min_tiles, tiling.max_tiles)
    return 1 if cols * rows == 1 else cols * rows + 1


def image_text(tiles: int, cfg: InternVLProcessorConfig) -> str:
    """What an image's placeholder becomes (``InternVLProcessor.replace_image_token``)."""
    return f"{cfg.start_image_token}{cfg.image_token * (cfg.image_seq_len * tiles)}{cfg.end_image_token}"


def check_tiling(tiling: TilingConfig, where: str) -> None:
    if tiling.min_tiles < 1 or tiling.max_tiles < tiling.min_tiles:
        raise ConfigError(f"{where}: min_tiles {tiling.min_tiles} and max_tiles {tiling.max_tiles}: expected "
                          f"1 <= min_tiles <= max_tiles")


class InternVLImageProcessor(PreparedPlaceholders, ImageProcessor):
    """Images -> tiles [total_tiles, C, tile, tile] in reading order (each image's tiles row by row, then its
    thumbnail), ``tokens`` = image tokens per image, ``texts`` = each placeholder's expansion, ``rows`` = tiles
    per image."""

    def __init__(self, cfg: InternVLProcessorConfig):
        super().__init__(cfg)
        h, w = cfg.image_size
        if h != w:
            raise ConfigError(f"processor image_size {tuple(cfg.image_size)}: InternVL's tiles are square")
        check_tiling(cfg.tiling, "processor tiling")
        self.tile = int(h)
        self.resample = RESAMPLE[cfg.resample]

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        t, tiling = self.tile, self.cfg.tiling
        if not tiling.enabled or tiling.max_tiles <= 1:
            return [image]  # the transform resizes it to one tile
        cols, rows = best_grid((image.height, image.width), t, tiling.min_tiles, tiling.max_tiles)
        canvas = image.resize((cols * t, rows * t), self.resample)
        tiles = [canvas.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]
        if len(tiles) > 1:
            tiles.append(image.resize((t, t), self.resample))
        return tiles

    def __call__(self, images: list[Image.Image]) -> MediaInputs:
        if not images:
            return MediaInputs(torch.zeros(0, 3, self.tile, self.tile), [], texts=[], rows=[])
        pixels, tokens, texts, counts = [], [], [], []
        for image in images:
            tiles = self.tiles(image)
            pixels += [self.transform(tile) for tile in tiles]
            tokens.append(len(tiles) * self.cfg.image_seq_len)
            counts.append(len(tiles))
            texts.append(image_text(len(tiles), self.cfg))
        return MediaInputs(torch.stack(pixels), tokens, texts=texts, rows=counts)
