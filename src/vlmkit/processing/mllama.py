"""Llama 3.2 Vision (Mllama) images and prompts, as transformers' MllamaImageProcessor (PIL backend) and
MllamaProcessor.

Images: each is resized, aspect kept, to fit the best canvas of rows x cols tiles (rows * cols <= max_tiles; the
smallest upscale that fits, else the largest downscale, the smaller canvas among equals), padded with black at the
bottom and right to the canvas, rescaled and normalised, and cut into tiles row by row; every image then takes
exactly ``max_tiles`` tiles, the unused ones all zeros (the tower reads them too). ``extra`` carries, per image,
its ``aspect_ratio_ids`` (1 + the index of its layout among :func:`~vlmkit.encoders.mllama.aspect_ratios`),
``aspect_ratio_mask`` [max_tiles] (its real tiles) and ``num_tiles``. Each image is one ``<|image|>`` token in the
text: the LM reads the image through cross-attention, not through spliced tokens.

Text: MllamaProcessor puts BOS after the image tokens a prompt starts with (none when the prompt already contains
BOS), then tokenises with the tokenizer's special tokens (which add another BOS in front, as Llama 3's do) unless
the text begins with BOS: transformers' default call would put BOS twice in front of a prompt that does not begin
with an image; vlmkit follows its documented call for such text (``add_special_tokens=False``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import ConfigError
from vlmkit.processing.image import ImageProcessor
from vlmkit.processing.layouts import TemplateLayout


def aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """The (rows, cols) tile layouts with rows * cols <= ``max_tiles``, in the order of their ids (id i + 1 is the
    i-th; 0 means no image): transformers' ``get_all_supported_aspect_ratios``."""
    return [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles]


def best_canvas(size: tuple[int, int], max_tiles: int, tile: int) -> tuple[int, int]:
    """(height, width) of the tile canvas for an image of ``size`` (height, width): transformers'
    ``get_optimal_tiled_canvas``."""
    h, w = size
    canvases = [(r * tile, c * tile) for r, c in aspect_ratios(max_tiles)]
    scales = [min(ch / h, cw / w) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    fits = [c for c, s in zip(canvases, scales) if s == chosen]
    return min(fits, key=lambda c: c[0] * c[1])  # the first of the smallest area


def fit_to_canvas(size: tuple[int, int], canvas: tuple[int, int], tile: int) -> tuple[int, int]:
    """(height, width) an image of ``size`` is resized to, aspect kept, in ``canvas``, no side made smaller than
    a tile or larger than the canvas: transformers' ``get_image_size_fit_to_canvas``."""
    h, w = size
    target_h, target_w = min(max(h, tile), canvas[0]), min(max(w, tile), canvas[1])
    scale_h, scale_w = target_h / h, target_w / w
    if scale_w < scale_h:
        return min(math.floor(h * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(w * scale_h) or 1, target_w)


def mllama_prompt(prompt: str, bos_token: str, image_token: str) -> str:
    """MllamaProcessor's text (``build_string_from_input``): BOS after the leading image tokens, unless the prompt
    has one already."""
    if bos_token in prompt:
        return prompt
    n = 0
    while prompt.startswith(image_token):
        prompt = prompt[len(image_token):]
        n += 1
    return image_token * n + bos_token + prompt


class MllamaImageProcessor(ImageProcessor):
    """Images -> MediaInputs of [n * max_tiles, C, tile, tile] with the per-image ``extra`` described in the
    module docstring; ``cfg.image_size`` is the (square) tile."""

    def __init__(self, cfg):
        super().__init__(cfg)
        h, w = cfg.image_size
        if h != w:
            raise ConfigError(f"processor image_size {tuple(cfg.image_size)}: Mllama's tiles are square")
        if cfg.max_image_tiles < 1:
            raise ConfigError(f"processor max_image_tiles {cfg.max_image_tiles}: expected a tile count >= 1")
        self.tile, self.max_tiles = h, cfg.max_image_tiles
        self.layouts = aspect_ratios(self.max_tiles)

    def tiles(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (its tiles [rows * cols, C, tile, tile], (rows, cols))."""
        size = (image.height, image.width)
        canvas = best_canvas(size, self.max_tiles, self.tile)
        nh, nw = fit_to_canvas(size, canvas, self.tile)
        pixels = np.zeros((canvas[0], canvas[1], 3), dtype=np.uint8)  # black padding, bottom and right
        pixels[:nh, :nw] = np.asarray(image.resize((nw, nh), self.transform.resample), dtype=np.uint8)
        x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
        x = (x - self.transform.mean) / self.transform.std  # [3, H, W]
        rows, cols, t = canvas[0] // self.tile, canvas[1] // self.tile, self.tile
        x = x.reshape(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
        return x, (rows, cols)

    def placeholders(self, images: list, where: str = "") -> MediaInputs:
        """One token per image, whatever its tiles (their pixels are not read)."""
        return MediaInputs(torch.zeros(len(images), 0), [1] * len(images))

    def __call__(self, images: list[Image.Image]) -> MediaInputs:
        T, t = self.max_tiles, self.tile
        pixels = torch.zeros(len(images) * T, 3, t, t)
        ids = torch.zeros(len(images), dtype=torch.long)
        mask = torch.zeros(len(images), T, dtype=torch.long)
        for i, im in enumerate(images):
            tiles, layout = self.tiles(im)
            pixels[i * T:i * T + len(tiles)] = tiles
            ids[i] = self.layouts.index(layout) + 1
            mask[i, :len(tiles)] = 1
        return MediaInputs(pixels, [1] * len(images), {"aspect_ratio_ids": ids, "aspect_ratio_mask": mask,
                                                       "num_tiles": mask.sum(-1)}, rows=[T] * len(images))



class MllamaLayout(TemplateLayout):
    """MllamaProcessor's layout, for imported models (whole-string text with a BOS token): BOS after the leading image
    tokens (:func:`mllama_prompt`), then the tokenizer's special tokens, except on a chat template's text that starts
    with BOS (as transformers' apply_chat_template)."""

    def prompt(self, text, media, where="prompt"):
        laid = mllama_prompt(text, self.tokenizer.bos_token, self.cfg.image_token)
        return self._prompt_of(self.tokenize(laid, [], media, where, special=not self.starts_with_bos(laid)))

    def chat(self, messages, media, where="prompt"):
        if not self.cfg.chat_template_jinja:
            question = self.one_question(messages, where, "this folder has no chat template, so the model")
            return self.prompt(question, media, where)
        text = self.render(self.images_in_front(messages, len(media)), generation=True)
        laid = mllama_prompt(text, self.tokenizer.bos_token, self.cfg.image_token)
        return self._prompt_of(self.tokenize(laid, [], media, where, special=not self.starts_with_bos(laid)))


@dataclass
class MllamaProcessorConfig(ProcessorConfig):
    """Mllama's processor: ``image_size`` is the (square) tile; an image is cut into at most ``max_image_tiles``."""

    max_image_tiles: int = 4
