"""Flamingo / IDEFICS (Alayrac et al. 2022; Laurençon et al. 2023, HuggingFaceM4/idefics-9b): vision tower ->
perceiver resampler -> an LM that reads the images through tanh-gated cross-attention blocks inserted before its
layers 0, k, 2k, ... (:mod:`vlmkit.fusion.cross_attention`), instead of image tokens spliced into its sequence.

Each image is ONE placeholder token in the text (IDEFICS: ``<image>`` between ``<fake_token_around_image>``
markers, all ordinary tokens of the LM). The image states of a sample, its images' latents in reading order,
are concatenated into S = n_images * M keys and values, and each text token cross-attends to those of the
images it *sees* (the media mask, [B, T, n_images]):

- the most recent image at or before it (``xattn.only_last``, Flamingo's default and IdeficsProcessor's rule),
  or every image at or before it; a token before the first image sees none and gets only the gated MLP;
- IdeficsProcessor also blinds the tokens after an end-of-document token (EOS) until the next image
  (``xattn.reset_token_id``);
- in a packed batch a token sees only the images its own self-attention sees: those of its own sample (and of
  its segment's shared prefix), never another sample's.

Generation: the prefill keeps the image states and each row's last media-mask row in ``cache.extra``; a decoding
step reuses them, so a new token sees what the last prompt token saw (as transformers' IDEFICS ``generate``).
The image keys and values are recomputed every step (no cross-attention cache, as in IDEFICS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import VLMConfig
from vlmkit.errors import ConfigError
from vlmkit.connectors.perceiver import PerceiverResampler
from vlmkit.encoders.cnn import ConvEncoder
from vlmkit.encoders.vit import ViTEncoder
from vlmkit.fusion.cross_attention import CrossAttentionLM, add_cross_attention
from vlmkit.lm.decoder import DecoderLM
from vlmkit.batch import Batch, Features, MediaInputs, ModelOutput
from vlmkit.models.vlm import GenerativeModel, lm_output
from vlmkit.nn import KVCache, init_linear_
from vlmkit.nn.masks import per_document_cumsum


@dataclass
class PerceiverConfig:
    """A perceiver resampler (connectors/perceiver.py): ``n_latents`` learned queries read the vision features in
    ``depth`` blocks. Defaults are IDEFICS-9B's (HuggingFaceM4/idefics-9b's perceiver_config)."""

    depth: int = 6  # resampler_depth
    heads: int = 16  # resampler_n_heads
    head_dim: int = 96  # resampler_head_dim
    n_latents: int = 64  # resampler_n_latents: image tokens per image after the resampler
    qk_norm: bool = False  # qk_layer_norms_perceiver: a LayerNorm over each head's queries and keys
    mlp_dim: int = 0  # 0: 4 x the vision width (IDEFICS)

    def __post_init__(self):
        for name in ("depth", "heads", "head_dim", "n_latents"):
            if getattr(self, name) < 1:
                raise ConfigError(f"xattn.perceiver.{name} must be >= 1, got {getattr(self, name)}")
        if self.mlp_dim < 0:
            raise ConfigError(f"xattn.perceiver.mlp_dim must be >= 0 (0: 4 x the vision width), got {self.mlp_dim}")


@dataclass
class CrossAttentionConfig:
    """Gated cross-attention fusion (family ``flamingo``: Flamingo, IDEFICS; fusion/cross_attention.py): the LM
    reads each sample's images through tanh-gated blocks before its layers 0, every, 2 * every, ...; each image is
    one placeholder token in the text. Defaults are IDEFICS-9B's."""

    every: int = 4  # cross_layer_interval
    heads: int = 0  # heads of the cross-attention; 0: the LM's (IDEFICS)
    mlp_dim: int = 0  # width of the gated blocks' SwiGLU; 0: the LM's mlp_dim (IDEFICS)
    qk_norm: bool = False  # qk_layer_norms: an RMSNorm over each head's queries and keys
    alpha_type: str = "float"  # float: one gate per branch | vector: one per channel
    # which images a text token sees: the most recent one at or before it (Flamingo's default, IDEFICS), or
    # every one at or before it
    only_last: bool = True
    # tokens after this token see no image until the next image (IdeficsProcessor: after the EOS ending a
    # document); -1: none. Set from the tokenizer when a model is imported
    reset_token_id: int = -1
    use_resampler: bool = True  # a perceiver resampler between the vision tower and the LM (IDEFICS-9B/80B)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    # IDEFICS' decoupled embeddings: its checkpoints keep the last ``decoupled_vocab`` rows of the token embedding
    # and of the LM head (its added tokens, additional_vocab_size) in separate tensors. vlmkit's LM has them in its
    # lm.vocab_size rows (the same numbers); an export splits them off again
    decoupled_vocab: int = 0
    # learned embeddings of an image's place in its sample (first, second, ...), added to its states before the
    # cross-attention, for this many images; 0 = none (IDEFICS). With only_last: false a token reads several images
    # at once, and without them cannot tell "the first image" from "the second" (Flamingo adds learned time
    # embeddings to a video's frames for the same reason)
    image_index_embed: int = 0

    def __post_init__(self):
        if self.every < 1:
            raise ConfigError(f"xattn.every must be >= 1, got {self.every}")
        if self.alpha_type not in ("float", "vector"):
            raise ConfigError(f"xattn.alpha_type must be 'float' or 'vector', got {self.alpha_type!r}")
        for name in ("heads", "mlp_dim", "decoupled_vocab", "image_index_embed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"xattn.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class FlamingoConfig(VLMConfig):
    """Flamingo / IDEFICS: a tower, a perceiver resampler (or none) and an LM reading the images through gated
    cross-attention (``xattn``); ``connector`` is not used."""

    family: str = "flamingo"
    xattn: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)


