"""Chameleon (Chameleon Team 2024; Meta's chameleon-7b / -30b): an early-fusion decoder that reads and writes images
as tokens of its one vocabulary.

- Images: a VQ-GAN encoder (models/vq.py: taming's modules with attention in ``mid``; the released checkpoints
  and transformers' ``ChameleonVQVAE`` have the encoder alone) maps a 512x512 image to a 32x32 grid of codes; each
  code is a token of the LM's vocabulary through the vocabulary map (``code_token_ids``: code j -> the id of the
  token ``IMGIMG<j in letters A-J>Z``, transformers' ``ChameleonImageVocabularyMapping.img2bpe``). The processor
  writes ``<image>`` tokens where an image goes (processing/chameleon.py); the model puts the image's code tokens
  there and embeds everything with the LM's own embedding table: there is no connector.
- The LM is Llama with a LayerNorm over each head's queries and keys whose weights are per head (lm/decoder.py's
  ``qk_norm_kind: head_layernorm``) and, in chameleon-30b, ``swin_norm`` (norms after attention and MLP).
- Text logits (``head="text"``): the image-code tokens are suppressed (set to the dtype's minimum, as
  transformers' ChameleonForConditionalGeneration does for every forward), so text generation and scoring never
  see them; ``head="image"`` gives the full vocabulary's logits, whose column j is token j (``image_vocab``).
- Loss: image targets (code tokens, ``<eoss>``) over the full vocabulary, text targets through the text head, each
  kind's sum reported apart (``ModelOutput.parts``): the ``lm`` objective on conversations and the ``unified``
  objective (text-to-image pairs too) both train it.
- Image generation's interface: ``image_grid`` (the VQ grid), ``codebook_size``, ``image_plan`` (the codes, then ``<eoss>``),
  ``code_ids`` (the vocabulary map), ``encode_codes``; ``decode_codes`` needs a VQ decoder, which an imported
  model does not have (a ConfigError says so).

Features (``encode_media``) are the image's code *token ids* [n, h * w], spliced into the ids before the
embedding lookup: the same numbers as embedding them first, with no float copy of each image's embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.batch import Batch, Features, MediaInputs, ModelOutput
from vlmkit.config import LanguageConfig, ModelConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.vlm import GenerativeModel, lm_output
from vlmkit.models.vq import VQConfig, VQModel, build_vq
from vlmkit.nn import KVCache

IMAGE_TOKEN = "<image>"
IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"


def chameleon_lm(**kw) -> LanguageConfig:
    """A LanguageConfig of Chameleon's kind: Llama with per-head query / key LayerNorms; ``kw`` sets the shape."""
    return LanguageConfig(**{"qk_norm": True, "qk_norm_kind": "head_layernorm", "norm_eps": 1e-5, **kw})


def chameleon_vq(**kw) -> VQConfig:
    """Chameleon's VQ-GAN encoder (chameleon-7b's vq_config): 512x512 -> 32x32 codes of 8192, attention in mid."""
    base = dict(image_size=(512, 512), channels=128, channel_mult=(1, 1, 2, 2, 4), res_blocks=2, norm_groups=32,
                code_dim=256, z_channels=256, codebook_size=8192, quantizer="ste", restart_after=0, mid_attn=True,
                decoder=False)
    return VQConfig(**{**base, **kw})


@dataclass
class ChameleonConfig(ModelConfig):
    """A Chameleon model: its LM, its VQ tokenizer, and the vocabulary map (module docstring)."""

    family: str = "chameleon"
    lm: LanguageConfig = field(default_factory=chameleon_lm)
    vq: VQConfig = field(default_factory=chameleon_vq)
    code_token_ids: tuple[int, ...] = ()  # code j -> its token id (img2bpe); one per codebook entry
    image_token: str = IMAGE_TOKEN
    image_end_token_id: int | None = None  # <eoss>, written after an image's codes
    # a from-scratch model's VQ tokenizer: a trained vlmkit VQ checkpoint (config and weights, families/vq.py)
    vq_from: str = ""

    def __post_init__(self):
        self.code_token_ids = tuple(int(i) for i in self.code_token_ids)
        if len(self.code_token_ids) != self.vq.codebook_size:
            raise ConfigError(f"chameleon code_token_ids has {len(self.code_token_ids)} ids; the VQ codebook has "
                              f"{self.vq.codebook_size} codes and each needs its token (the vocabulary map)")
        bad = [i for i in self.code_token_ids if not 0 <= i < self.lm.vocab_size]
        if bad:
            raise ConfigError(f"chameleon code_token_ids {bad[:5]} are outside the LM's vocabulary "
                              f"(0..{self.lm.vocab_size - 1})")


