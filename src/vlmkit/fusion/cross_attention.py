"""Cross-attention fusion (Flamingo / IDEFICS): the LM reads images through gated cross-attention blocks
inserted between its decoder layers, instead of image tokens spliced into its sequence.

Each :class:`GatedCrossAttentionBlock` is a pre-norm residual block, cross-attention from the text hidden
states to the image hidden states followed by a SwiGLU MLP, each branch scaled by ``tanh(alpha)`` with the
alphas initialised at zero. A fresh block is therefore exactly the identity and a pretrained LM inserted into
it keeps its outputs; training opens the gates gradually. Numerically the same as transformers'
``IdeficsGatedCrossAttentionLayer`` (:func:`idefics_gated_xattn_key_map` gives its tensor names).

Which image each text token sees is an ``image_attention_mask`` [B, T, S] over the S = n_images * M image
tokens of its sample; :func:`media_mask` builds Flamingo's default (the most recent image at or before the
token). A token that sees no image gets no cross-attention output (IDEFICS' ``cross_attention_gate``), only
the gated MLP.

:func:`add_cross_attention` wraps a vlmkit :class:`~vlmkit.lm.decoder.DecoderLM` with such blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.lm.decoder import DecoderLM
from vlmkit.nn import KVCache, RMSNorm, SwiGLU


def media_mask(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int, only_last: bool = True,
               num_images: int | None = None) -> torch.Tensor:
    """Boolean [B, T, num_images * tokens_per_image] image attention mask from the image placeholders in
    ``input_ids`` [B, T] (one ``image_token_id`` per image, in reading order).

    Image j of a sample owns image tokens [j * M, (j + 1) * M) (M = ``tokens_per_image``), the layout in
    which the image hidden states of that sample are concatenated. Position t marks the tokens of the most
    recent image at or before t (``only_last``, Flamingo's default and what IDEFICS' processor builds), or of
    every image at or before t (``only_last=False``). Positions before the first image mark nothing.
    ``num_images`` defaults to the largest number of images in one sample; samples with fewer images never
    mark the unused slots.
    """
    is_image = input_ids == image_token_id  # [B, T]
    most = int(is_image.sum(-1).max()) if input_ids.numel() else 0
    n = most if num_images is None else num_images
    if most > n:
        raise ValueError(f"a sample has {most} image tokens but num_images is {n}")
    latest = is_image.long().cumsum(-1) - 1  # [B, T] index of the most recent image, -1 before any
    slots = torch.arange(n, device=input_ids.device)  # [n]
    sees = latest[..., None] == slots if only_last else slots <= latest[..., None]  # [B, T, n]
    B, T = input_ids.shape
    return sees[..., None].expand(B, T, n, tokens_per_image).reshape(B, T, n * tokens_per_image)


class CrossAttention(nn.Module):
    """Multi-head attention from x [B, T, dim] to images [B, S, d_image], no biases, head_dim = dim / heads
    (IDEFICS). ``qk_norm`` adds an RMSNorm over each head's queries and keys (IDEFICS' ``qk_layer_norms``)."""

    def __init__(self, dim: int, d_image: int, heads: int, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(d_image, dim, bias=False)
        self.v_proj = nn.Linear(d_image, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]

    def forward(self, x: torch.Tensor, images: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` [B, 1, T, S] booleans, True = may attend; every row must allow at least one key."""
        B, T, _ = x.shape
        q = self._split(self.q_proj(x))
        k, v = self._split(self.k_proj(images)), self._split(self.v_proj(images))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(alpha_cross_attn) * xattn(norm(x), images); then x + tanh(alpha_dense) * mlp(norm(x)).

    ``alpha_type`` "float" gives one scalar gate per branch, "vector" one per channel ([1, 1, dim]); both
    start at zero (IDEFICS' ``alpha_initializer="zeros"``), so a fresh block returns its input exactly.
    """

    def __init__(self, dim: int, d_image: int, heads: int, mlp_dim: int, act: str = "silu", eps: float = 1e-6,
                 qk_norm: bool = False, alpha_type: str = "float"):
        super().__init__()
        if alpha_type not in ("float", "vector"):
            raise ValueError(f"alpha_type must be 'float' or 'vector', got {alpha_type!r}")
        self.input_norm = RMSNorm(dim, eps)
        self.attn = CrossAttention(dim, d_image, heads, qk_norm, eps)
        self.post_attn_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_dim, act=act)
        shape = (1,) if alpha_type == "float" else (1, 1, dim)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(shape))
        self.alpha_dense = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor, images: torch.Tensor | None,
                image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim], images [B, S, d_image] (a sample's images concatenated), ``image_attention_mask``
        [B, T, S] booleans (True = may attend; None = every token sees every image token). ``images`` None or
        S = 0: no token sees an image, only the gated MLP runs (as IDEFICS with an all-zero gate)."""
        if images is not None and images.shape[1] > 0:
            if image_attention_mask is None:
                image_attention_mask = torch.ones(x.shape[:2] + images.shape[1:2], dtype=torch.bool,
                                                  device=x.device)
            sees = image_attention_mask.bool()  # [B, T, S]
            gate = sees.any(-1, keepdim=True)  # [B, T, 1]: the token sees at least one image token
            # rows that see nothing attend everywhere (SDPA would give NaN for an empty row); zeroed below
            attn_mask = (sees | ~gate)[:, None]  # [B, 1, T, S]
            h = self.attn(self.input_norm(x), images, attn_mask)
            h = h.masked_fill(~gate, 0.0)
            x = x + torch.tanh(self.alpha_cross_attn) * h
        return x + torch.tanh(self.alpha_dense) * self.mlp(self.post_attn_norm(x))


# vlmkit name -> IDEFICS name inside one gated cross-attention layer
_BLOCK_NAMES = {
    "input_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "cross_attn.q_proj.weight",
    "attn.k_proj.weight": "cross_attn.k_proj.weight",
    "attn.v_proj.weight": "cross_attn.v_proj.weight",
    "attn.o_proj.weight": "cross_attn.o_proj.weight",
    "attn.q_norm.weight": "cross_attn.q_layer_norm.weight",
    "attn.k_norm.weight": "cross_attn.k_layer_norm.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "alpha_cross_attn": "alpha_cross_attn",
    "alpha_dense": "alpha_dense",
}


def idefics_gated_xattn_key_map(qk_norm: bool = False, prefix: str = "",
                                theirs_prefix: str = "") -> dict[str, str]:
    """{vlmkit ``GatedCrossAttentionBlock`` key: IDEFICS ``IdeficsGatedCrossAttentionLayer`` key}, each side
    with its prefix (e.g. ``xattn.0.`` and ``model.gated_cross_attn_layers.0.``)."""
    skip = () if qk_norm else ("attn.q_norm.weight", "attn.k_norm.weight")
    return {f"{prefix}{ours}": f"{theirs_prefix}{theirs}" for ours, theirs in _BLOCK_NAMES.items()
            if ours not in skip}


class CrossAttentionLM(nn.Module):
    """A :class:`DecoderLM` with a :class:`GatedCrossAttentionBlock` before decoder layers 0, k, 2k, ...
    (``every`` = k; IDEFICS' ``cross_layer_interval``, Flamingo's "every k-th layer").

    A wrapper rather than a change to ``lm/decoder.py``: the splice-fusion families share ``DecoderLM`` and
    its checkpoints, and cross-attention needs its layer loop to take extra inputs (images and their mask). So
    this module holds the LM unchanged (``self.lm``, same tensor names under ``lm.``) plus ``self.xattn``, and
    :meth:`forward` runs ``DecoderLM.forward``'s loop (from the same ``attention_inputs``) with the blocks
    interleaved. The image keys and values are recomputed every step (no cross-attention
    cache, as in IDEFICS); the LM's own KV cache works as before.
    """

    def __init__(self, lm: DecoderLM, every: int, d_image: int, heads: int | None = None,
                 mlp_dim: int | None = None, qk_norm: bool = False, alpha_type: str = "float"):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        cfg = lm.cfg
        self.lm, self.every = lm, every
        self.xattn = nn.ModuleList(
            GatedCrossAttentionBlock(cfg.width, d_image, heads or cfg.heads, mlp_dim or cfg.mlp_dim, cfg.act,
                                     cfg.norm_eps, qk_norm, alpha_type)
            for _ in range(0, cfg.depth, every))

    # the parts a caller of a DecoderLM uses, so that this can stand in for one
    @property
    def cfg(self):
        return self.lm.cfg

    @property
    def embed_tokens(self) -> nn.Module:
        return self.lm.embed_tokens

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.lm_head

    def new_cache(self, batch: int, max_len: int, device=None, dtype=torch.float32) -> KVCache:
        return self.lm.new_cache(batch, max_len, device, dtype)

    def forward(self, embeds: torch.Tensor, images: torch.Tensor | None = None,
                image_attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """embeds [B, T, D] -> final hidden states [B, T, D], as ``DecoderLM.forward``; ``images``
        [B, S, d_image] and ``image_attention_mask`` [B, T, S] (the rows of the T positions being run, e.g.
        from :func:`media_mask`) go to every gated block."""
        lm = self.lm
        mask, is_causal, rope = lm.attention_inputs(embeds, position_ids, attention_mask, mask, cache)
        x = embeds
        for i, layer in enumerate(lm.layers):
            if i % self.every == 0:
                x = self.xattn[i // self.every](x, images, image_attention_mask)
            x = layer(x, mask, is_causal, rope, cache, i)
        if cache is not None:
            cache.advance(embeds.shape[1])
        return lm.norm(x)

    def freeze_lm(self) -> None:
        """Flamingo's recipe: the LM stays frozen, only the gated blocks (and the resampler) train."""
        self.lm.requires_grad_(False)


def add_cross_attention(lm: DecoderLM, every: int, d_image: int, heads: int | None = None,
                        mlp_dim: int | None = None, qk_norm: bool = False,
                        alpha_type: str = "float") -> CrossAttentionLM:
    """Wrap ``lm`` with gated cross-attention blocks before every ``every``-th layer (0, every, 2 * every,
    ...). The blocks take the LM's width, heads, MLP width, activation and norm eps unless ``heads`` /
    ``mlp_dim`` are given; ``d_image`` is the width of the image hidden states (e.g. the perceiver's). Fresh
    gates are zero: the wrapped LM computes exactly what ``lm`` does until they are trained."""
    return CrossAttentionLM(lm, every, d_image, heads, mlp_dim, qk_norm, alpha_type)
