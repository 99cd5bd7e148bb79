"""Idefics3 / SmolVLM image splitting: each image becomes a grid of fixed-size tiles plus a global view, and its
placeholder becomes the text that marks them (``<fake_token_around_image>``, ``<row_R_col_C>``, ``<global-img>``).

The steps and their rounding follow transformers' ``Idefics3ImageProcessorPil`` (SmolVLM's is the same code):

1. resize so the longer side is ``longest_edge`` (the shorter side ``int(long / aspect)``, rounded up to even);
2. with splitting: resize each side up to a multiple of the tile size (the side first rounded from the longer
   one), cut it into rows x cols tiles in reading order, and add the whole image resized to one tile (the
   global view) last; an image that is a single tile after step 2 stays one image without row markers;
   without splitting: resize to one tile;
3. rescale by 1/255 and normalise (the shared :class:`ImageTransform`).

Every tile is exactly tile x tile pixels, so the vision tower never sees padding (transformers pads only to
batch prompts with different tile counts, and drops the all-zero padding images before its vision tower).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from PIL import Image

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.processing.image import RESAMPLE, ImageProcessor, PreparedPlaceholders

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on a side after the longest-edge resize


@dataclass
class ImageSplitConfig:
    """Idefics3 / SmolVLM image splitting (image_processor "idefics3"); the tiles are ProcessorConfig.image_size."""

    longest_edge: int = 0  # first resize the longer side to this (0: no first resize)
    enabled: bool = True  # cut images larger than a tile into tiles plus a global view; else one tile each



@dataclass
class Idefics3ProcessorConfig(ProcessorConfig):
    """Idefics3 / SmolVLM's processor: ``image_size`` is a tile; ``split`` how images are cut into tiles."""

    split: ImageSplitConfig = field(default_factory=ImageSplitConfig)


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(height, width) with the longer side at ``longest_edge`` and the other rounded up to even, then capped at
    4096 pixels (transformers' ``get_resize_output_image_size``: up- or down-scales)."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of ``tile``: the longer side first, the other from it through the
    aspect ratio (transformers' ``resize_for_vision_encoder``)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def image_prompt(rows: int, cols: int, image_seq_len: int, image_token: str) -> str:
    """The text an image placeholder becomes (transformers' ``Idefics3Processor.replace_image_token``)."""
    image = image_token * image_seq_len
    global_view = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{image}{FAKE_IMAGE_TOKEN}"
    if rows == 0 and cols == 0:
        return global_view
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>{image}"
        text += "\n"
    return text + "\n" + global_view


class Idefics3ImageProcessor(PreparedPlaceholders, ImageProcessor):
    """Images -> tiles [total_tiles, C, tile, tile] in reading order (each image's tiles row by row, then its
    global view), ``tokens`` = image tokens per image, ``texts`` = each placeholder's expansion.

    Settings (ProcessorConfig): ``image_size`` is (tile, tile); ``split.longest_edge`` the first resize (0: none);
    ``split.enabled`` whether images larger than a tile are split."""

    def __init__(self, cfg):
        super().__init__(cfg)
        h, w = cfg.image_size
        if h != w:
            raise ValueError(f"idefics3 tiles are square; image_size {tuple(cfg.image_size)} is not")
        self.tile = int(h)
        self.resample = RESAMPLE[cfg.resample]

    def split(self, image: Image.Image) -> tuple[list[Image.Image], int, int]:
        """One RGB image -> (its tiles and global view as PIL images, rows, cols); rows = cols = 0 when the image is
        a single tile."""
        t = self.tile
        if self.cfg.split.longest_edge:
            h, w = longest_edge_size(image.height, image.width, self.cfg.split.longest_edge)
            image = image.resize((w, h), self.resample)
        if not self.cfg.split.enabled:
            return [image.resize((t, t), self.resample)], 0, 0
        h, w = tile_multiple_size(image.height, image.width, t)
        image = image.resize((w, h), self.resample)
        if h <= t and w <= t:
            return [image], 0, 0
        rows, cols = (h - t) // t + 1, (w - t) // t + 1
        tiles = [image.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]
        return tiles + [image.resize((t, t), self.resample)], rows, cols

    def __call__(self, images: list[Image.Image]) -> MediaInputs:
        if not images:
            return MediaInputs(torch.zeros(0, 3, self.tile, self.tile), [], texts=[], rows=[])
        pixels, tokens, texts, rows = [], [], [], []
        for image in images:
            # the tile grid's rows/cols, not ``rows`` (each item's count of tiles, MediaInputs.rows), which they
            # used to overwrite
            tiles, grid_rows, grid_cols = self.split(image)
            pixels += [self.transform(tile) for tile in tiles]  # rescale + normalise (tiles are tile x tile)
            tokens.append(len(tiles) * self.cfg.image_seq_len)
            rows.append(len(tiles))
            texts.append(image_prompt(grid_rows, grid_cols, self.cfg.image_seq_len, self.cfg.image_token))
        return MediaInputs(torch.stack(pixels), tokens, texts=texts, rows=rows)


