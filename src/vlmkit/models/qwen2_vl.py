"""Qwen2-VL: its own vision tower and patch merger (encoders/qwen2_vl.py), spliced into a Qwen2 LM whose rotary
embedding is multimodal (M-RoPE).

M-RoPE gives every token three position ids (temporal, height, width), computed as transformers'
``Qwen2VLModel.get_rope_index``: text tokens count up on all three axes; the tokens of an image with an
(lh x lw) merged grid, starting where the text left off at s, get (s, s + row, s + col); the text after it
continues at s + max(lh, lw) (one past the image's largest id). Padding (``attention_mask`` 0, left-padded
batches) is skipped and keeps id 0. Each sequence's ``delta`` = (largest id + 1) - (its real token count) is
kept in ``cache.extra["mrope_delta"]`` at prefill, so that a decoding step's ids are its plain position plus
delta on all three axes (transformers' ``rope_deltas``).

Images arrive as the processor's MediaInputs (flattened patches and ``image_grid_thw``); the features the model
encodes carry their grids (``Features.extra["grid_thw"]``), because the position ids depend on them.
"""

from __future__ import annotations

import torch

from vlmkit.config import VLMConfig
from vlmkit.encoders.qwen2_vl import PatchMerger, Qwen2VLVisionEncoder
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import init_from_scratch
from vlmkit.batch import Batch, Features, MediaInputs
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.nn import KVCache


