"""Decoder-only language model of the Llama family (Llama, Qwen2, SmolLM, Mistral, Gemma) and OPT, by a few flags.

Grouped-query attention (``kv_heads``), rotary theta, tied embeddings, qkv bias (Qwen2), and Gemma's
``1 + weight`` norms, embedding scaling and GELU-gated MLP (``act: gelu_tanh``) are the flags.
OPT (BLIP-2's LM; Zhang et al. 2022) is the same pre-norm block with LayerNorms (``norm: layernorm``), a plain
ReLU MLP (``mlp: plain``), biases everywhere (``bias``) and learned absolute positions added to the input
(``pos_embed: learned``, its table offset by ``pos_offset`` = 2 rows as OPT's).
Persimmon (Fuyu's LM) is OPT's block with rotary positions, a squared-ReLU MLP (``act: relu2``), a LayerNorm over
each head's queries and keys (``qk_norm``) and rotary on part of each head (``rotary_fraction``).
Gemma 2 and Gemma 3 are Gemma's block with sandwich norms (``post_norms``), the attention scale
``attn_scalar`` ** -0.5, soft-capped attention scores and logits (``attn_softcap``, ``logit_softcap``: Gemma 2) and
sliding-window attention on the layers ``layer_types`` marks "sliding"; Gemma 3 adds an RMSNorm over each head's
queries and keys (``qk_norm`` with ``qk_norm_kind`` rmsnorm) and a rotary table of its own for the sliding layers
(``local_rope_theta``). Each layer takes its kind's mask and rotary table from :meth:`DecoderLM.attention_inputs`.
Phi-1.5 / Phi-2 is Persimmon's kind with a parallel block (``parallel_block``: :class:`ParallelBlock`, one norm
feeding attention and MLP side by side) and a biased LM head (``head_bias``).
Chameleon is Llama's block with a LayerNorm over each head's queries and keys whose weights are per head
(``qk_norm`` with ``qk_norm_kind`` head_layernorm) and, in its larger model, the norms moved onto the outputs of
attention and MLP before the residual adds (``swin_norm``).
The model takes embeddings, not ids, so that fusion modules can splice images into the sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import LanguageConfig
from vlmkit.nn import MLP, Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLU, causal_mask, sliding_window


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times sqrt(width), in the weight's dtype (Gemma). A tied head reads the unscaled
    weight, and image features spliced in after the lookup are not scaled."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * torch.tensor(self.embedding_dim**0.5, dtype=self.weight.dtype)


def _norm(cfg: LanguageConfig) -> nn.Module:
    if cfg.norm == "layernorm":  # OPT: with bias
        return nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
    return RMSNorm(cfg.width, cfg.norm_eps, cfg.norm_offset)


def rotary_embedding(cfg: LanguageConfig) -> RotaryEmbedding:
    """The rotary table of ``cfg``: over the first ``cfg.rotary_dim`` dims of each head (all of them unless
    ``rotary_fraction`` < 1). A function so that loaders which build the LM on the meta device can rebuild it."""
    return RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section, cfg.rope_scaling)


class CappedLinear(nn.Linear):
    """An LM head whose logits are capped at +-cap through tanh (Gemma 2's final_logit_softcapping)."""

    def __init__(self, width: int, vocab: int, cap: float, bias: bool = False):
        super().__init__(width, vocab, bias=bias)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x) / self.cap) * self.cap


def local_rotary_embedding(cfg: LanguageConfig) -> RotaryEmbedding | None:
    """The sliding layers' own rotary table (Gemma 3's rope_local_base_freq, unscaled), or None."""
    if cfg.local_rope_theta is None:
        return None
    return RotaryEmbedding(cfg.rotary_dim, cfg.local_rope_theta)


