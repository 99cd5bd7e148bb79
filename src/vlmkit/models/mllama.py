"""Llama 3.2 Vision (Mllama; Meta 2024): a tiled image tower -> a linear projector -> a Llama LM that reads the
images through gated cross-attention layers (transformers' ``MllamaForConditionalGeneration``).

Each image is one ``<|image|>`` token in the text; its tiles' states (every tile, unused ones too, each with its
P = patches + 1 tokens) are what the cross-attention layers attend to. The LM is vlmkit's ``DecoderLM`` holding
only its self-attention layers, wrapped in a :class:`~vlmkit.fusion.cross_attention.CrossAttentionLM` whose
blocks (grouped-query cross-attention with per-head q/k RMSNorm, tanh gates) run at ``mllama.xattn_positions``.

Which images a token reads is MllamaProcessor's rule (:func:`image_token_mask`), computed here from the
``<|image|>`` positions: an image is seen from its token to the next image token, except that consecutive image
tokens are a group that is seen together up to the next group (or the end); a token sees only the real tiles
of those images. A token that sees none (text before the first image, padding) attends to every tile of every
image of its sample and its MLP branch is dropped, as transformers computes it (``empty_rows="mllama"``).

Generation: the prefill computes every block's image keys and values once and keeps them in ``cache.extra``
with the last token's row of the mask, which every new token reuses (transformers extends the mask by
repeating its last row). A packed batch (``document_ids``) gives each token its own sample's images only.

Two places differ from transformers, both where it reads past a sample: in a batch whose rows hold different
numbers of images, transformers pads the image slots with blank images, which a row's image-less tokens then
attend to (here they attend to their own sample's images only); and the token embedding has
``mllama.extra_embeddings`` (8) rows more than the LM head predicts (``<|image|>`` among them): the logits
cover them at -inf, so that every id the model reads is an id it scores, and the image token is never sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import VLMConfig
from vlmkit.errors import ConfigError
from vlmkit.connectors import build_connector
from vlmkit.encoders.cnn import ConvEncoder
from vlmkit.encoders.mllama import MllamaVisionEncoder, TiledEncoder
from vlmkit.fusion.cross_attention import CrossAttentionLM, add_cross_attention
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import init_from_scratch
from vlmkit.batch import Batch, Features, MediaInputs, ModelOutput
from vlmkit.models.vlm import GenerativeModel, lm_output
from vlmkit.nn import KVCache


@dataclass
class MllamaFusionConfig:
    """Llama 3.2 Vision (family ``mllama``, models/mllama.py): a tiled image tower whose features the LM reads through
    gated cross-attention blocks between its self-attention layers; each image is one ``<|image|>`` token in the
    text. Defaults are meta-llama/Llama-3.2-11B-Vision's."""

    # before which of the LM's (self-attention) layers each block runs. transformers numbers its cross-attention
    # layers among all decoder layers: cross_attention_layers [3, 8, ..., 38] are positions [3, 7, ..., 31]
    xattn_positions: list[int] = field(default_factory=lambda: [3, 7, 11, 15, 19, 23, 27, 31])
    max_tiles: int = 4  # max_num_tiles: an image is cut into rows x cols tiles of vision.image_size, rows * cols <= it
    global_depth: int = 8  # vision.arch "mllama": gated global layers after the vision.depth local ones
    # vision.arch "mllama": local layers whose outputs are concatenated to the final features (vision_output_dim
    # = vision.width * (1 + len))
    intermediate_layers: list[int] = field(default_factory=lambda: [3, 7, 15, 23, 30])
    # token-embedding rows past the LM head's lm.vocab_size (transformers: vocab_size + 8, <|image|> among them);
    # the model reads them but never predicts them
    extra_embeddings: int = 8

    def __post_init__(self):
        if self.max_tiles < 1:
            raise ConfigError(f"mllama.max_tiles must be >= 1, got {self.max_tiles}")
        for name in ("global_depth", "extra_embeddings"):
            if getattr(self, name) < 0:
                raise ConfigError(f"mllama.{name} must be >= 0, got {getattr(self, name)}")
        if self.xattn_positions != sorted(self.xattn_positions) or any(p < 0 for p in self.xattn_positions):
            raise ConfigError(f"mllama.xattn_positions {self.xattn_positions} must be sorted LM layer indices (>= 0)")
        if any(i < 0 for i in self.intermediate_layers):
            raise ConfigError(f"mllama.intermediate_layers {self.intermediate_layers} must be layer indices (>= 0)")


@dataclass
class MllamaConfig(VLMConfig):
    """Llama 3.2 Vision: a tiled tower, a projector (``connector``) and an LM with gated cross-attention layers
    (``mllama``)."""

    family: str = "mllama"
    mllama: MllamaFusionConfig = field(default_factory=MllamaFusionConfig)


