"""Gemma 3 (Gemma Team 2025): SigLIP tower -> Gemma 3's multimodal projector -> Gemma 3 LM, each image's tokens
attending to each other both ways inside the LM's causal (and, on its sliding layers, sliding-window) attention.

As transformers' ``Gemma3ForConditionalGeneration``:

- the projector (``Gemma3MultiModalProjector``) average-pools the tower's patch grid down to ``mm_tokens_per_image``
  tokens (a square grid: a kernel of patches_per_side / tokens_per_side), norms them with an RMSNorm (1 + weight, the
  tower's eps) and projects them with one matrix without bias;
- the image tokens of one image (a run of image tokens, transformers' ``token_type_ids == 1`` block) see each
  other both ways: the mask of the full layers is causal OR same-image, that of the sliding layers
  (causal OR same-image) AND within the window (the shared DecoderLM applies the window to the mask it is given);
  a decoding step adds no image: causal;
- positions are 0-indexed as a text LM's, the token embeddings scaled by sqrt(width) and the image features not;
- no final-logit soft-capping: Gemma3ForConditionalGeneration never applies ``final_logit_softcapping`` (only the
  text-only Gemma3ForCausalLM does), so the imported LM has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.batch import Batch
from vlmkit.config import ConnectorConfig, VLMConfig
from vlmkit.encoders.vit import ViTEncoder
from vlmkit.errors import ConfigError
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import init_from_scratch
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.nn import KVCache, RMSNorm, causal_mask, document_mask


@dataclass
class Gemma3Config(VLMConfig):
    """VLMConfig's parts with Gemma 3's projector: ``mm_tokens_per_image`` pooled tokens per image (a square number
    whose side divides the tower's grid). ``connector`` is the projection after the pooling and the norm: linear,
    without bias."""

    family: str = "gemma3"
    mm_tokens_per_image: int = 256

    def __post_init__(self):
        side = math.isqrt(self.mm_tokens_per_image)
        gh, gw = self.vision.grid
        if side * side != self.mm_tokens_per_image or gh != gw or side < 1 or gh % side:
            raise ConfigError(f"mm_tokens_per_image {self.mm_tokens_per_image}: a square number whose side divides "
                              f"the tower's square patch grid ({gh}x{gw})")
        if self.connector.kind != "linear" or self.connector.bias:
            raise ConfigError(f"connector.kind {self.connector.kind!r}, bias {self.connector.bias}: Gemma 3's "
                              f"projection is linear without bias (kind: linear, bias: false)")


GEMMA3_CONNECTOR = ConnectorConfig(kind="linear", bias=False)


class Gemma3Projector(nn.Module):
    """Patch features [n, N, D_v] on a square grid -> [n, tokens, D_lm]: average pooling to ``tokens``, an RMSNorm
    (1 + weight), a projection (``proj.weight`` is transformers' ``mm_input_projection_weight`` transposed)."""

    def __init__(self, d_vision: int, d_lm: int, tokens: int, eps: float):
        super().__init__()
        self.tokens = tokens
        self.norm = RMSNorm(d_vision, eps, offset=True)
        self.proj = nn.Linear(d_vision, d_lm, bias=False)

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return self.tokens

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        n, N, D = x.shape
        gh, gw = grid if grid is not None else (math.isqrt(N),) * 2
        kernel = gh // math.isqrt(self.tokens)
        pooled = F.avg_pool2d(x.transpose(1, 2).reshape(n, D, gh, gw), kernel, kernel)
        return self.proj(self.norm(pooled.flatten(2).transpose(1, 2)))


def image_groups(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, T]: the index of the image each image token belongs to (a run of consecutive image tokens is one image,
    transformers' ``get_block_sequence_ids_for_mask``), -1 for other tokens."""
    is_image = input_ids == image_token_id
    start = is_image & ~F.pad(is_image, (1, 0), value=False)[:, :-1]
    return torch.where(is_image, start.long().cumsum(-1) - 1, torch.full_like(input_ids, -1))


def with_image_blocks(mask: torch.Tensor, groups: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``mask`` [B or 1, 1, T, offset + T] plus each image's tokens (``groups`` [B, T] of the T new tokens) seeing
    each other both ways."""
    same = (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] >= 0)  # [B, T, T]
    block = F.pad(same, (offset, 0), value=False)[:, None]
    return mask | block


class Gemma3Model(VisionLanguageModel):
    """encoder -> projector -> splice into a Gemma 3 ``DecoderLM``, each image's tokens attending both ways."""

    def attention(self, batch: Batch, cache: KVCache | None = None) -> torch.Tensor | None:
        """Causal attention (within each sample of a packed batch) plus every image's tokens seeing each other;
        None (plain causal) when the tokens hold no image."""
        groups = image_groups(batch.input_ids, self.image_token_id)
        if not bool((groups >= 0).any()):
            return super().attention(batch, cache)
        offset = cache.length if cache is not None else 0
        T = batch.input_ids.shape[1]
        if batch.document_ids is not None:
            if offset:
                raise ValueError("gemma3: a packed batch (document_ids) is read without a cache")
            base = document_mask(batch.document_ids, batch.segment_ids)
        else:
            base = causal_mask(T, batch.attention_mask, offset, device=batch.input_ids.device)
        return with_image_blocks(base, groups, offset)


def build_gemma3(cfg: Gemma3Config, image_token_id: int, init: bool = True) -> Gemma3Model:
    """A Gemma3Model from its config; ``init`` applies the from-scratch initialisation of ``build_model``."""
    if cfg.vision.arch != "vit":
        raise ConfigError(f"the gemma3 family needs vision.arch 'vit', got {cfg.vision.arch!r}")
    projector = Gemma3Projector(cfg.vision.width, cfg.lm.width, cfg.mm_tokens_per_image, cfg.vision.norm_eps)
    model = Gemma3Model(ViTEncoder(cfg.vision), projector, DecoderLM(cfg.lm), image_token_id)
    if init:
        init_from_scratch(model, cfg)
    return model