class DecoderBlock(nn.Module):
    """Pre-norm attention and MLP; with ``post_norms`` (Gemma 2 / 3) each output is normed again before its
    residual add (``attn_out_norm``, ``mlp_out_norm``; ``post_attn_norm`` is the MLP's pre-norm). Layer
    ``layer``'s kind (cfg.layer_kind) picks its mask and rotary table when they come per kind (dicts)."""

    def __init__(self, cfg: LanguageConfig, layer: int = 0):
        super().__init__()
        self.kind = cfg.layer_kind(layer)
        self.input_norm = _norm(cfg)
        self.attn = Attention(cfg.width, cfg.heads, cfg.kv_heads, cfg.head_dim, qkv_bias=cfg.qkv_bias or cfg.bias,
                              out_bias=cfg.bias, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
                              qk_norm_kind=cfg.qk_norm_kind,
                              norm_offset=cfg.norm_offset,
                              scale=cfg.attn_scalar ** -0.5 if cfg.attn_scalar is not None else None,
                              softcap=cfg.attn_softcap)
        self.post_attn_norm = _norm(cfg)
        mlp = MLP if cfg.mlp == "plain" else SwiGLU
        self.mlp = mlp(cfg.width, cfg.mlp_dim, act=cfg.act, bias=cfg.bias)
        self.attn_out_norm = _norm(cfg) if cfg.post_norms else nn.Identity()
        self.mlp_out_norm = _norm(cfg) if cfg.post_norms else nn.Identity()
        self.swin = cfg.swin_norm

    def residual_outputs(self) -> tuple[nn.Linear, ...]:
        """The projections that write into the residual stream (scaled by depth at a from-scratch init)."""
        return self.attn.o_proj, self.mlp.output

    def forward(self, x, mask, is_causal, rope, cache, layer):
        mask = mask[self.kind] if isinstance(mask, dict) else mask
        rope = rope[self.kind] if isinstance(rope, dict) else rope
        if self.swin:  # Chameleon's swin_norm: input_norm / post_attn_norm norm the outputs, not the inputs
            x = x + self.input_norm(self.attn(x, mask=mask, is_causal=is_causal, rope=rope, cache=cache, layer=layer))
            return x + self.post_attn_norm(self.mlp(x))
        h = self.attn(self.input_norm(x), mask=mask, is_causal=is_causal, rope=rope, cache=cache, layer=layer)
        x = x + self.attn_out_norm(h)
        return x + self.mlp_out_norm(self.mlp(self.post_attn_norm(x)))


class ParallelBlock(nn.Module):
    """Phi-1.5 / Phi-2's block (``parallel_block``): one norm feeding attention and the MLP side by side,
    x + attn(norm(x)) + mlp(norm(x)). ``layer``: as DecoderBlock's (Phi has no per-layer kinds)."""

    def __init__(self, cfg: LanguageConfig, layer: int = 0):
        super().__init__()
        self.input_norm = _norm(cfg)
        self.attn = Attention(cfg.width, cfg.heads, cfg.kv_heads, cfg.head_dim, qkv_bias=cfg.qkv_bias or cfg.bias,
                              out_bias=cfg.bias, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps)
        self.mlp = (MLP if cfg.mlp == "plain" else SwiGLU)(cfg.width, cfg.mlp_dim, act=cfg.act, bias=cfg.bias)

    def residual_outputs(self) -> tuple[nn.Linear, ...]:
        return self.attn.o_proj, self.mlp.output

    def forward(self, x, mask, is_causal, rope, cache, layer):
        h = self.input_norm(x)
        return x + self.attn(h, mask=mask, is_causal=is_causal, rope=rope, cache=cache, layer=layer) + self.mlp(h)


