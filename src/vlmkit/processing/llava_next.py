"""AnyRes images (LLaVA-NeXT, LLaVA-OneVision): each image is tiled at the best of a list of resolutions.

The image is resized (aspect kept) into the candidate resolution that keeps the most of it and wastes the
least, padded with black to it, cut into tiles of the tower's size, and preceded by the whole image resized
to one tile ("base"). The model encodes every tile, reassembles the tiles' features into the grid, crops
the rows or columns that only saw padding ("unpadding"), appends a learned newline vector to each feature
row, and puts the base image's features first; OneVision then shrinks grids larger than ``max_tiles`` tiles
by bilinear interpolation. The geometry lives here once and is used by both the processor (how many tokens
an image fills) and the model (how its features are laid out), so the two agree to the token. Every step
is transformers' LlavaNextImageProcessor / LlavaOnevisionImageProcessor (PIL backend) and their processors'
``_get_number_of_features``, to the pixel and to the token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch
from PIL import Image

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import ConfigError
from vlmkit.processing.image import ImageProcessor, PreparedPlaceholders


@dataclass
class AnyResConfig:
    """LLaVA-NeXT / LLaVA-OneVision AnyRes tiling, shared by the model (reassembling tile features) and the
    processor (tiling, token counts). Empty ``grid_pinpoints``: no tiling (every other family)."""

    grid_pinpoints: list[tuple[int, int]] = field(default_factory=list)  # candidate (height, width) resolutions
    # OneVision's anyres_max_N: tile features beyond N tiles' worth are reduced by bilinear interpolation;
    # 0: never (LLaVA-NeXT)
    max_tiles: int = 0
    # processor only, for prompts with several images. "tile": every image is tiled (LlavaOnevisionProcessor
    # given a flat list of images); "square": each is padded to a square in the mean colour and not tiled
    # (OneVision's own multi-image mode; the processor given a prompt's images as its list [[image, image]], as
    # apply_chat_template gives them): an imported OneVision folder's default
    multi_image: str = "tile"



@dataclass
class AnyResProcessorConfig(ProcessorConfig):
    """LLaVA-NeXT / OneVision's processor: ``image_size`` is a tile, ``image_seq_len`` a tile's tokens."""

    anyres: AnyResConfig = field(default_factory=AnyResConfig)


def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The (height, width) among ``pinpoints`` that keeps most of an image of ``size`` (height, width) when
    it is resized into it with its aspect kept, and among equals wastes the fewest pixels (transformers'
    ``select_best_resolution``; the first candidate wins ties)."""
    h, w = size
    best, best_effective, best_wasted = None, 0, float("inf")
    for th, tw in pinpoints:
        scale = min(tw / w, th / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = th * tw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(th), int(tw)), effective, wasted
    return best


def fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image of ``size`` resized into ``target`` with its aspect kept: one side fills
    the target, the other is rounded up (transformers' ``get_patch_output_size``)."""
    h, w = size
    th, tw = target
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), th), tw
    return th, min(math.ceil(w * scale_h), tw)


def tile_grid(size: tuple[int, int], pinpoints, tile: int) -> tuple[int, int]:
    """(rows, columns) of tiles an image of ``size`` (height, width) is cut into."""
    th, tw = select_best_resolution(size, pinpoints)
    return th // tile, tw // tile


def unpad_slice(size: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int]:
    """(axis, padding): how many feature rows (axis 1) or columns (axis 2) at each end of a reassembled grid
    of ``grid_hw`` features only saw the black padding of an image of ``size`` (transformers' ``unpad_image``:
    the same float expression, so the same rounding)."""
    h, w = size
    cur_h, cur_w = grid_hw
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        return 1, (cur_h - new_h) // 2
    new_w = int(round(w * (cur_h / h), 7))
    return 2, (cur_w - new_w) // 2


