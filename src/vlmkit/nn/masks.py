"""Attention masks: boolean, True = "may attend", shaped [B or 1, 1, T_q, T_k] for ``scaled_dot_product_attention``.

- :func:`causal_mask`: causal, minus padded keys, after a KV cache offset;
- :func:`document_mask`: a packed batch's block-diagonal causal mask (each sample sees only itself; questions that
  share a prefix see the prefix and themselves);
- :func:`with_prompt`: any of these with the prompt tokens of each row (or sample) attending to each other both
  ways: the prefix-LM pattern (PaliGemma);
- :func:`with_blocks`: any of these with the tokens of each block (an image's latents or codes) attending to each
  other both ways: bidirectional attention within an image, causal elsewhere (Transfusion; Show-o's omni-attention);
  :func:`block_ids` numbers the blocks of a row, :func:`block_attention` builds the whole mask of such a model;
- :func:`sliding_window`: any of these restricted to the keys within a window before each query (Gemma 2 / 3's
  sliding layers);
- :func:`document_starts`, :func:`per_document_cumsum`: helpers over ``document_ids``.

In every mask a query row that is padding keeps its own diagonal, so that no row is fully masked (SDPA would return
NaN there).
"""

from __future__ import annotations

import torch


def causal_mask(q_len: int, attention_mask: torch.Tensor | None = None, offset: int = 0,
                device=None) -> torch.Tensor:
    """Boolean [B or 1, 1, q_len, offset + q_len] mask: causal, minus padded keys.

    ``attention_mask`` [B, offset + q_len] has 1 for real tokens; the queries are positions ``offset ..``."""
    k_len = offset + q_len
    if attention_mask is not None:
        device = attention_mask.device
    q_pos = torch.arange(offset, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, Tq, Tk]
    if attention_mask is not None:
        keys = attention_mask[:, None, None, :k_len].bool()  # [B, 1, 1, Tk]
        mask = (mask & keys) | (k_pos == q_pos)[None, None]
    return mask


def document_mask(document_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, T, T] mask of a packed batch: causal within each document (``document_ids`` >= 0, -1 = padding),
    nothing across documents; with ``segment_ids``, a token of segment k > 0 sees its document's segment 0 (the
    shared prefix) and its own segment only."""
    T = document_ids.shape[-1]
    q, k = document_ids[:, :, None], document_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    mask = causal & (q == k) & (k >= 0)
    if segment_ids is not None:
        sq, sk = segment_ids[:, :, None], segment_ids[:, None, :]
        mask &= (sk == 0) | (sk == sq)
    return (mask | torch.eye(T, dtype=torch.bool, device=document_ids.device))[:, None]


def with_prompt(mask: torch.Tensor, prompt_mask: torch.Tensor, document_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mask`` [B or 1, 1, T, T] (no cache offset) plus every pair of prompt tokens (``prompt_mask`` [B, T]) of one
    row, or of one document of a packed row, seeing each other: prefix-LM attention. Padded keys stay masked."""
    T = prompt_mask.shape[-1]
    if mask.shape[-1] != T or mask.shape[-2] != T:
        raise ValueError(f"with_prompt: the prompt is read at a prefill; got a mask of {tuple(mask.shape)} for "
                         f"{T} prompt positions")
    both = prompt_mask[:, :, None] & prompt_mask[:, None, :]  # [B, T, T]
    if document_ids is not None:
        both = both & (document_ids[:, :, None] == document_ids[:, None, :]) & (document_ids[:, None, :] >= 0)
    if attention_mask is not None:
        both = both & attention_mask[:, None, :T].bool()
    return mask | both[:, None]


def block_ids(in_block: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] ids of the blocks of ``in_block`` [B, T] (True: a token of a block, e.g. an image's latent patches):
    each maximal run of True gets its own id, unique in its row (0, 1, ...), -1 elsewhere. A packed sample's start
    (``document_ids``) also starts a new block, so two samples' adjacent images stay apart."""
    prev = torch.nn.functional.pad(in_block, (1, 0), value=False)[:, :-1]
    starts = in_block & ~prev
    if document_ids is not None:
        starts = in_block & (starts | document_starts(document_ids))
    return (starts.long().cumsum(-1) - 1).masked_fill(~in_block, -1)


def with_blocks(mask: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``mask`` [B or 1, 1, Tq, Tk] plus every pair of tokens of one block seeing each other both ways: ``blocks``
    [B, Tk] are the keys' block ids (:func:`block_ids`; -1: in none) and the queries are the last Tq keys (after a
    cache, the tokens just read). Within an image every latent sees every other, before and after it; a token
    outside the block sees it only as ``mask`` allows (causally: text never sees a later image). Padded tokens are
    in no block, so padded keys stay masked."""
    Tq = mask.shape[-2]
    q, k = blocks[:, -Tq:, None], blocks[:, None, :]
    return mask | ((q == k) & (k >= 0))[:, None]


def block_attention(in_block: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    document_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                    offset: int = 0) -> torch.Tensor:
    """The mask of a model that reads text causally and each image both ways (Show-o's omni-attention,
    Transfusion's): a packed batch's :func:`document_mask` (with ``document_ids``) or :func:`causal_mask` after a
    cache of ``offset`` tokens, plus :func:`with_blocks` over the blocks of ``in_block`` [B, T] (the tokens just
    read; the cached ones are in no block: a cache holds a prompt, whose images were read whole)."""
    if document_ids is not None:
        base = document_mask(document_ids, segment_ids)
    else:
        base = causal_mask(in_block.shape[1], attention_mask, offset, device=in_block.device)
    blocks = block_ids(in_block, document_ids)
    if offset:
        blocks = torch.nn.functional.pad(blocks, (offset, 0), value=-1)
    return with_blocks(base, blocks)


def sliding_window(mask: torch.Tensor, window: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """``mask`` [B or 1, 1, Tq, Tk] minus the keys ``window`` or more positions before their query: a key k stays
    where k > q - window (transformers' ``sliding_window_overlay``, ANDed after any bidirectional block, so keys
    after the query stay as ``mask`` has them).

    Distances are counted in the columns of the mask (its queries being its last Tq columns, after a cache), or,
    when the queries are the keys (no cache), in ``positions`` [B, T] if given: the same within a left-padded row
    or a packed sample, and right for questions grouped after a shared prefix, which continue its positions."""
    Tq, Tk = mask.shape[-2:]
    if positions is not None and positions.ndim == 2 and Tq == Tk:
        q, k = positions[:, None, :, None], positions[:, None, None, :]
    else:
        q = torch.arange(Tk - Tq, Tk, device=mask.device)[:, None]
        k = torch.arange(Tk, device=mask.device)[None, :]
    return mask & (k > q - window)


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] booleans: the first token of each document of a packed batch."""
    prev = torch.nn.functional.pad(document_ids, (1, 0), value=-1)[:, :-1]
    return (document_ids != prev) & (document_ids >= 0)


def per_document_cumsum(x: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum of ``x`` [B, T] restarting at every document of a packed batch."""
    total = x.cumsum(-1)
    starts = document_starts(document_ids)
    before = torch.where(starts, total - x, torch.zeros_like(total))  # the running sum where each document starts
    return total - before.cummax(-1).values


__all__ = ["block_attention", "block_ids", "causal_mask", "document_mask", "document_starts", "per_document_cumsum",
           "sliding_window",
           "with_blocks", "with_prompt"]