class DecoderLM(nn.Module):
    """Token embedding -> blocks -> final norm -> LM head."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = (ScaledEmbedding if cfg.embed_scale else nn.Embedding)(cfg.vocab_size, cfg.width)
        block = ParallelBlock if cfg.parallel_block else DecoderBlock
        self.layers = nn.ModuleList(block(cfg, i) for i in range(cfg.depth))
        self.norm = _norm(cfg)
        self.lm_head = (nn.Linear(cfg.width, cfg.vocab_size, bias=cfg.head_bias) if cfg.logit_softcap is None
                        else CappedLinear(cfg.width, cfg.vocab_size, cfg.logit_softcap, cfg.head_bias))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if cfg.pos_embed == "learned":  # OPT: rows pos_offset .. pos_offset + max_seq_len - 1 are positions 0, 1, ...
            self.embed_positions = nn.Embedding(cfg.max_seq_len + cfg.pos_offset, cfg.width)
            self.rotary = None
        else:
            self.embed_positions = None
            self.rotary = rotary_embedding(cfg)
        self.rotary_local = local_rotary_embedding(cfg)

    @property
    def head_dim(self) -> int:
        return self.cfg.head_dim or self.cfg.width // self.cfg.heads

    def new_cache(self, batch: int, max_len: int, device=None, dtype=torch.float32) -> KVCache:
        return KVCache(self.cfg.depth, batch, self.cfg.kv_heads, self.head_dim, max_len, device, dtype)

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, depth: int | None = None) -> torch.Tensor:
        """embeds [B, T, D] -> final hidden states [B, T, D]. ``position_ids`` are [B, T], or [3, B, T] for an
        LM with ``mrope_section`` (Qwen2-VL's temporal / height / width ids; its model computes them).

        ``attention_mask`` [B, T_cache + T] marks real tokens (1) and padding (0); ``mask`` overrides the
        attention pattern completely ([B, 1, T, T_k] booleans, or a dict of them per layer kind for an LM with
        sliding layers). With neither, plain causal attention runs.
        ``depth``: the states after the first ``depth`` blocks instead, before the final norm (without a cache,
        which holds every layer; Fuyu's image tower reads them).
        """
        if depth is not None and cache is not None:
            raise ValueError("DecoderLM.forward(depth=...) stops before the last layers; a cache holds every layer")
        mask, is_causal, rope = self.attention_inputs(embeds, position_ids, attention_mask, mask, cache)
        x = embeds
        if self.embed_positions is not None:  # OPT: learned absolute positions, added to the input
            x = x + self.embed_positions(self.positions(embeds, position_ids, attention_mask, cache)
                                         + self.cfg.pos_offset)
        for i, layer in enumerate(self.layers[:depth]):
            x = layer(x, mask, is_causal, rope, cache, i)
        if depth is not None:
            return x
        if cache is not None:
            cache.advance(embeds.shape[1])
        return self.norm(x)

    def attention_inputs(self, embeds: torch.Tensor, position_ids: torch.Tensor | None,
                         attention_mask: torch.Tensor | None, mask: torch.Tensor | None,
                         cache: KVCache | None) -> tuple[torch.Tensor | None, bool, tuple]:
        """(mask, is_causal, rotary cos/sin) every layer of a forward takes: positions from the padding mask
        (or counted from the cache offset), and the causal fast path when nothing needs a mask. Wrappers that
        interleave their own blocks with the layers (fusion/cross_attention.py) start from the same. An LM with
        learned positions has no rotary (None); :meth:`forward` adds its positions to the input. An LM with
        sliding layers gets its masks per layer kind ({"full": ..., "sliding": ...}; a caller may give them so, as
        PaliGemma 2's prefix-LM mask, whose prompt pairs escape the window), and one with a local rotary table its
        rotary pairs the same way: each block picks its own."""
        T = embeds.shape[1]
        offset = cache.length if cache is not None else 0
        is_causal = mask is None and attention_mask is None and offset == 0
        if mask is None and not is_causal:
            mask = causal_mask(T, attention_mask, offset, device=embeds.device)
        positions = self.positions(embeds, position_ids, attention_mask, cache)
        if "sliding" in self.cfg.layer_types and not isinstance(mask, dict):  # the same pattern within the window
            base = mask if mask is not None else causal_mask(T, None, offset, device=embeds.device)
            mask = {"full": mask, "sliding": sliding_window(base, self.cfg.sliding_window, positions)}
        if self.rotary is None:
            return mask, is_causal, None
        rope = self.rotary(positions, embeds.dtype)
        if self.rotary_local is not None:
            rope = {"full": rope, "sliding": self.rotary_local(positions, embeds.dtype)}
        return mask, is_causal, rope

    @staticmethod
    def positions(embeds: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                  cache: KVCache | None) -> torch.Tensor:
        """The position ids of a forward: ``position_ids`` when given (a packed batch passes each sample's own),
        else counted from each row's first real token (``attention_mask``, as transformers), else from the
        cache offset. Padding gets position 0 (it is never attended to)."""
        if position_ids is not None:
            return position_ids
        B, T, _ = embeds.shape
        offset = cache.length if cache is not None else 0
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, offset:offset + T]
        return torch.arange(offset, offset + T, device=embeds.device)[None].expand(B, T)