class ChameleonModel(GenerativeModel):
    """VQ codes as vocabulary tokens in a Chameleon LM (module docstring)."""

    def __init__(self, vq: VQModel, lm: DecoderLM, code_token_ids: list[int], image_token_id: int,
                 image_end_token_id: int | None = None):
        super().__init__()
        self.vq, self.lm = vq, lm
        self.image_token_id, self.image_end_token_id = image_token_id, image_end_token_id
        self.register_buffer("code_tokens", torch.tensor(code_token_ids, dtype=torch.long), persistent=False)
        self.register_buffer("suppressed", torch.tensor(sorted(set(code_token_ids)), dtype=torch.long),
                             persistent=False)

    # ------------------------------------------------------------------ reading images

    def code_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ code ids (any shape) -> the model's input ids of those codes (the vocabulary map)."""
        return self.code_tokens.to(codes.device)[codes]

    def encode_media(self, media: MediaInputs) -> Features:
        """Images [n, 3, H, W] -> their code tokens [n, h * w] (row-major), each image one row."""
        codes = self.vq.encode_codes(media.pixel_values)
        return Features(self.code_ids(codes).reshape(len(codes), -1), media.item_rows())

    def embed(self, input_ids: torch.Tensor, features: Features | None) -> torch.Tensor:
        is_image = input_ids == self.image_token_id
        n_slots, n_codes = int(is_image.sum()), 0 if features is None else features.values.numel()
        if n_slots != n_codes:
            raise DataError(f"{n_slots} image placeholder tokens in the batch but {n_codes} image codes; the "
                            f"processor must expand each <image> to the VQ grid's {self.vq.grid[0] * self.vq.grid[1]}")
        if n_slots:
            input_ids = input_ids.masked_scatter(is_image, features.values.to(input_ids.device))
        return self.lm.embed_tokens(input_ids)

    def forward(self, batch: Batch, cache: KVCache | None = None, logits_to_keep: int = 0,
                head: str = "text") -> ModelOutput:
        """The loss or logits of ``batch``. ``head="text"``: code tokens suppressed (module docstring);
        ``head="image"``: the full vocabulary, column j = token j (:attr:`image_vocab`)."""
        if head not in ("text", "image"):
            raise ValueError(f"head must be 'text' or 'image', got {head!r}")
        embeds = self.embed(batch.input_ids, self.media_features(batch))
        hidden = self.lm(embeds, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                         mask=self.attention(batch, cache), cache=cache)
        if batch.labels is not None and head == "text":
            return self.loss(hidden, batch.labels)
        return lm_output(self.lm.lm_head if head == "image" else self.text_head, hidden, batch.labels,
                         logits_to_keep)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> ModelOutput:
        """Next-token cross-entropy: image targets (code tokens and ``<eoss>``, as ``image_plan`` writes them) over
        the full vocabulary, text targets through the text head (code tokens suppressed, as transformers); the mean
        over all supervised tokens, and each kind's sum and count (``ModelOutput.parts``, the unified objective's)."""
        targets = labels[:, 1:]
        keep = targets != -100
        h, t = hidden[:, :-1][keep], targets[keep]
        is_image = torch.isin(t, self.image_targets.to(t.device))
        parts = {}
        for name, sel, head in (("text", ~is_image, self.text_head), ("image", is_image, self.lm.lm_head)):
            n = int(sel.sum())
            total = F.cross_entropy(head(h[sel]).float(), t[sel], reduction="sum") if n else h.sum() * 0.0
            parts[name] = (total, n)
        n = int(keep.sum())
        loss = (parts["text"][0] + parts["image"][0]) / n if n else hidden.sum() * float("nan")
        return ModelOutput(loss=loss, n_tokens=n, parts=parts)

    @property
    def image_targets(self) -> torch.Tensor:
        end = [] if self.image_end_token_id is None else [self.image_end_token_id]
        return torch.cat([self.suppressed, torch.tensor(end, dtype=torch.long, device=self.suppressed.device)])

    def text_head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm.lm_head(hidden)
        return logits.index_fill(-1, self.suppressed, torch.finfo(logits.dtype).min)

    # ------------------------------------------------------------------ writing images

    @property
    def image_vocab(self) -> torch.Tensor:
        return torch.arange(self.lm.cfg.vocab_size, device=self.code_tokens.device)

    @property
    def image_grid(self) -> tuple[int, int]:
        return self.vq.grid

    @property
    def codebook_size(self) -> int:
        return self.vq.codebook_size

    def image_plan(self, h: int, w: int) -> list[int | None]:
        """An image's tokens after ``<racm3:break>``: h * w codes, then ``<eoss>``."""
        if self.image_end_token_id is None:
            raise ConfigError("this chameleon model's config has no image_end_token_id (the tokenizer's <eoss>)")
        return [None] * (h * w) + [self.image_end_token_id]

    def encode_codes(self, pixels) -> torch.Tensor:
        """Images [n, 3, H, W], or the processor's MediaInputs of them -> code ids [n, h, w]."""
        return self.vq.encode_codes(pixels)

    @property
    def can_decode_codes(self) -> bool:
        return self.vq.decoder is not None

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> pixels through the VQ decoder; Chameleon's released VQ has none (ConfigError, models/vq.py)."""
        if self.vq.decoder is None:
            raise ConfigError("chameleon's VQ tokenizer has no decoder: the released checkpoints and transformers' "
                              "ChameleonVQVAE ship the encoder alone, so image codes cannot be turned into pixels "
                              "(model.vq.decoder: false)")
        return self.vq.decode_codes(codes)

    # ------------------------------------------------------------------ training

    def module_groups(self) -> dict[str, nn.Module]:
        return {"vision": self.vq, "lm": self.lm}

    def image_tower(self) -> nn.Module:
        raise ConfigError("chameleon reads images as discrete VQ codes: there is no image tower to pretrain "
                          "(objective cell_labels)")


def build_chameleon(cfg: ChameleonConfig, image_token_id: int, init: bool = True) -> ChameleonModel:
    """A ChameleonModel of ``cfg`` (``init``: vlmkit's VQ init; imported models load every weight)."""
    return ChameleonModel(build_vq(cfg.vq, init), DecoderLM(cfg.lm), list(cfg.code_token_ids), image_token_id,
                          cfg.image_end_token_id)


__all__ = ["IMAGE_END", "IMAGE_START", "IMAGE_TOKEN", "ChameleonConfig", "ChameleonModel", "build_chameleon",
           "chameleon_lm", "chameleon_vq"]
