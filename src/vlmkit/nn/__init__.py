"""Shared building blocks: attention, masks, the KV cache, norms, rotary embeddings, feed-forward layers."""

from vlmkit.nn.attention import Attention
from vlmkit.nn.cache import KVCache
from vlmkit.nn.masks import (block_attention, block_ids, causal_mask, document_mask, sliding_window, with_blocks,
                             with_prompt)
from vlmkit.nn.mlp import MLP, SwiGLU, activation, init_linear_
from vlmkit.nn.norm import RMSNorm, make_norm
from vlmkit.nn.rope import Rotary2D, RotaryEmbedding, apply_rope, sincos_2d

__all__ = [
           "MLP",
           "Attention",
           "KVCache",
           "RMSNorm",
           "Rotary2D",
           "RotaryEmbedding",
           "SwiGLU",
           "activation",
           "apply_rope",
           "block_attention",
           "block_ids",
           "causal_mask",
           "document_mask",
           "init_linear_",
           "make_norm",
           "sincos_2d",
           "sliding_window",
           "with_blocks",
           "with_prompt",
]