def reduced_size(grid_hw: tuple[int, int], side: int, max_tiles: int) -> tuple[int, int] | None:
    """OneVision's anyres_max_N: the (height, width) an unpadded feature grid is interpolated to when it holds
    more than about ``max_tiles`` tiles of ``side`` x ``side`` features (ratio above 1.1); None: kept."""
    if not max_tiles:
        return None
    cur_h, cur_w = grid_hw
    ratio = math.sqrt(cur_h * cur_w / (max_tiles * side**2))
    if ratio <= 1.1:
        return None
    return int(cur_h // ratio), int(cur_w // ratio)


def anyres_layout(size: tuple[int, int], pinpoints, tile: int, side: int, max_tiles: int = 0) -> tuple[int, int]:
    """(rows, columns) of the tile features of an image of ``size`` after unpadding and reduction: the model
    appends a newline to each row, so the image fills ``side**2 + rows * (columns + 1)`` tokens."""
    rows, cols = tile_grid(size, pinpoints, tile)
    cur_h, cur_w = rows * side, cols * side
    axis, pad = unpad_slice(size, (cur_h, cur_w))
    if axis == 1:
        cur_h -= 2 * pad
    else:
        cur_w -= 2 * pad
    return reduced_size((cur_h, cur_w), side, max_tiles) or (cur_h, cur_w)


def anyres_tokens(size: tuple[int, int], pinpoints, tile: int, side: int, max_tiles: int = 0) -> int:
    """LM positions an AnyRes-tiled image fills: the base image's ``side**2`` features, then the unpadded
    (and possibly reduced) tile features with one newline per row."""
    h, w = anyres_layout(size, pinpoints, tile, side, max_tiles)
    return side * side + h * (w + 1)


def check_anyres(pinpoints, tile: int, where: str) -> None:
    """Refuse candidate resolutions that do not cut into whole tiles (transformers would make ragged tiles)."""
    if not pinpoints:
        raise ConfigError(f"{where}: image_grid_pinpoints is empty; AnyRes needs candidate (height, width) "
                          f"resolutions")
    for p in pinpoints:
        if len(p) != 2 or p[0] <= 0 or p[1] <= 0 or p[0] % tile or p[1] % tile:
            raise ConfigError(f"{where}: image_grid_pinpoints entry {list(p)} is not a (height, width) pair of "
                              f"multiples of the tile size {tile}")


class AnyResImageProcessor(PreparedPlaceholders, ImageProcessor):
    """Images -> every tile of every image, [total_tiles, C, H, W] in reading order (each image's base image
    first, then its tiles row by row), with ``extra["image_sizes"]`` [n, 2] (height, width of the original
    image) and ``extra["image_tiles"]`` [n] (tiles per image, base included: the model's split). Tiles are
    ``cfg.image_size`` (square, the tower's size); each tile, and the base image resized to
    (shortest_edge, shortest_edge) or to image_size, goes through the ordinary transform (resize the
    shorter side, centre-crop, normalise). ``cfg.image_seq_len`` is the tokens of one tile."""

    def __init__(self, cfg):
        super().__init__(cfg)
        a = cfg.anyres
        h, w = cfg.image_size
        if h != w:
            raise ConfigError(f"processor image_size {tuple(cfg.image_size)}: AnyRes tiles are square")
        self.tile = h
        check_anyres(a.grid_pinpoints, self.tile, "processor anyres.grid_pinpoints")
        self.side = math.isqrt(cfg.image_seq_len)
        if self.side * self.side != cfg.image_seq_len:
            raise ConfigError(f"processor image_seq_len {cfg.image_seq_len}: an AnyRes tile's features are a "
                              f"square grid")
        if a.multi_image not in ("tile", "square"):
            raise ConfigError(f"processor anyres.multi_image {a.multi_image!r}: expected 'tile' or 'square'")
        if a.max_tiles < 0:
            raise ConfigError(f"processor anyres.max_tiles {a.max_tiles}: expected 0 (no limit) or a tile count")
        edge = cfg.shortest_edge
        self.base_size = (edge, edge) if edge else (h, w)  # (height, width), as transformers' size_tuple
        self.background = tuple(int(m * 255) for m in cfg.mean)  # OneVision's square padding colour

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        """The base image resized to one tile's pre-crop size, then the tiles of the best resolution."""
        w, h = image.size
        th, tw = select_best_resolution((h, w), self.cfg.anyres.grid_pinpoints)
        nh, nw = fit_size((h, w), (th, tw))
        canvas = Image.new("RGB", (tw, th), (0, 0, 0))
        canvas.paste(image.resize((nw, nh), self.transform.resample), ((tw - nw) // 2, (th - nh) // 2))
        t = self.tile
        tiles = [canvas.crop((x, y, x + t, y + t)) for y in range(0, th, t) for x in range(0, tw, t)]
        bh, bw = self.base_size
        return [image.resize((bw, bh), self.transform.resample)] + tiles

    def square(self, image: Image.Image) -> Image.Image:
        """OneVision's multi-image mode: the image centred on a square of the mean colour (not tiled)."""
        w, h = image.size
        if w == h:
            return image
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), self.background)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas

    def __call__(self, images: list[Image.Image]) -> MediaInputs:
        if not images:
            h, w = self.cfg.image_size
            return MediaInputs(torch.zeros(0, 3, h, w), [], {"image_sizes": torch.zeros(0, 2, dtype=torch.long),
                                                             "image_tiles": torch.zeros(0, dtype=torch.long)}, rows=[])
        a = self.cfg.anyres
        square = a.multi_image == "square" and len(images) > 1
        pixels, tokens, sizes, counts = [], [], [], []
        for im in images:
            if square:
                parts = [self.square(im)]
                tokens.append(self.side * self.side + 1)  # the base features and one newline
            else:
                parts = self.tiles(im)
                tokens.append(anyres_tokens((im.height, im.width), a.grid_pinpoints, self.tile, self.side,
                                            a.max_tiles))
            pixels.extend(self.transform(p) for p in parts)
            sizes.append((im.height, im.width))
            counts.append(len(parts))
        return MediaInputs(torch.stack(pixels), tokens, {"image_sizes": torch.tensor(sizes, dtype=torch.long),
                                                         "image_tiles": torch.tensor(counts, dtype=torch.long)},
                           rows=counts)
