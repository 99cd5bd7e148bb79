"""Confidence intervals for benchmark scores.

A benchmark score is the mean of per-sample scores (0/1 correctness, VQA accuracy, ...). Its sampling
uncertainty is estimated here with the percentile bootstrap (Efron & Tibshirani, "An Introduction to the
Bootstrap", ch. 13): draw ``n_resamples`` samples of size n with replacement, take each one's mean, and report
the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those means (``numpy.quantile``,
linear interpolation). Resampling is vectorised with numpy and seeded, so a given (scores, confidence,
n_resamples, seed) always gives the same interval; drawing in blocks (to bound memory) does not change the
draws.

Degenerate inputs give a defined result instead of an error: no scores -> ``(nan, nan)`` (the mean is
undefined); one score or all scores equal -> ``(v, v)``, a zero-width interval (every resample has the same
mean; this says nothing about the uncertainty of a larger evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from vlmkit.errors import ConfigError, DataError

# Resamples are drawn in blocks of at most this many indices, to bound memory for large evaluations.
_MAX_BLOCK_ELEMENTS = 1 << 22


class ConfidenceInterval(NamedTuple):
    """A two-sided interval, unpackable as ``(low, high)``."""

    low: float
    high: float


def bootstrap_ci(scores: Iterable[float] | np.ndarray, *, confidence: float = 0.95, n_resamples: int = 1000,
                 seed: int = 0) -> ConfidenceInterval:
    """Percentile-bootstrap confidence interval of the mean of ``scores``.

    ``scores``: per-sample scores (any finite numbers). ``confidence``: in (0, 1), 0.95 for a 95% interval.
    ``n_resamples``: number of bootstrap resamples (>= 1; 1000 is usual, 10000 for steadier quantiles).
    ``seed``: seed of ``numpy.random.default_rng``; the result depends only on (scores, confidence,
    n_resamples, seed). Returns ``(low, high)``; see the module docstring for empty and constant inputs.
    """
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence: expected a number strictly between 0 and 1 (0.95 for 95%), "
                          f"got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ConfigError(f"n_resamples: expected a positive integer, got {n_resamples!r}")
    try:
        values = np.asarray(list(scores) if not isinstance(scores, np.ndarray) else scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"scores: expected numbers, could not convert them ({exc})") from None
    if values.ndim != 1:
        raise DataError(f"scores: expected a flat sequence of per-sample scores, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise DataError(f"scores[{bad}]: expected a finite number, got {values[bad]!r}")

    n = values.size
    if n == 0:
        return ConfidenceInterval(math.nan, math.nan)
    if np.all(values == values[0]):
        return ConfidenceInterval(float(values[0]), float(values[0]))

    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    block = max(1, _MAX_BLOCK_ELEMENTS // n)
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
    return ConfidenceInterval(float(low), float(high))