def vision_position_ids(start: int, t: int, lh: int, lw: int, scale: float = 1, device=None) -> torch.Tensor:
    """The M-RoPE ids [3, t * lh * lw] of an item of t temporal patches over an lh x lw merged grid whose first
    token sits at ``start``: (start + int(k * scale), start + row, start + col) (transformers'
    ``get_vision_position_ids``; ``scale`` the temporal step, computed in float32 as there)."""
    frames = torch.arange(t, device=device)
    if scale != 1:
        frames = (frames * torch.tensor(scale, dtype=torch.float32, device=device)).long()
    tt, hh, ww = torch.meshgrid(frames, torch.arange(lh, device=device), torch.arange(lw, device=device),
                                indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def mrope_position_ids(input_ids: torch.Tensor, image_token_id: int, grid_thw: torch.Tensor, merge_size: int,
                       attention_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                       time_scales: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(position ids [3, B, T], delta [B]) of a batch whose image tokens belong, in reading order, to images
    with patch grids ``grid_thw`` [n, 3] (transformers' ``get_rope_index``, for images).

    In a packed batch (``document_ids`` [B, T], -1 = padding) every sample gets its own ids, starting at 0, as
    if it ran alone (the deltas are then meaningless: a packed batch is never continued by decoding).

    ``time_scales``: per grid, the temporal id step of one temporal patch (Qwen2.5-VL's absolute time for a video:
    ``tokens_per_second * second_per_grid_t``, its frame k at id start + int(k * scale), in float32 as
    transformers); None: 1 for every grid (images; Qwen2-VL's videos)."""
    B, T = input_ids.shape
    device = input_ids.device
    positions = torch.zeros(3, B, T, dtype=torch.long, device=device)
    deltas = torch.zeros(B, dtype=torch.long, device=device)
    grids = [tuple(g) for g in grid_thw.tolist()]
    next_image = 0
    real = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
    if document_ids is not None:
        rows = [(b, document_ids[b] == d) for b in range(B) for d in document_ids[b].unique().tolist() if d >= 0]
    else:
        rows = [(b, real[b]) for b in range(B)]
    for b, keep in rows:
        is_image = (input_ids[b][keep] == image_token_id).tolist()
        n, i, start, pieces = len(is_image), 0, 0, []
        while i < n:
            if not is_image[i]:  # a run of text: one id per token on all three axes
                j = i
                while j < n and not is_image[j]:
                    j += 1
                pieces.append(torch.arange(start, start + j - i, device=device).expand(3, -1))
                start += j - i
                i = j
                continue
            if next_image >= len(grids):
                raise ValueError(f"the batch has more image placeholders than the {len(grids)} images given")
            t, h, w = grids[next_image]
            scale = 1 if time_scales is None else time_scales[next_image]
            next_image += 1
            lh, lw = h // merge_size, w // merge_size
            count = t * lh * lw
            if i + count > n or not all(is_image[i:i + count]):
                raise ValueError(f"image {next_image - 1} (grid {t}x{h}x{w}) needs {count} consecutive image "
                                 f"tokens in sequence {b}; the processor expands each placeholder to that many")
            pieces.append(vision_position_ids(start, t, lh, lw, scale, device))
            start += max(h, w) // merge_size
            i += count
        if pieces:
            ids = torch.cat(pieces, dim=1)  # [3, n]
            positions[:, b, keep] = ids
            deltas[b] = ids.max() + 1 - n
    if next_image != len(grids):
        raise ValueError(f"{len(grids)} images given but the batch's placeholders use {next_image}")
    return positions, deltas


class Qwen2VLModel(VisionLanguageModel):
    """Qwen2VLForConditionalGeneration: encoder (Qwen2-VL tower) -> connector (patch merger) -> splice into a
    DecoderLM with M-RoPE. Its features are flat [total tokens, D_lm] with each image's patch grid
    (``Features.extra["grid_thw"]``), which the M-RoPE position ids are computed from."""

    family_name = "qwen2_vl"  # named in errors

    def __init__(self, encoder: Qwen2VLVisionEncoder, connector: PatchMerger, lm: DecoderLM, image_token_id: int):
        super().__init__(encoder, connector, lm, image_token_id)
        self.merge_size = encoder.merge_size

    @property
    def image_seq_len(self) -> int:
        raise NotImplementedError(f"{self.family_name} images fill a number of tokens that depends on their "
                                  "size (MediaInputs.tokens); there is no fixed image_seq_len")

    def encode_media(self, media: MediaInputs) -> Features:
        """The processor's MediaInputs (flattened patches + ``image_grid_thw``) -> features [total tokens, D_lm]
        with their grids."""
        if "image_grid_thw" not in media.extra:
            raise ValueError(f"{self.family_name} encodes images from the processor's MediaInputs (flattened "
                             "patches with extra['image_grid_thw']), not from a bare pixel tensor")
        grid = media.extra["image_grid_thw"]
        feats = self.connector(self.encoder(media.pixel_values, grid))  # [total tokens, D_lm]
        return Features(feats, list(media.tokens), {"grid_thw": grid})

    def positions(self, batch: Batch, features: Features | None, cache: KVCache | None) -> torch.Tensor:
        """M-RoPE ids [3, B, T]: from the images' grids for a whole sequence (a prefill, whose deltas the cache
        keeps; a packed batch's samples each from their own images), from the cache offset plus each sequence's
        delta for decoding steps. Explicit (non-packed) position ids are used as given."""
        input_ids, attention_mask = batch.input_ids, batch.attention_mask
        grid = features.extra["grid_thw"] if features is not None else torch.zeros(0, 3, dtype=torch.long)
        if batch.document_ids is not None:
            if batch.segment_ids is not None and bool((batch.segment_ids > 0).any()):
                raise ValueError(f"{self.family_name}: grouped questions (segment_ids) are not supported with M-RoPE "
                                 "positions; set data.group_turns: 0")
            return mrope_position_ids(input_ids, self.image_token_id, grid, self.merge_size,
                                      document_ids=batch.document_ids)[0]
        if batch.position_ids is not None:
            return batch.position_ids
        B, T = input_ids.shape
        offset = cache.length if cache is not None else 0
        if offset:
            if attention_mask is not None:
                pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, offset:offset + T]
            else:
                pos = torch.arange(offset, offset + T, device=input_ids.device)[None].expand(B, T)
            delta = cache.extra.get("mrope_delta")
            if delta is not None:
                pos = pos + delta[:, None].to(pos.device)
            return pos[None].expand(3, B, T)
        pos, delta = mrope_position_ids(input_ids, self.image_token_id, grid, self.merge_size, attention_mask)
        if cache is not None:
            cache.extra["mrope_delta"] = delta
        return pos


def build_qwen2_vl(cfg: VLMConfig, image_token_id: int, init: bool = True) -> Qwen2VLModel:
    """A Qwen2VLModel from its config: vision.arch "qwen2_vl", connector.kind "patch_merger" (merging
    vision.merge_size x merge_size windows), an LM with lm.mrope_section."""
    if cfg.vision.arch != "qwen2_vl":
        raise ValueError(f"family qwen2_vl needs vision.arch 'qwen2_vl', got {cfg.vision.arch!r}")
    if cfg.connector.kind != "patch_merger":
        raise ValueError(f"family qwen2_vl needs connector.kind 'patch_merger', got {cfg.connector.kind!r}")
    if cfg.connector.scale_factor != cfg.vision.merge_size:
        raise ValueError(f"connector.scale_factor {cfg.connector.scale_factor} must equal vision.merge_size "
                         f"{cfg.vision.merge_size} (the patch merger folds the tower's merge windows)")
    if not cfg.lm.mrope_section:
        raise ValueError("family qwen2_vl needs lm.mrope_section (the M-RoPE sections of its rotary dimensions)")
    encoder = Qwen2VLVisionEncoder(cfg.vision)
    connector = PatchMerger(cfg.vision.width, cfg.lm.width, cfg.vision.merge_size, cfg.connector.act,
                            cfg.vision.norm_eps)
    model = Qwen2VLModel(encoder, connector, DecoderLM(cfg.lm), image_token_id)
    if init:
        init_from_scratch(model, cfg)
    return model
