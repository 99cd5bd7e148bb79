"""Image loading and transforms (resize, rescale, normalise) written on PIL + torch.

Hand-written because torchvision does not work with the CPU torch build these machines use; the steps are
the same as the Hugging Face image processors: resize with PIL, rescale by 1/255, normalise per channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmkit.errors import DataError
from vlmkit.registry import Registry

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

MAX_IMAGE_PIXELS = 64_000_000


def load_image(source, where: str = "") -> Image.Image:
    """Open a path or pass a PIL image through, as RGB. Missing or corrupt files raise DataError naming them."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    ctx = f" ({where})" if where else ""
    if not path.is_file():
        raise DataError(f"image file not found: {path}{ctx}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataError(f"image {path}{ctx} has {im.width}x{im.height} pixels, more than {MAX_IMAGE_PIXELS}")
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}{ctx}: {e}") from e


class ImageTransform:
    """PIL image -> normalised float tensor [C, H, W] of a fixed (height, width).

    With ``shortest_edge`` the shorter side is resized to it first (the longer one to
    ``int(shortest_edge * long / short)``), then the centre is cropped to (height, width) with the top-left
    corner at ``((H' - height) // 2, (W' - width) // 2)``: CLIP's image processor, to the pixel."""

    def __init__(self, size: tuple[int, int], mean, std, resample: str = "bicubic", shortest_edge: int = 0):
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}, got {resample!r}")
        if shortest_edge and shortest_edge < max(size):
            raise ValueError(f"shortest_edge {shortest_edge} is smaller than the crop {tuple(size)}: the crop "
                             f"would need padding; use shortest_edge >= {max(size)}")
        self.shortest_edge = int(shortest_edge)
        self.size = (int(size[0]), int(size[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.resample = RESAMPLE[resample]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        h, w = self.size
        if self.shortest_edge:
            iw, ih = image.size
            short, long = min(iw, ih), max(iw, ih)
            s, l = self.shortest_edge, int(self.shortest_edge * long / short)
            rw, rh = (s, l) if iw <= ih else (l, s)
            if (rw, rh) != (iw, ih):
                image = image.resize((rw, rh), self.resample)
            top, left = (rh - h) // 2, (rw - w) // 2
            image = image.crop((left, top, left + w, top + h))
        elif image.size != (w, h):
            image = image.resize((w, h), self.resample)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std  # [3, H, W]


@dataclass
class ImageInputs:
    """The images of one prompt (or a batch of prompts) as the model takes them.

    Every tensor is batched along dim 0 in reading order, so the inputs of several prompts concatenate
    (:meth:`cat`): fixed-size images are [n, C, H, W]; tiling families put all tiles in one [n_tiles, C, H, W]
    and say which belong to which image in ``extra`` (e.g. ``image_sizes``, ``image_grid_thw``).
    ``tokens`` is how many LM positions each image fills; ``texts``, when a family marks tiles in the text
    (Idefics3's row/column markers), is what each image placeholder becomes before tokenisation.
    """

    pixel_values: torch.Tensor
    tokens: list[int]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def to(self, device) -> ImageInputs:
        return ImageInputs(self.pixel_values.to(device), list(self.tokens),
                           {k: v.to(device) for k, v in self.extra.items()}, self.texts)

    @classmethod
    def cat(cls, items: list[ImageInputs]) -> ImageInputs:
        if not items:
            raise ValueError("ImageInputs.cat needs at least one item")
        texts = None if any(i.texts is None for i in items) else [t for i in items for t in i.texts]
        extra = {k: torch.cat([i.extra[k] for i in items]) for k in items[0].extra}
        return cls(torch.cat([i.pixel_values for i in items]), [t for i in items for t in i.tokens], extra, texts)


class ImageProcessor:
    """Images -> :class:`ImageInputs` for one family; the Processor calls it. This base resizes every image to
    the one fixed size of ``ProcessorConfig`` (CLIP/SigLIP-style), each filling ``image_seq_len`` tokens.
    Families that tile or resize dynamically subclass it and register under IMAGE_PROCESSORS."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.transform = ImageTransform(cfg.image_size, cfg.mean, cfg.std, cfg.resample, cfg.shortest_edge)

    def __call__(self, images: list[Image.Image]) -> ImageInputs:
        if not images:
            h, w = self.cfg.image_size
            return ImageInputs(torch.zeros(0, 3, h, w), [])
        return ImageInputs(torch.stack([self.transform(im) for im in images]), [self.cfg.image_seq_len] * len(images))

    # Text hooks for families whose processor lays out the prompt itself (PaliGemma); the Processor consults
    # them in whole-string mode. None, the default, keeps the Processor's generic path.

    # BLIP-2 / InstructBLIP: the family's processor writes every image's tokens before the prompt, which is
    # tokenised on its own with the tokenizer's special tokens (BOS after the images); prompts hold no placeholder
    images_first: bool = False

    # format_prompt's text is tokenised with the tokenizer's special tokens (Mllama: MllamaProcessor lays the
    # prompt out, then its tokenizer adds BOS), not without them (PaliGemma writes them into the text)
    prompt_special_tokens: bool = False

    def format_prompt(self, prompt: str, n_images: int) -> str | None:
        """The text the family's own processor builds around a raw ``prompt`` with ``n_images`` images (image
        placeholders not yet expanded), tokenised *without* the tokenizer's special tokens: the family writes
        them into the text. None: the prompt is used as it is, with the tokenizer's special tokens."""
        return None

    def format_continuation(self, continuation: str) -> str | None:
        """The text a scored continuation is tokenised from *on its own*, its ids appended to the prompt's.
        None: the continuation's tokens are those that follow the prompt's when both are tokenised together."""
        return None

    def format_supervised(self, text: str, spans: list[tuple[int, int]],
                          n_images: int) -> tuple[str, list[tuple[int, int]]] | None:
        """A rendered conversation laid out as ``format_prompt`` lays out a prompt (IDEFICS), with its supervised
        character ``spans`` moved along, tokenised without the tokenizer's special tokens. None: no layout."""
        return None


IMAGE_PROCESSORS: Registry[ImageProcessor] = Registry("image processor")
IMAGE_PROCESSORS.register("fixed", "every image resized (or shortest-edge resized and centre-cropped) to one size")(
    ImageProcessor)
