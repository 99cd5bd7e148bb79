"""Emu3 (Wang et al. 2024, BAAI): one Llama-like decoder over text and image codes, "next-token prediction is all
you need". Its VQ-VAE (models/emu3_vq.py) turns an image into an h x w grid of codes, and code ``c`` is the LM's
vocabulary token ``<|visual token{c:06d}|>`` (``visual_token_offset + c``: the released vocabulary holds them in
one run). An image in a sequence is

    <|image start|> "h*w" <|image token|>  (h rows of: w visual tokens, <|extra_200|>)  <|extra_201|> <|image end|>

Understanding: the processor writes the ``<image>`` placeholder once per visual and row-end token, and
:meth:`Emu3Model.encode_media` encodes each image to those tokens' embeddings, spliced in at the placeholders
(transformers' ``Emu3Model.get_image_features``). Generation: after a prompt ending ``<|image start|>h*w<|image
token|>`` the LM writes the codes row by row, each row closed by the row-end token, then ``<|extra_201|>``,
``<|image end|>`` and EOS (:meth:`image_plan`); its LM head scores the whole vocabulary (``image_vocab``).

One difference from transformers, on purpose: transformers' image processor pads a call's images to the largest
(zeros at the bottom and right) and encodes them together, so an image's codes depend on the other images of the
call (the VQ-VAE's convolutions and attention see the padding). vlmkit encodes every image alone, at its own size,
so an image's tokens depend on the image only (as the feature caches and the serving engine assume); they equal
transformers' codes for the image processed alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.batch import Batch, Features, MediaInputs
from vlmkit.config import LanguageConfig, ModelConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.fusion.splice import splice_image_features
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.emu3_vq import Emu3VQ, Emu3VQConfig
from vlmkit.models.vlm import GenerativeModel, lm_output
from vlmkit.nn import KVCache, init_linear_

HEADS = ("text", "image")


@dataclass
class Emu3Config(ModelConfig):
    """An Emu3 model: its LM, its VQ-VAE and the ids of the tokens that lay images out (module docstring)."""

    family: str = "emu3"
    lm: LanguageConfig = field(default_factory=LanguageConfig)
    vq: Emu3VQConfig = field(default_factory=Emu3VQConfig)
    image_token: str = "<image>"
    visual_token_offset: int = 0  # the id of <|visual token000000|>; code c is offset + c
    eol_token_id: int = 0  # <|extra_200|>: ends each row of codes
    eof_token_id: int = 0  # <|extra_201|>: after the last row
    eoi_token_id: int = 0  # <|image end|>
    eos_token_id: int = 0  # what image generation writes after <|image end|>
    # the (rows, columns) of codes of a generated image: Emu3Processor's default, ratio 1:1 over image_area 518400
    # pixels at spatial factor 8 (90 x 90)
    image_grid: tuple[int, int] = (90, 90)

    def __post_init__(self):
        self.image_grid = tuple(int(v) for v in self.image_grid)
        if len(self.image_grid) != 2 or min(self.image_grid) < 1:
            raise ConfigError(f"emu3 image_grid {self.image_grid} must be (rows, columns) of codes, both >= 1")
        end = self.visual_token_offset + self.vq.codebook_size
        if self.visual_token_offset < 0 or end > self.lm.vocab_size:
            raise ConfigError(f"emu3 visual_token_offset {self.visual_token_offset} + vq.codebook_size "
                              f"{self.vq.codebook_size} = {end} must fit lm.vocab_size {self.lm.vocab_size}")
        for name in ("eol_token_id", "eof_token_id", "eoi_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.lm.vocab_size:
                raise ConfigError(f"emu3 {name} {getattr(self, name)} is outside lm.vocab_size {self.lm.vocab_size}")


class Emu3Model(GenerativeModel):
    """The VQ-VAE's codes as LM tokens of a ``DecoderLM`` (module docstring). The VQ-VAE is frozen."""

    def __init__(self, cfg: Emu3Config, image_token_id: int):
        super().__init__()
        self.cfg = cfg
        self.lm = DecoderLM(cfg.lm)
        self.vq = Emu3VQ(cfg.vq)
        self.image_token_id = image_token_id

    # ------------------------------------------------------------------------------------------ understanding
    def image_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [h, w] -> the LM ids of the image's rows, each closed by the row-end token, flat [h * (w + 1)]."""
        ids = self.code_ids(codes)
        eol = torch.full((ids.shape[0], 1), self.cfg.eol_token_id, dtype=ids.dtype, device=ids.device)
        return torch.cat([ids, eol], dim=1).flatten()

    def encode_media(self, media: MediaInputs) -> Features:
        """The processor's images (each one's pixels flat [H * W, 3] and ``extra["image_sizes"]`` (H, W)) -> the
        embeddings of their visual and row-end tokens, flat [total tokens, D], each image encoded alone."""
        sizes = media.extra.get("image_sizes")
        if sizes is None or media.pixel_values.ndim != 2:
            raise DataError("emu3 encodes images from its processor's MediaInputs (pixels [H * W, 3] per image "
                            "and extra['image_sizes']), not from a bare pixel tensor")
        ids, start = [], 0
        for h, w in sizes.tolist():
            pixels = media.pixel_values[start:start + h * w].t().reshape(1, 3, h, w)
            start += h * w
            ids.append(self.image_tokens(self.vq.encode_codes(pixels)[0]))
        flat = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=media.pixel_values.device)
        return Features(self.lm.embed_tokens(flat), [len(i) for i in ids])

    def forward(self, batch: Batch, cache: KVCache | None = None, logits_to_keep: int = 0, head: str = "text"):
        """The loss or the logits over the whole vocabulary; ``head="image"`` gives the same logits, whose column
        j stands for model input id ``image_vocab[j]`` = j (Emu3 has one head)."""
        if head not in HEADS:
            raise ValueError(f"emu3 forward head {head!r}; valid: {', '.join(HEADS)}")
        features = self.media_features(batch)
        ids = batch.input_ids.masked_fill(batch.input_ids == self.image_token_id, 0)
        embeds = splice_image_features(self.lm.embed_tokens(ids), batch.input_ids, self.image_token_id,
                                       features.values if features is not None else None)
        hidden = self.lm(embeds, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                         mask=self.attention(batch, cache), cache=cache)
        return lm_output(self.lm.lm_head, hidden, batch.labels, logits_to_keep)

    def module_groups(self) -> dict[str, nn.Module]:
        return {"vq": self.vq, "lm": self.lm}

    def image_tower(self) -> nn.Module:
        raise NotImplementedError("emu3 has no image tower to pretrain: its frozen VQ-VAE turns images into tokens "
                                  "the LM reads (objective lm only)")

    # ------------------------------------------------------------------------------------------ image generation
    @property
    def image_grid(self) -> tuple[int, int]:
        return tuple(self.cfg.image_grid)

    def image_plan(self, h: int, w: int) -> list[int | None]:
        """After ``<|image start|>h*w<|image token|>``: each row's w codes and the row-end token, then
        ``<|extra_201|>``, ``<|image end|>`` and EOS (Emu3's generation constraint)."""
        c = self.cfg
        return ([None] * w + [c.eol_token_id]) * h + [c.eof_token_id, c.eoi_token_id, c.eos_token_id]

    def code_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids -> the LM's visual-token ids (same shape)."""
        return codes.long() + self.cfg.visual_token_offset

    @property
    def image_vocab(self) -> torch.Tensor:
        return torch.arange(self.cfg.lm.vocab_size)

    @property
    def codebook_size(self) -> int:
        return self.cfg.vq.codebook_size

    def encode_codes(self, pixels: torch.Tensor | MediaInputs) -> torch.Tensor:
        """Images [n, 3, H, W] (H, W multiples of the VQ's factor) -> codes [n, H / f, W / f]; or the processor's
        MediaInputs of images of one size (its pixels are flat per image: images of several sizes have grids of
        several shapes, which one tensor cannot hold)."""
        if isinstance(pixels, MediaInputs):
            sizes = pixels.extra.get("image_sizes")
            if sizes is None or len(sizes) and bool((sizes != sizes[0]).any()):
                raise DataError("emu3 encode_codes: the images were resized to different sizes "
                                f"({[tuple(s) for s in (sizes.tolist() if sizes is not None else [])]}), whose code "
                                "grids have different shapes; encode them one at a time")
            h, w = sizes[0].tolist() if len(sizes) else (0, 0)
            pixels = pixels.pixel_values.reshape(len(sizes), h * w, 3).transpose(1, 2).reshape(len(sizes), 3, h, w)
        elif pixels.ndim == 2:
            raise DataError("emu3 encode_codes takes images [n, 3, H, W] or its processor's MediaInputs; a flat "
                            f"pixel tensor {tuple(pixels.shape)} (the processor's layout) does not say their sizes")
        return self.vq.encode_codes(pixels)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [n, h, w] -> images [n, 3, h * f, w * f] (normalised as the processor's input; not clamped)."""
        return self.vq.decode_codes(codes)


def build_emu3(cfg: Emu3Config, image_token_id: int, init: bool = True) -> Emu3Model:
    """An Emu3Model; ``init`` is GPT-2's initialisation of the LM (the VQ-VAE of a from-scratch model would need
    its own training: vlmkit imports Emu3, it does not train one)."""
    model = Emu3Model(cfg, image_token_id)
    if init and not any(p.is_meta for p in model.parameters()):
        with torch.no_grad():
            init_linear_(model.lm)
    return model


__all__ = ["Emu3Config", "Emu3Model", "build_emu3"]
