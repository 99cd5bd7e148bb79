"""Shared building blocks: attention, norms, rotary embeddings, feed-forward layers."""

from vlmkit.nn.attention import Attention, KVCache, causal_mask
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
           "causal_mask",
           "init_linear_",
           "make_norm",
           "sincos_2d",
]
