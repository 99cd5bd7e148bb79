"""Mask-predict over a grid of discrete codes (MaskGIT, Chang et al. 2022; Show-o's discrete diffusion): training's
cosine masking draw and sampling's iterative unmasking, for any family whose model predicts every masked code of an
image at once from the codes around it.

- **The schedule** ``gamma(r) = cos(pi/2 * r)``: in training a share ``gamma(u)`` of an image's codes is masked,
  ``u ~ U(0, 1)`` per sample (:func:`training_mask`, at least one code); in sampling, after step ``s`` of ``S``,
  ``floor(N * gamma((s+1)/S))`` of the ``N`` codes stay masked (:func:`masked_after`): all at the start, none
  after the last step.
- **A step** (:func:`unmask`): the model's logits over the ``K`` codes at every position of the current grid, the
  conditional and (guidance) unconditional rows run as one batch and combined as
  ``uncond + cfg_scale * (cond - uncond)`` (:func:`guide`, Ho & Salimans' form, as image_generation.py's); every
  masked position is sampled at ``temperature`` (0: argmax; ``top_k``: among the k best) from one generator seeded
  with the request's seed; the codes fixed at earlier steps are kept; of the new ones, the lowest-confidence are
  masked again so that the schedule's count stays masked.
- **Confidence** is the sampled code's probability (at the sampling temperature) plus MaskGIT's annealed Gumbel
  noise on its log: ``log p + temperature * (1 - (s+1)/S) * g``, ``g ~ Gumbel(0, 1)`` from the same generator
  (Show-o's ``mask_by_random_topk``), so early steps do not all fix the easiest codes (the background) first. At
  temperature 0 there is no noise: the draw is greedy and deterministic without a seed.

The model side is a function ``logits_of(codes, masked) -> logits [rows, N, K]`` (rows: ``n`` conditional then,
with guidance, ``n`` unconditional), so the sampler knows nothing of prompts, caches or vocabularies.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch


def schedule(r: float) -> float:
    """MaskGIT's cosine schedule: the share of codes masked at ratio ``r`` in [0, 1]."""
    return math.cos(math.pi / 2 * r)


def masked_after(step: int, steps: int, n: int) -> int:
    """How many of ``n`` codes stay masked after sampling step ``step`` (0-based) of ``steps``."""
    if step >= steps - 1:
        return 0
    return int(math.floor(n * schedule((step + 1) / steps)))


def training_mask(n: int, rng: random.Random) -> list[int]:
    """The positions (sorted) of ``n`` codes to mask in one training sample: a share ``cos(pi/2 * u)``,
    ``u ~ U(0, 1)`` from ``rng``, rounded up (at least one)."""
    share = schedule(rng.random())
    k = min(n, max(1, math.ceil(share * n)))
    return sorted(rng.sample(range(n), k))


def guide(logits: torch.Tensor, n: int, cfg_scale: float) -> torch.Tensor:
    """The guided logits of ``n`` images: ``logits`` holds ``n`` conditional rows, then (when ``cfg_scale`` != 1)
    ``n`` unconditional ones; returns ``uncond + cfg_scale * (cond - uncond)`` (the conditional rows alone at 1)."""
    if cfg_scale == 1.0:
        return logits[:n]
    cond, uncond = logits[:n], logits[n:2 * n]
    return uncond + cfg_scale * (cond - uncond)


def _sample(logits: torch.Tensor, temperature: float, top_k: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, N, K] -> (sampled codes [n, N], their log-probabilities at ``temperature``)."""
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0:
        codes = logits.argmax(-1)
        return codes, torch.log_softmax(logits, -1).gather(-1, codes[..., None])[..., 0]
    logp = torch.log_softmax(logits / temperature, -1)
    flat = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=generator)
    codes = flat.view(logp.shape[:-1])
    return codes, logp.gather(-1, codes[..., None])[..., 0]


def _gumbel(shape, generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-20, 1 - 1e-7)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def unmask(logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n: int, length: int, steps: int,
           cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, seed: int | None = None,
           device=None, progress: bool = False,
           trace: list | None = None) -> torch.Tensor:
    """``n`` grids of ``length`` codes [n, length] by iterative unmasking in ``steps`` steps (module docstring).
    ``logits_of(codes, masked)`` gets the current codes [n, length] (any value where ``masked``) and the mask
    [n, length] and returns logits [n or 2n, length, K]. ``trace``: appended the (codes, masked) after each step."""
    from tqdm.auto import tqdm

    generator = torch.Generator(device=device or "cpu")
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    codes = torch.zeros(n, length, dtype=torch.long, device=device)
    masked = torch.ones(n, length, dtype=torch.bool, device=device)
    for s in tqdm(range(steps), desc="unmask", unit="step", disable=not progress, dynamic_ncols=True, leave=False):
        logits = guide(logits_of(codes, masked), n, cfg_scale)
        sampled, logp = _sample(logits, temperature, top_k, generator)
        noise = temperature * (1 - (s + 1) / steps)
        if noise > 0:
            logp = logp + noise * _gumbel(logp.shape, generator, logp.device)
        codes = torch.where(masked, sampled, codes)
        keep = masked_after(s, steps, length)
        confidence = logp.masked_fill(~masked, float("inf"))  # fixed codes are never masked again
        again = torch.zeros_like(masked)
        if keep:
            again.scatter_(1, confidence.topk(keep, dim=1, largest=False).indices, True)
        masked = again
        if trace is not None:
            trace.append((codes.clone(), masked.clone()))
    return codes


__all__ = ["guide", "masked_after", "schedule", "training_mask", "unmask"]
