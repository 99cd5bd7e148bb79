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

Llama 3.2 Vision (Mllama) uses the same block with grouped-query cross-attention (``kv_heads``), per-head
RMSNorm on queries and keys, and its own rule for such tokens (``empty_rows="mllama"``, transformers'
``MllamaCrossAttentionDecoderLayer``): they attend to every image token of their sample, and their MLP branch
is dropped.

:func:`add_cross_attention` wraps a vlmkit :class:`~vlmkit.lm.decoder.DecoderLM` with such blocks, before every
k-th layer or at explicit positions.
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
    (IDEFICS). ``qk_norm`` adds an RMSNorm over each head's queries and keys (IDEFICS' ``qk_layer_norms``,
    Mllama's ``q_norm`` / ``k_norm``); ``kv_heads`` < ``heads`` shares each key/value head among a group of
    query heads (grouped-query attention, Mllama)."""

    def __init__(self, dim: int, d_image: int, heads: int, qk_norm: bool = False, eps: float = 1e-6,
                 kv_heads: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.kv_heads = kv_heads or heads
        if heads % self.kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({self.kv_heads})")
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(d_image, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_image, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else None

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]

    def project_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, S, d_image] -> (keys, values) [B, H_kv, S, hd], keys normed: what :meth:`forward` attends
        to, computed once when the same images serve several calls (decoding steps)."""
        k = self._split(self.k_proj(images), self.kv_heads)
        v = self._split(self.v_proj(images), self.kv_heads)
        return (self.k_norm(k) if self.k_norm is not None else k), v

    def forward(self, x: torch.Tensor, images: torch.Tensor | None, mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``mask`` [B, 1, T, S] booleans, True = may attend; every row must allow at least one key. ``kv``:
        :meth:`project_images` of the images, used instead of ``images``."""
        B, T, _ = x.shape
        q = self._split(self.q_proj(x), self.heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        k, v = kv if kv is not None else self.project_images(images)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)  # [B, H, S, hd]
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


EMPTY_ROWS = ("idefics", "mllama")


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(alpha_cross_attn) * xattn(norm(x), images); then x + tanh(alpha_dense) * mlp(norm(x)).

    ``alpha_type`` "float" gives one scalar gate per branch, "vector" one per channel ([1, 1, dim]); both
    start at zero (IDEFICS' ``alpha_initializer="zeros"``), so a fresh block returns its input exactly.

    ``empty_rows`` says what a token that sees no image gets. "idefics": no cross-attention output, the gated
    MLP as usual (IDEFICS' ``cross_attention_gate``). "mllama": it attends to every image token of its sample
    (transformers' ``MllamaCrossAttentionDecoderLayer`` turns its all-masked row into an all-open one) and its
    MLP branch is dropped (``full_text_row_masked_out_mask``); with no image at all the block is skipped.
    """

    def __init__(self, dim: int, d_image: int, heads: int, mlp_dim: int, act: str = "silu", eps: float = 1e-6,
                 qk_norm: bool = False, alpha_type: str = "float", kv_heads: int | None = None,
                 empty_rows: str = "idefics"):
        super().__init__()
        if alpha_type not in ("float", "vector"):
            raise ValueError(f"alpha_type must be 'float' or 'vector', got {alpha_type!r}")
        if empty_rows not in EMPTY_ROWS:
            raise ValueError(f"empty_rows must be one of {', '.join(EMPTY_ROWS)}, got {empty_rows!r}")
        self.empty_rows = empty_rows
        self.input_norm = RMSNorm(dim, eps)
        self.attn = CrossAttention(dim, d_image, heads, qk_norm, eps, kv_heads)
        self.post_attn_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_dim, act=act)
        shape = (1,) if alpha_type == "float" else (1, 1, dim)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(shape))
        self.alpha_dense = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor, images: torch.Tensor | None,
                image_attention_mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim], images [B, S, d_image] (a sample's images concatenated), ``image_attention_mask``
        [B, T, S] booleans (True = may attend; None = every token sees every image token). ``images`` None or
        S = 0: no token sees an image, only the gated MLP runs (as IDEFICS with an all-zero gate; "mllama" skips
        the block).

        ``kv``: ``self.attn.project_images(images)``, used instead of ``images``. ``key_mask`` [B, 1 or T, S]:
        the image tokens that are each token's own sample's (padding slots of a batch, other samples of a
        packed row excluded); None = all S. A token never attends outside it."""
        S = kv[0].shape[2] if kv is not None else images.shape[1] if images is not None else 0
        if S == 0:
            if self.empty_rows == "mllama":  # transformers skips the layer when there is no image
                return x
            return x + torch.tanh(self.alpha_dense) * self.mlp(self.post_attn_norm(x))
        B, T = x.shape[:2]
        sees = (torch.ones(B, T, S, dtype=torch.bool, device=x.device) if image_attention_mask is None
                else image_attention_mask.bool())  # [B, T, S]
        if key_mask is not None:
            sees = sees & key_mask.bool()
        seen = sees.any(-1, keepdim=True)  # [B, T, 1]: the token sees at least one image token
        if self.empty_rows == "mllama":  # a row that sees nothing attends to all of its sample's image tokens
            keys = key_mask.bool().expand(B, T, S) if key_mask is not None else torch.ones_like(sees)
            sees = torch.where(seen, sees, keys)
        gate = sees.any(-1, keepdim=True)  # [B, T, 1]: the row attends somewhere
        # rows that attend nowhere get all keys (SDPA would give NaN for an empty row); zeroed below
        attn_mask = (sees | ~gate)[:, None]  # [B, 1, T, S]
        h = self.attn(self.input_norm(x), images, attn_mask, kv)
        h = h.masked_fill(~gate, 0.0)
        x = x + torch.tanh(self.alpha_cross_attn) * h
        h = self.mlp(self.post_attn_norm(x))
        if self.empty_rows == "mllama":
            h = h.masked_fill(~seen, 0.0)
        return x + torch.tanh(self.alpha_dense) * h


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
    (``every`` = k; IDEFICS' ``cross_layer_interval``, Flamingo's "every k-th layer"), or at explicit
    ``positions``: block j runs before decoder layer ``positions[j]`` (``depth``: after the last one). Mllama
    numbers its cross-attention layers among its decoder layers (``cross_attention_layers``); here the LM keeps
    its self-attention layers only, so its HF layer c_j (the j-th cross layer) is position c_j - j.

    A wrapper rather than a change to ``lm/decoder.py``: the splice-fusion families share ``DecoderLM`` and
    its checkpoints, and cross-attention needs its layer loop to take extra inputs (images and their mask). So
    this module holds the LM unchanged (``self.lm``, same tensor names under ``lm.``) plus ``self.xattn``, and
    :meth:`forward` runs ``DecoderLM.forward``'s loop (from the same ``attention_inputs``) with the blocks
    interleaved. By default the image keys and values are recomputed every step (as in IDEFICS); a decoding
    loop can compute them once with :meth:`project_images` and pass them as ``image_kv``. The LM's own KV
    cache works as before.
    """

    def __init__(self, lm: DecoderLM, every: int | None, d_image: int, heads: int | None = None,
                 mlp_dim: int | None = None, qk_norm: bool = False, alpha_type: str = "float", *,
                 positions: list[int] | None = None, kv_heads: int | None = None, empty_rows: str = "idefics"):
        super().__init__()
        cfg = lm.cfg
        if (every is None) == (positions is None):
            raise ValueError("give exactly one of every (a block before every k-th layer) and positions")
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        positions = list(range(0, cfg.depth, every)) if every is not None else list(positions)
        if positions != sorted(positions) or any(not 0 <= p <= cfg.depth for p in positions):
            raise ValueError(f"positions {positions} must be sorted and within 0..{cfg.depth} (the LM's depth)")
        self.lm, self.every, self.positions = lm, every, positions
        self.xattn = nn.ModuleList(
            GatedCrossAttentionBlock(cfg.width, d_image, heads or cfg.heads, mlp_dim or cfg.mlp_dim, cfg.act,
                                     cfg.norm_eps, qk_norm, alpha_type, kv_heads, empty_rows)
            for _ in positions)

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

    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.layers

    def new_cache(self, batch: int, max_len: int, device=None, dtype=torch.float32) -> KVCache:
        return self.lm.new_cache(batch, max_len, device, dtype)

    def project_images(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every block's keys and values of ``images`` [B, S, d_image], to pass as ``image_kv``."""
        return [block.attn.project_images(images) for block in self.xattn]

    def forward(self, embeds: torch.Tensor, images: torch.Tensor | None = None,
                image_attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, *, image_kv: list | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """embeds [B, T, D] -> final hidden states [B, T, D], as ``DecoderLM.forward``; ``images``
        [B, S, d_image] (or their ``image_kv``), ``image_attention_mask`` [B, T, S] (the rows of the T positions
        being run, e.g. from :func:`media_mask`) and ``key_mask`` go to every gated block."""
        lm = self.lm
        mask, is_causal, rope = lm.attention_inputs(embeds, position_ids, attention_mask, mask, cache)
        x = embeds
        if lm.embed_positions is not None:  # learned absolute positions (OPT), as DecoderLM
            x = x + lm.embed_positions(lm.positions(embeds, position_ids, attention_mask, cache) + lm.cfg.pos_offset)
        j = 0
        for i in range(len(lm.layers) + 1):
            while j < len(self.positions) and self.positions[j] == i:
                kv = image_kv[j] if image_kv is not None else None
                x = self.xattn[j](x, images, image_attention_mask, kv, key_mask)
                j += 1
            if i < len(lm.layers):
                x = lm.layers[i](x, mask, is_causal, rope, cache, i)
        if cache is not None:
            cache.advance(embeds.shape[1])
        return lm.norm(x)

    def freeze_lm(self) -> None:
        """Flamingo's recipe: the LM stays frozen, only the gated blocks (and the resampler) train."""
        self.lm.requires_grad_(False)


def add_cross_attention(lm: DecoderLM, every: int | None, d_image: int, heads: int | None = None,
                        mlp_dim: int | None = None, qk_norm: bool = False, alpha_type: str = "float", *,
                        positions: list[int] | None = None, kv_heads: int | None = None,
                        empty_rows: str = "idefics") -> CrossAttentionLM:
    """Wrap ``lm`` with gated cross-attention blocks before every ``every``-th layer (0, every, 2 * every,
    ...), or before the layers listed in ``positions`` (``every=None``). The blocks take the LM's width, heads,
    MLP width, activation and norm eps unless ``heads`` / ``mlp_dim`` are given; ``d_image`` is the width of
    the image hidden states (e.g. the perceiver's); ``kv_heads`` and ``empty_rows`` as
    :class:`GatedCrossAttentionBlock` (Mllama: the LM's kv heads, "mllama"). Fresh gates are zero: the wrapped
    LM computes exactly what ``lm`` does until they are trained."""
    return CrossAttentionLM(lm, every, d_image, heads, mlp_dim, qk_norm, alpha_type, positions=positions,
                            kv_heads=kv_heads, empty_rows=empty_rows)