class PassThrough(nn.Module):
    """The connector of a flamingo model without a resampler: the tower's features are the image states."""

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return n

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return x


def image_visibility(input_ids: torch.Tensor, image_token_id: int, only_last: bool = True,
                     reset_token_id: int = -1, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean media mask [B, T, n] (n = the most images in one row): which of its row's images, in reading
    order, each token sees (see the module docstring).

    ``visible`` [B, T, T] is the self-attention pattern (True = token t attends to position k): a token sees the
    images whose placeholders it attends to, and is blinded by the reset tokens it attends to. None: causal
    (every earlier position), the case of a row holding one sample."""
    B, T = input_ids.shape
    device = input_ids.device
    is_image = input_ids == image_token_id  # [B, T]
    n = int(is_image.sum(-1).max()) if input_ids.numel() else 0
    pos = torch.arange(T, device=device)
    # position of each row's j-th image [B, n]; T where a row has fewer images (seen by no token)
    slot = torch.where(is_image, is_image.long().cumsum(-1) - 1, n)  # [B, T]
    image_pos = torch.full((B, n + 1), T, dtype=torch.long, device=device)
    image_pos = image_pos.scatter(1, slot, pos.expand(B, T))[:, :n]
    if visible is None:
        sees = image_pos[:, None, :] <= pos[None, :, None]  # [B, T, n]
    else:
        index = image_pos.clamp(max=T - 1)[:, None, :].expand(B, T, n)
        sees = visible.gather(-1, index) & (image_pos < T)[:, None, :]
    if n == 0:
        return sees
    slots = torch.arange(1, n + 1, device=device)
    last = (sees * slots).amax(-1) - 1  # [B, T]: the most recent image seen, -1 = none
    if only_last:
        sees = slots - 1 == last[..., None]
    if reset_token_id >= 0:
        last_image = torch.where(last >= 0, image_pos.gather(1, last.clamp(min=0)), -1)  # [B, T] its position
        sees = sees & (_last_reset(input_ids == reset_token_id, visible) < last_image)[..., None]
    return sees


def _last_reset(is_reset: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """[B, T]: the position of the latest reset token strictly before each token that the token attends to (-1
    = none)."""
    B, T = is_reset.shape
    pos = torch.arange(T, device=is_reset.device)
    if visible is None:
        latest = torch.where(is_reset, pos, -1).cummax(-1).values  # at or before t
        return F.pad(latest, (1, 0), value=-1)[:, :-1]  # strictly before t
    before = visible & is_reset[:, None, :] & (pos[None, :] < pos[:, None])[None]  # [B, T, T]
    return torch.where(before, pos, -1).amax(-1)


class FlamingoModel(GenerativeModel):
    """encoder -> connector (perceiver resampler or :class:`PassThrough`) -> :class:`CrossAttentionLM`: the
    generative model interface (models/vlm.py) with images read through gated cross-attention; each image is one
    placeholder token in the text."""

    def __init__(self, encoder: nn.Module, connector: nn.Module, lm: CrossAttentionLM, image_token_id: int,
                 only_last: bool = True, reset_token_id: int = -1, image_index_embed: int = 0):
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.lm = lm
        self.image_token_id = image_token_id
        self.only_last = only_last
        self.reset_token_id = reset_token_id
        # xattn.image_index_embed: which image of its sample a state belongs to (see CrossAttentionConfig); part of
        # the connector group, so that it trains with the resampler
        if image_index_embed:
            width = lm.xattn[0].attn.k_proj.in_features
            self.connector.image_index = nn.Parameter(torch.zeros(image_index_embed, width))

    @property
    def image_seq_len(self) -> int:
        """Tokens each image occupies in the LM sequence: its one placeholder."""
        return 1

    @property
    def image_states(self) -> int:
        """Image states each image gives the cross-attention (M: the resampler's latents, or the tower's tokens)."""
        return self.connector.num_tokens(self.encoder.num_tokens, self.encoder.grid)

    def encode_media(self, media: MediaInputs) -> Features:
        """Images [n_images, C, H, W] -> image states [n_images, M, D_vision]."""
        states = media.tower if media.tower is not None else self.encoder(media.pixel_values)
        return Features.stacked(self.connector(states, self.encoder.grid))

    def group_images(self, input_ids: torch.Tensor, features: Features | None,
                     document_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Each row's image states concatenated in reading order: [B, n * M, D] (n = the most images in one row;
        zeros where a row has fewer), from ``features`` [n_images, M, D] of all rows in reading order. With
        image-index embeddings, an image's place is counted within its own sample (``document_ids`` of a packed
        row), as it would be alone."""
        counts = (input_ids == self.image_token_id).sum(-1)  # [B]
        given = 0 if features is None else len(features)
        if int(counts.sum()) != given:
            raise ValueError(f"the input has {int(counts.sum())} image placeholders (id {self.image_token_id}) but "
                             f"{given} images were given")
        if given == 0:
            return None
        image_features = features.values
        B, n = input_ids.shape[0], int(counts.max())
        _, M, D = image_features.shape
        grouped = image_features.new_zeros(B, n, M, D)
        grouped[torch.arange(n, device=counts.device) < counts[:, None]] = image_features  # row-major = reading order
        index = getattr(self.connector, "image_index", None)
        if index is not None:
            places = self.image_places(input_ids, document_ids)  # [B, n]: each slot's image within its sample
            if int(places.max()) >= index.shape[0]:
                raise ValueError(f"a sample has {int(places.max()) + 1} images; xattn.image_index_embed gives "
                                 f"{index.shape[0]} places")
            grouped = grouped + index[places][:, :, None, :].to(grouped.dtype)  # [B, n, 1, D]
        return grouped.reshape(B, n * M, D)

    def image_places(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
        """[B, n]: the place (0, 1, ...) of each row's j-th image among the images of its sample (0 for empty
        slots)."""
        is_image = (input_ids == self.image_token_id).long()
        seen = per_document_cumsum(is_image, document_ids) if document_ids is not None else is_image.cumsum(-1)
        B, n = input_ids.shape[0], int(is_image.sum(-1).max())
        places = torch.zeros(B, n, dtype=torch.long, device=input_ids.device)
        for b in range(B):
            at = is_image[b].bool()
            places[b, :int(at.sum())] = seen[b][at] - 1
        return places

    def media_mask(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, n] which images each token sees; ``mask`` [B or 1, 1, T, T] is the self-attention pattern of a
        packed (or otherwise masked) batch, None = causal."""
        visible = None
        if mask is not None:
            visible = mask[:, 0].expand(input_ids.shape[0], -1, -1).bool()
        return image_visibility(input_ids, self.image_token_id, self.only_last, self.reset_token_id, visible)

    def forward(self, batch: Batch, cache: KVCache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """As :meth:`VisionLanguageModel.forward`. ``batch.extras["image_attention_mask"]`` [B, T, n_images]
        (IdeficsProcessor's) overrides the media mask computed from the placeholders. With a filled ``cache`` (a
        decoding step) the images and media-mask rows of the prefill are used; images may not be given again."""
        input_ids = batch.input_ids
        B, T = input_ids.shape
        mask = self.attention(batch, cache)
        if cache is not None and cache.length > 0:
            images, sees = self._cached_images(batch, cache)
        else:
            images, sees = self._images(batch, mask)
            if cache is not None:
                cache.extra["xattn_images"] = images
                cache.extra["xattn_mask"] = None if sees is None else sees[:, -1:]
        embeds = self.lm.embed_tokens(input_ids)  # the placeholders are tokens of the LM's vocabulary
        hidden = self.lm(embeds, images, sees, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                         mask=mask, cache=cache)  # [B, T, D]
        return lm_output(self.lm.lm_head, hidden, batch.labels, logits_to_keep)

    def _images(self, batch: Batch, mask: torch.Tensor | None):
        """(each row's image states [B, S, D], which of them each token sees [B, T, S]) of a whole sequence."""
        images = self.group_images(batch.input_ids, self.media_features(batch), batch.document_ids)
        if images is None:
            return None, None
        B, T = batch.input_ids.shape
        given = batch.extras.get("image_attention_mask")
        per_image = given.bool() if given is not None else self.media_mask(batch.input_ids, mask)  # [B, T, n]
        M = images.shape[1] // per_image.shape[-1]
        return images, per_image[..., None].expand(-1, -1, -1, M).reshape(B, T, -1)  # [B, T, S]

    @staticmethod
    def _cached_images(batch: Batch, cache: KVCache):
        """What a decoding step reads: the prefill's image states and its last token's media-mask row."""
        if batch.has_media():
            raise ValueError("flamingo reads the images at the prefill; a decoding step (filled cache) takes none")
        if "xattn_images" not in cache.extra:  # e.g. a cache rebuilt without its extra state
            raise ValueError("flamingo: the KV cache carries no image states of its prefill (cache.extra "
                             "'xattn_images'); a decoding step needs the cache its prefill filled")
        B, T = batch.input_ids.shape
        images, row = cache.extra["xattn_images"], cache.extra["xattn_mask"]
        return images, None if row is None else row.expand(B, T, -1)


def build_flamingo(cfg: FlamingoConfig, image_token_id: int, init: bool = True) -> FlamingoModel:
    """A FlamingoModel from its config (``cfg.xattn``; ``cfg.connector`` is not used): a ViT or CNN tower, the
    perceiver of ``xattn.perceiver`` when ``xattn.use_resampler``, and ``cfg.lm`` wrapped with gated blocks that
    read image states of the tower's width."""
    encoders = {"vit": ViTEncoder, "cnn": ConvEncoder}
    if cfg.vision.arch not in encoders:
        raise ValueError(f"the flamingo family needs vision.arch one of {sorted(encoders)}, got {cfg.vision.arch!r}")
    if cfg.lm.head_init_std is not None and cfg.lm.tie_embeddings:
        raise ValueError("lm.head_init_std initialises an untied LM head; with lm.tie_embeddings: true the head "
                         "is the token embedding (set tie_embeddings: false, or leave head_init_std unset)")
    x, width = cfg.xattn, cfg.vision.width
    if x.use_resampler:
        p = x.perceiver
        connector = PerceiverResampler(width, p.depth, p.heads, p.head_dim, p.n_latents, p.mlp_dim or None,
                                       p.qk_norm)
    else:
        connector = PassThrough()
    lm = add_cross_attention(DecoderLM(cfg.lm), x.every, width, x.heads or None, x.mlp_dim or None, x.qk_norm,
                             x.alpha_type)
    model = FlamingoModel(encoders[cfg.vision.arch](cfg.vision), connector, lm, image_token_id, x.only_last,
                          x.reset_token_id, x.image_index_embed)
    if init:
        init_flamingo(model, cfg)
    return model


def init_flamingo(model: FlamingoModel, cfg: FlamingoConfig) -> None:
    """From-scratch initialisation as :func:`~vlmkit.models.init_from_scratch` (GPT-2's std 0.02, residual outputs
    scaled by depth, the head at ``lm.head_init_std``), except that the resampler gets GPT-2's std too: the
    fan-in init of a splice connector puts image tokens at unit scale, and the perceiver's final LayerNorm does that
    here. Its latents keep their N(0, 1) and the gates their zeros, so a fresh model is its LM until the gates open.
    Nothing happens on the meta device."""
    if any(p.is_meta for p in model.parameters()):
        return
    for part in (model.encoder, model.connector, model.lm):
        init_linear_(part)
    if cfg.lm.head_init_std is not None:
        torch.nn.init.normal_(model.lm.lm_head.weight, std=cfg.lm.head_init_std)
    with torch.no_grad():
        for block in model.lm.lm.layers:
            for lin in (block.attn.o_proj, block.mlp.down_proj):
                lin.weight.mul_((2 * cfg.lm.depth) ** -0.5)
        for block in getattr(model.encoder, "blocks", ()):
            for lin in (block.attn.o_proj, block.mlp.fc2):
                lin.weight.mul_((2 * cfg.vision.depth) ** -0.5)