def image_token_mask(input_ids: torch.Tensor, image_token_id: int,
                     document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, n] booleans: token t sees image j of its row (images numbered by their ``image_token_id`` tokens,
    n = the most in a row). MllamaProcessor's ``get_cross_attention_token_mask``: image j is seen from its
    token up to the next image token, or, when the next image token follows it directly, together with it up
    to the next one that does not (or the end of the sequence, or of the sample in a packed row)."""
    B, T = input_ids.shape
    is_image = input_ids == image_token_id
    n = int(is_image.sum(-1).max()) if input_ids.numel() else 0
    out = torch.zeros(B, T, n, dtype=torch.bool, device=input_ids.device)
    t = torch.arange(T, device=input_ids.device)
    docs = document_ids if document_ids is not None else torch.zeros_like(input_ids)
    for b in range(B):
        locs = is_image[b].nonzero().flatten().tolist()
        d = docs[b].tolist()
        starts = [p for j, p in enumerate(locs) if j == 0 or p != locs[j - 1] + 1 or d[p] != d[locs[j - 1]]]
        for j, p in enumerate(locs):
            end = next((s for s in starts if s > p), T)
            out[b, :, j] = (t >= p) & (t < end) & (docs[b] == d[p])
    return out


def cross_attention_mask(input_ids: torch.Tensor, image_token_id: int, num_tiles: list[list[int]],
                         max_tiles: int) -> torch.Tensor:
    """MllamaProcessor's ``cross_attention_mask`` [B, T, n, max_tiles] (0/1): :func:`image_token_mask` over the
    real tiles of each image (``num_tiles[b][j]``)."""
    sees = image_token_mask(input_ids, image_token_id)
    tiles = torch.zeros(sees.shape[0], sees.shape[2], max_tiles, dtype=torch.bool)
    for b, row in enumerate(num_tiles):
        for j, k in enumerate(row):
            tiles[b, j, :k] = True
    return (sees[..., None] & tiles[:, None]).long()


class MllamaModel(GenerativeModel):
    """MllamaForConditionalGeneration as a generative model (models/vlm.py): its features are each image's states
    [n, max_tiles * P, D_lm] with its real tile count (``Features.extra["num_tiles"]``)."""

    def __init__(self, encoder: nn.Module, connector: nn.Module, lm: CrossAttentionLM, image_token_id: int,
                 extra_embeddings: int = 0):
        super().__init__()
        self.encoder, self.connector, self.lm = encoder, connector, lm
        self.image_token_id, self.extra_embeddings = image_token_id, extra_embeddings

    @property
    def image_seq_len(self) -> int:
        """LM positions an image fills: its one ``<|image|>`` token."""
        return 1

    def encode_media(self, media: MediaInputs) -> Features:
        """The processor's MediaInputs ([n * max_tiles, C, H, W] with aspect_ratio_ids, aspect_ratio_mask,
        num_tiles) -> the images' LM-space states [n, max_tiles * P, D_lm]."""
        keys = ("aspect_ratio_ids", "aspect_ratio_mask", "num_tiles")
        if any(k not in media.extra for k in keys):
            raise ValueError(f"mllama encodes images from the processor's MediaInputs (tiles with extra "
                             f"{', '.join(keys)}), not from a bare pixel tensor")
        extra = media.extra
        feats = self.encoder(media.pixel_values, extra["aspect_ratio_ids"], extra["aspect_ratio_mask"])
        n = feats.shape[0]
        states = self.connector(feats.reshape(n, -1, feats.shape[-1]))  # [n, tiles * P, D_lm]
        return Features.stacked(states, num_tiles=extra["num_tiles"])

    def image_tower(self) -> nn.Module:
        """The one-tile tower a from-scratch tiled encoder runs on every tile (a whole image is one tile)."""
        return getattr(self.encoder, "tile_encoder", self.encoder)

    def cross_attention_inputs(self, input_ids: torch.Tensor, images: Features | None,
                               document_ids: torch.Tensor | None = None):
        """(states [B, S, D] of each row's images side by side, padded to the most images of a row; mask
        [B, T, S]: the real tiles of the images each token sees; key_mask [B, 1 or T, S]: each token's own
        sample's image tokens), or three Nones when the batch has no image."""
        counts = (input_ids == self.image_token_id).sum(-1).tolist()  # images per row, in reading order
        given = len(images) if images is not None else 0
        if sum(counts) != given:
            raise ValueError(f"the input ids hold {sum(counts)} image tokens ({self.image_token_id}) but {given} "
                             f"images were given; the processor puts one per image")
        if not given:
            return None, None, None
        B, T = input_ids.shape
        n, tiles = max(counts), self.encoder.max_tiles
        states, num_tiles = images.values, images.extra["num_tiles"]
        P = states.shape[1] // tiles
        sees = image_token_mask(input_ids, self.image_token_id, document_ids)  # [B, T, n]
        real_tile = torch.arange(tiles, device=input_ids.device) < num_tiles[:, None]  # [n_images, tiles]
        rows, tile_ok, first = [], torch.zeros(B, n, tiles, dtype=torch.bool, device=input_ids.device), 0
        for b, c in enumerate(counts):
            rows.append(F.pad(states[first:first + c].flatten(0, 1), (0, 0, 0, (n - c) * tiles * P)))
            tile_ok[b, :c] = real_tile[first:first + c]
            first += c
        mask = (sees[..., None] & tile_ok[:, None])[..., None].expand(B, T, n, tiles, P).reshape(B, T, -1)
        if document_ids is None:
            slot = (torch.arange(n, device=input_ids.device) < torch.tensor(counts, device=input_ids.device)[:, None])
            key_mask = slot[:, None, :]  # [B, 1, n]
        else:  # the document of each image slot (-2: none), against each token's
            loc = [(input_ids[b] == self.image_token_id).nonzero().flatten() for b in range(B)]
            slot_doc = torch.full((B, n), -2, dtype=document_ids.dtype, device=input_ids.device)
            for b, p in enumerate(loc):
                slot_doc[b, :len(p)] = document_ids[b, p]
            key_mask = slot_doc[:, None, :] == document_ids[:, :, None]  # [B, T, n]
        key_mask = key_mask[..., None].expand(*key_mask.shape, tiles * P).reshape(B, key_mask.shape[1], -1)
        return torch.stack(rows), mask, key_mask

    def forward(self, batch: Batch, cache: KVCache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """As :meth:`VisionLanguageModel.forward`. The images (media or features) are read at a prefill or a
        cache-less forward; decoding steps after a prefill use what it cached."""
        input_ids = batch.input_ids
        mask = self.attention(batch, cache)
        B, T = input_ids.shape
        if cache is None or cache.length == 0:
            images, image_mask, key_mask = self.cross_attention_inputs(input_ids, self.media_features(batch),
                                                                       batch.document_ids)
            image_kv = self.lm.project_images(images) if images is not None else None
            if cache is not None:  # what later tokens see: the last token's row
                last = image_mask[:, -1:] if image_mask is not None else None
                cache.extra["mllama"] = (image_kv, last, key_mask)
        else:
            image_kv, last, key_mask = cache.extra.get("mllama", (None, None, None))
            image_mask = last.expand(B, T, last.shape[-1]) if last is not None else None
        hidden = self.lm(self.lm.embed_tokens(input_ids), image_attention_mask=image_mask,
                         position_ids=batch.position_ids, attention_mask=batch.attention_mask, mask=mask, cache=cache,
                         image_kv=image_kv, key_mask=key_mask)  # [B, T, D]
        out = lm_output(self.lm.lm_head, hidden, batch.labels, logits_to_keep)
        if batch.labels is not None:
            return out
        logits = out.logits
        if self.extra_embeddings:  # ids the embedding has and the head does not predict (<|image|> among them)
            logits = F.pad(logits, (0, self.extra_embeddings), value=float("-inf"))
        return ModelOutput(logits=logits)


def build_mllama(cfg: MllamaConfig, image_token_id: int, init: bool = True) -> MllamaModel:
    """An MllamaModel from its config: vision.arch "mllama" (Meta's tower), or "cnn" (vlmkit's CNN on every tile,
    for from-scratch models); cross-attention blocks at mllama.xattn_positions with the LM's heads and kv heads;
    a token embedding mllama.extra_embeddings rows larger than the head."""
    m, lm_cfg = cfg.mllama, cfg.lm
    if cfg.vision.arch == "mllama":
        encoder = MllamaVisionEncoder(cfg.vision, m.max_tiles, m.global_depth, m.intermediate_layers)
    elif cfg.vision.arch == "cnn":
        encoder = TiledEncoder(ConvEncoder(cfg.vision), m.max_tiles)
    else:
        raise ValueError(f"family mllama needs vision.arch 'mllama' or 'cnn', got {cfg.vision.arch!r}")
    if lm_cfg.tie_embeddings and m.extra_embeddings:
        raise ValueError(f"lm.tie_embeddings: the token embedding has mllama.extra_embeddings "
                         f"({m.extra_embeddings}) rows more than the head; set one of them false / 0")
    if lm_cfg.head_dim not in (None, lm_cfg.width // lm_cfg.heads):
        raise ValueError(f"lm.head_dim {lm_cfg.head_dim}: Mllama's cross-attention has head_dim = width / heads "
                         f"= {lm_cfg.width // lm_cfg.heads}")
    if not 0 <= image_token_id < lm_cfg.vocab_size + m.extra_embeddings:
        raise ValueError(f"image token id {image_token_id} is not a row of the token embedding "
                         f"(lm.vocab_size {lm_cfg.vocab_size} + mllama.extra_embeddings {m.extra_embeddings})")
    lm = DecoderLM(lm_cfg)
    if m.extra_embeddings:
        lm.embed_tokens = type(lm.embed_tokens)(lm_cfg.vocab_size + m.extra_embeddings, lm_cfg.width)
    xlm = add_cross_attention(lm, None, lm_cfg.width, positions=m.xattn_positions, qk_norm=True,
                              kv_heads=lm_cfg.kv_heads, empty_rows="mllama")
    model = MllamaModel(encoder, build_connector(cfg.connector, encoder.out_dim, lm_cfg.width), xlm,
                        image_token_id, m.extra_embeddings)
    if init:
        init_from_scratch(model, cfg)
    return model
