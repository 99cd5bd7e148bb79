"""Multi-head attention on ``F.scaled_dot_product_attention`` with grouped-query heads, masks and a KV cache.

Masks are boolean and broadcast to [B, 1, Tq, Tk] with True = "may attend" (nn/masks.py builds them); the KV
cache is nn/cache.py's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.nn.cache import KVCache
from vlmkit.nn.norm import HeadLayerNorm, RMSNorm
from vlmkit.nn.rope import apply_rope


class Attention(nn.Module):
    """Self-attention with optional grouped-query heads, rotary embeddings and a KV cache.

    ``qk_norm`` adds a LayerNorm (with bias, eps ``norm_eps``) over each head's queries and keys, applied
    before the rotary embedding (Persimmon's ``qk_layernorm``; one norm shared by all heads); with
    ``qk_norm_kind`` "rmsnorm" an RMSNorm instead (Gemma 3's, scaled by 1 + weight with ``norm_offset``), with
    "head_layernorm" a LayerNorm whose weight and bias are per head (Chameleon's, nn/norm.py HeadLayerNorm).
    ``scale`` replaces 1 / sqrt(head_dim) (Gemma's query_pre_attn_scalar ** -0.5); ``softcap`` caps the scores
    at +-softcap through tanh before the softmax (Gemma 2's attn_logit_softcapping), which SDPA cannot."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-5,
                 qk_norm_kind: str = "layernorm", norm_offset: bool = False, scale: float | None = None,
                 softcap: float | None = None):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads or heads
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({self.kv_heads})")
        self.head_dim = head_dim or dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=out_bias)
        if qk_norm_kind not in ("layernorm", "rmsnorm", "head_layernorm"):
            raise ValueError(f"qk_norm_kind {qk_norm_kind!r}; valid: layernorm, rmsnorm, head_layernorm")

        def qk(n_heads: int):
            if qk_norm_kind == "rmsnorm":
                return RMSNorm(self.head_dim, norm_eps, norm_offset)
            if qk_norm_kind == "head_layernorm":
                return HeadLayerNorm(n_heads, self.head_dim)
            return nn.LayerNorm(self.head_dim, eps=norm_eps)

        self.q_norm = qk(heads) if qk_norm else None
        self.k_norm = qk(self.kv_heads) if qk_norm else None
        self.scale, self.softcap = scale, softcap

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k = k.repeat_interleave(rep, dim=1)  # [B, H, Tk, hd]
            v = v.repeat_interleave(rep, dim=1)
        if self.softcap is not None:
            out = softcapped_attention(q, k, v, mask, is_causal and mask is None, self.scale, self.softcap)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                                 scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         is_causal: bool, scale: float | None, softcap: float) -> torch.Tensor:
    """Attention whose scores are capped, softcap * tanh(scores / softcap), before the mask and the softmax (fp32),
    as transformers' Gemma 2 eager attention. q [B, H, Tq, hd], k and v [B, H, Tk, hd]."""
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and is_causal:
        Tq, Tk = q.shape[-2], k.shape[-2]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
