"""Percentile bootstrap confidence interval of a mean (vlmkit.eval.metrics.stats)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.metrics.stats import ConfidenceInterval, bootstrap_ci


def _bernoulli(n: int, p: float = 0.7, seed: int = 123) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_deterministic_for_a_seed_and_changes_with_it() -> None:
    scores = _bernoulli(200)
    assert bootstrap_ci(scores, seed=7) == bootstrap_ci(list(scores), seed=7)
    assert bootstrap_ci(scores, seed=7) != bootstrap_ci(scores, seed=8)


def test_matches_an_explicit_percentile_bootstrap() -> None:
    # Same draws, written the slow way: resample indices, take means, take the 2.5% / 97.5% quantiles.
    scores = _bernoulli(50)
    rng = np.random.default_rng(3)
    means = [scores[rng.integers(0, 50, size=50)].mean() for _ in range(400)]
    low, high = np.quantile(means, [0.025, 0.975])
    assert bootstrap_ci(scores, n_resamples=400, seed=3) == pytest.approx((low, high), abs=1e-12)


def test_large_input_uses_blocks_with_the_same_draws() -> None:
    # 5000 scores x 1000 resamples exceeds one block; blocking must not change the stream of draws.
    scores = _bernoulli(5000)
    rng = np.random.default_rng(0)
    means = scores[rng.integers(0, 5000, size=(1000, 5000))].mean(axis=1)
    assert bootstrap_ci(scores) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), abs=1e-12)


def test_contains_the_mean_and_is_ordered() -> None:
    for seed in range(5):
        scores = _bernoulli(300, p=0.3 + 0.1 * seed, seed=seed)
        low, high = bootstrap_ci(scores, seed=seed)
        assert low < scores.mean() < high


def test_width_shrinks_with_n() -> None:
    widths = []
    for n in (50, 500, 5000):
        low, high = bootstrap_ci(_bernoulli(n), n_resamples=500)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # Standard error scales as 1/sqrt(n): a 10x larger sample gives a ~3.16x narrower interval.
    assert 2.0 < widths[1] / widths[2] < 5.0


def test_width_grows_with_confidence() -> None:
    scores = _bernoulli(200)
    low90, high90 = bootstrap_ci(scores, confidence=0.90)
    low99, high99 = bootstrap_ci(scores, confidence=0.99)
    assert low99 < low90 and high90 < high99


def test_normal_approximation_for_bernoulli() -> None:
    # For a 0/1 mean the 95% interval is close to mean +- 1.96 * sqrt(p(1-p)/n).
    scores = _bernoulli(2000, p=0.6)
    p = scores.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / scores.size)
    low, high = bootstrap_ci(scores, n_resamples=4000)
    assert low == pytest.approx(p - half, abs=0.006)
    assert high == pytest.approx(p + half, abs=0.006)


def test_degenerate_inputs() -> None:
    empty = bootstrap_ci([])
    assert isinstance(empty, ConfidenceInterval) and math.isnan(empty.low) and math.isnan(empty.high)
    assert bootstrap_ci([0.25]) == (0.25, 0.25)
    assert bootstrap_ci([0.3] * 37) == (0.3, 0.3)  # exactly, no floating-point drift from averaging
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError, match="confidence"):
        bootstrap_ci([0.0, 1.0], confidence=95)
    with pytest.raises(ConfigError, match="n_resamples"):
        bootstrap_ci([0.0, 1.0], n_resamples=0)
    with pytest.raises(DataError, match=r"scores\[1\]"):
        bootstrap_ci([0.0, float("nan")])
    with pytest.raises(DataError, match="scores"):
        bootstrap_ci(["yes", "no"])
    with pytest.raises(DataError, match="flat"):
        bootstrap_ci(np.zeros((2, 2)))
