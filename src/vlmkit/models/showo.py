"""Show-o (Xie et al. 2024, "Show-o: One Single Transformer to Unify Multimodal Understanding and Generation"): one
decoder LM that reads text and images and writes images by discrete diffusion (mask-predict) over VQ codes, with
the omni-attention mask.

Decisions, at vlmkit's tiny scale:

- **One vocabulary.** The LM's ids are the text tokenizer's ``V`` ids, then the ``K`` codes of the VQ tokenizer
  (code ``k`` is model id ``V + k``: :meth:`ShowoModel.code_ids`), then one ``[MASK]`` id ``V + K``
  (:attr:`ShowoModel.mask_id`). The tokenizer itself holds only text (and the special tokens ``<|t2i|>``,
  ``<|mmu|>``, ``<|soi|>``, ``<|eoi|>``, families/showo.py); the code and mask ids are the model's own.
- **Reading images** (``mmu``): as Show-o v1 reads MAGVIT codes, through the same embedding table. The processor
  writes ``<|mmu|> <|soi|>``, ``h * w`` image placeholders and ``<|eoi|>`` for each image (processing/showo.py);
  :meth:`encode_media` turns the prepared pixels into codes with the frozen VQ encoder and embeds them
  (``Features`` [n, h*w, D], spliced at the placeholders), so conversations come through the normal processor and
  collate path. The codes are discrete: no gradient reaches the VQ, and there is no tower output to precompute.
- **Omni-attention** (:meth:`ShowoModel.attention`): the causal (or packed-document) mask plus
  ``nn.with_blocks`` over the image blocks, a block being a maximal run of image placeholders, code ids and
  ``[MASK]`` ids (``nn.block_ids``, which also splits runs at packed-sample starts): text is causal, each image is
  bidirectional, and text never sees a later image. After a KV cache the tokens just read form blocks of their
  own (the cached keys are in none): a block is read in one forward (a prefill), never split across decoding steps.
- **The loss** (:meth:`ShowoModel.loss`): text labels (< ``V``) are next-token targets through the text head
  (code and mask columns suppressed, so text generation never writes one); code labels (>= ``V``) are
  *same-position* targets, mask-predict's: the original code at a ``[MASK]`` input, over the ``K`` code columns.
  Each kind's sum and count are reported apart (``ModelOutput.parts``) so that the unified objective weights them.
  Which codes are masked is the family's ``t2i_training_tokens`` (families/showo.py).
- **Drawing**: ``forward(head="image")`` gives the ``K`` code columns at every position; the family's
  ``draw_images`` unmasks a grid with them (mask_predict.py). Positions are the LM's RoPE positions (no 2-D
  embedding: inside a bidirectional block relative offsets are seen both ways).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.batch import Batch, Features, MediaInputs, ModelOutput
from vlmkit.config import LanguageConfig, ModelConfig
from vlmkit.errors import ConfigError
from vlmkit.fusion.splice import splice_image_features
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import init_lm_from_scratch
from vlmkit.models.vlm import GenerativeModel
from vlmkit.models.vq import VQConfig, VQModel, build_vq
from vlmkit.nn import KVCache, block_attention

HEADS = ("text", "image")
MAX_STEPS = 1000  # ImageGenerationConfig's bound on gen.steps


@dataclass
class ShowoGenConfig:
    """Show-o's image side: the VQ tokenizer, where a from-scratch model takes it from, the sampler's default."""

    vq: VQConfig = field(default_factory=VQConfig)
    # a vlmkit VQ checkpoint (``vlmkit train tiny-vq``'s final folder) whose config and weights a from-scratch model
    # takes for its tokenizer; "": the ``vq`` config (untrained unless a checkpoint fills it)
    vq_from: str = ""
    steps: int = 12  # unmasking steps when a request gives 0 (MaskGIT's and Show-o's 12-16 at 256 codes)


@dataclass
class ShowoConfig(ModelConfig):
    """A Show-o model: its LM (vocabulary ``V + K + 1``), its VQ tokenizer and the ids its layout writes."""

    family: str = "showo"
    lm: LanguageConfig = field(default_factory=LanguageConfig)
    gen: ShowoGenConfig = field(default_factory=ShowoGenConfig)
    text_vocab: int = 0  # V: the text tokenizer's ids; 0 = lm.vocab_size - K - 1 (set by the family's configure)
    eoi_token_id: int | None = None  # <|eoi|>, written after an image's codes

    def __post_init__(self):
        k = self.gen.vq.codebook_size
        if not self.gen.vq.decoder:
            raise ConfigError("model.gen.vq.decoder must be true: Show-o draws by decoding its codes with the VQ "
                              "decoder (give a VQ config with a decoder, e.g. tiny-vq's, or model.gen.vq_from)")
        if not 1 <= self.gen.steps <= MAX_STEPS:
            raise ConfigError(f"model.gen.steps must be in 1..{MAX_STEPS} (the default unmasking steps), got "
                              f"{self.gen.steps}")
        v = self.text_vocab or self.lm.vocab_size - k - 1
        if v < 1 or self.lm.vocab_size != v + k + 1:
            raise ConfigError(f"model.lm.vocab_size must be the text vocabulary + {k} codes + 1 mask id; got "
                              f"{self.lm.vocab_size} with model.text_vocab {self.text_vocab}")
        if self.eoi_token_id is not None and not 0 <= self.eoi_token_id < v:
            raise ConfigError(f"model.eoi_token_id must be a text id (0..{v - 1}), got {self.eoi_token_id}")


class ShowoModel(GenerativeModel):
    """Text, code and mask ids in one DecoderLM with omni-attention (module docstring)."""

    def __init__(self, cfg: ShowoConfig, vq: VQModel, lm: DecoderLM, image_token_id: int | None):
        super().__init__()
        self.vq, self.lm, self.cfg = vq, lm, cfg
        self.image_token_id = image_token_id if image_token_id is not None else -1
        self.vocab_size = cfg.lm.vocab_size - vq.codebook_size - 1  # V
        self.mask_id = cfg.lm.vocab_size - 1  # V + K
        self.eoi_token_id = cfg.eoi_token_id

    # ------------------------------------------------------------------ ids
    @property
    def codebook_size(self) -> int:
        return self.vq.codebook_size

    @property
    def image_grid(self) -> tuple[int, int]:
        return self.vq.grid

    @property
    def image_seq_len(self) -> int:
        h, w = self.vq.grid
        return h * w

    @property
    def default_steps(self) -> int:
        return self.cfg.gen.steps

    def code_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.vocab_size

    @property
    def image_vocab(self) -> torch.Tensor:
        """The ids of ``forward(head="image")``'s columns: the codes."""
        return torch.arange(self.codebook_size) + self.vocab_size

    def image_plan(self, h: int, w: int) -> list[int | None]:
        """An image's tokens after ``<|soi|>``: its h * w codes, then ``<|eoi|>``."""
        if self.eoi_token_id is None:
            raise ConfigError("this showo model's config has no eoi_token_id (the tokenizer's <|eoi|>)")
        return [None] * (h * w) + [self.eoi_token_id]

    @property
    def reserved_token_ids(self) -> tuple[int, ...]:
        """The image placeholder; codes and [MASK] are outside what the text head predicts."""
        return (self.image_token_id,) if self.image_token_id >= 0 else ()

    def in_block(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens of image blocks: placeholders, codes and [MASK]."""
        return (input_ids == self.image_token_id) | (input_ids >= self.vocab_size)

    # ------------------------------------------------------------------ images
    def encode_codes(self, pixels) -> torch.Tensor:
        """Images [n, 3, H, W], or the processor's MediaInputs of them -> code ids [n, h, w]."""
        return self.vq.encode_codes(pixels)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vq.decode_codes(codes)

    def encode_media(self, media: MediaInputs) -> Features:
        """Images -> their codes (the frozen VQ, no gradient) -> the LM's embeddings of those code ids [n, h*w, D]."""
        with torch.no_grad():
            codes = self.vq.encode_codes(media.pixel_values)
        ids = self.code_ids(codes.reshape(len(codes), -1))
        return Features(self.lm.embed_tokens(ids), media.item_rows())

    def embed(self, input_ids: torch.Tensor, features: Features | None) -> torch.Tensor:
        embeds = self.lm.embed_tokens(input_ids.masked_fill(input_ids == self.image_token_id, 0))
        return splice_image_features(embeds, input_ids, self.image_token_id,
                                     features.values if features is not None else None)

    # ------------------------------------------------------------------ the model
    def attention(self, batch: Batch, cache: KVCache | None = None) -> torch.Tensor:
        """Omni-attention (module docstring): causal or packed documents, plus each image block both ways."""
        offset = cache.length if cache is not None else 0
        return block_attention(self.in_block(batch.input_ids), batch.attention_mask, batch.document_ids,
                               batch.segment_ids, offset)

    def forward(self, batch: Batch, cache: KVCache | None = None, logits_to_keep: int = 0,
                head: str = "text") -> ModelOutput:
        """The loss (with ``batch.labels``: :meth:`loss`) or logits: ``head="text"`` the text columns (codes and
        [MASK] suppressed), ``head="image"`` the K code columns (:attr:`image_vocab`)."""
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        embeds = self.embed(batch.input_ids, self.media_features(batch))
        hidden = self.lm(embeds, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                         mask=self.attention(batch, cache), cache=cache)
        if batch.labels is not None:
            return self.loss(hidden, batch.labels)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return ModelOutput(logits=self.text_head(hidden) if head == "text" else self.code_head(hidden))

    def text_head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm.lm_head(hidden)
        not_text = torch.arange(logits.shape[-1], device=logits.device) >= self.vocab_size
        return logits.masked_fill(not_text, torch.finfo(logits.dtype).min)

    def code_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The K code columns of the LM head."""
        w = self.lm.lm_head.weight[self.vocab_size:self.vocab_size + self.codebook_size]
        b = self.lm.lm_head.bias
        return F.linear(hidden, w, b[self.vocab_size:self.vocab_size + self.codebook_size] if b is not None else None)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> ModelOutput:
        """Text labels (< V) as next-token targets through the text head; code labels (>= V) as same-position
        targets over the code columns (mask-predict); the mean over both, and each kind's sum and count in
        ``parts``."""
        targets = labels[:, 1:]
        text = (targets != -100) & (targets < self.vocab_size)
        image = labels >= self.vocab_size
        n_text, n_image = int(text.sum()), int(image.sum())
        t_logits = self.lm.lm_head(hidden[:, :-1][text])[..., :self.vocab_size].float()
        i_logits = self.code_head(hidden[image]).float()
        t_sum = F.cross_entropy(t_logits, targets[text], reduction="sum") if n_text else hidden.sum() * 0.0
        i_sum = (F.cross_entropy(i_logits, labels[image] - self.vocab_size, reduction="sum") if n_image
                 else hidden.sum() * 0.0)
        n = n_text + n_image
        loss = (t_sum + i_sum) / n if n else hidden.sum() * float("nan")
        return ModelOutput(loss=loss, n_tokens=n, parts={"text": (t_sum, n_text), "image": (i_sum, n_image)})

    # ------------------------------------------------------------------ training
    def module_groups(self) -> dict[str, nn.Module]:
        """``lm`` (the embeddings of text, codes and [MASK], the blocks, the head) and ``vq`` (frozen by the
        recipes: a separate pretrained tokenizer)."""
        return {"lm": self.lm, "vq": self.vq}

    def image_tower(self) -> nn.Module:
        raise ConfigError("showo reads images as discrete VQ codes: there is no image tower to pretrain "
                          "(objective cell_labels)")


def build_showo(cfg: ShowoConfig, image_token_id: int | None, init: bool = True) -> ShowoModel:
    """The Show-o model of ``cfg`` (the VQ's weights come from ``gen.vq_from`` or a checkpoint). ``init``: the LM as
    vlmkit's from-scratch LMs (GPT-2's std 0.02, the head at ``lm.head_init_std``, residual outputs scaled by
    depth); there is no tower or connector."""
    model = ShowoModel(cfg, build_vq(cfg.gen.vq, init), DecoderLM(cfg.lm), image_token_id)
    if init and not any(p.is_meta for p in model.parameters()):
        with torch.no_grad():
            init_lm_from_scratch(model.lm, cfg.lm)
    return model


__all__ = ["ShowoConfig", "ShowoGenConfig", "ShowoModel", "build_showo"]
