"""Shared building blocks: attention, norms, rotary embeddings, feed-forward layers."""

from vlmkit.nn.attention import Attention, KVCache, causal_mask
from vlmkit.nn.mlp import MLP, SwiGLU, activation, init_linear_
from vlmkit.nn.norm import RMSNorm, make_norm
from vlmkit.nn.rope import RotaryEmbedding, Rotary2D, apply_rope

__all__ = ["Attention", "KVCache", "causal_mask", "MLP", "SwiGLU", "activation", "init_linear_", "RMSNorm",
           "make_norm", "RotaryEmbedding", "Rotary2D", "apply_rope"]
