"""How sure an accuracy (difference) is: Wilson interval, paired bootstrap, McNemar.

Pure numpy/stdlib. Inputs are per-question correctness vectors (bool or 0/1) of
equal length, aligned question by question for the paired statistics.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np


def _as_correct(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be a 1-D vector of booleans or 0/1 values")
    return array.astype(np.float64)


def _paired(correct_a, correct_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_correct(correct_a, "correct_a"), _as_correct(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length: {a.size} vs {b.size}")
    if a.size == 0:
        raise ValueError("paired vectors are empty")
    return a, b


def wilson_interval(successes: int, total: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion successes/total."""
    if total <= 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total and total > 0, got {successes}/{total}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / total
    center = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == total else min(1.0, center + half)
    return low, high


class BootstrapDiff(NamedTuple):
    """Accuracy difference B − A with a paired-bootstrap percentile interval."""

    diff: float
    low: float
    high: float


def paired_bootstrap_diff(
    correct_a, correct_b, *, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> BootstrapDiff:
    """Paired bootstrap CI of accuracy(B) − accuracy(A).

    Resamples questions with replacement (the same questions for both models) and
    takes the percentile interval of the resampled differences (inverted-CDF
    quantiles, so the bounds are attainable differences). Per-question differences
    are −1, 0 or +1, so a resample is drawn as multinomial counts of the three
    kinds: the same distribution as resampling indices, in O(n_resamples) memory.
    """
    a, b = _paired(correct_a, correct_b)
    d = b - a
    n = d.size
    shares = [np.mean(d == 1), np.mean(d == 0), np.mean(d == -1)]
    counts = np.random.default_rng(seed).multinomial(n, shares, size=n_resamples)
    means = (counts[:, 0] - counts[:, 2]) / n
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail], method="inverted_cdf")
    return BootstrapDiff(float(d.mean()), float(low), float(high))


class McNemar(NamedTuple):
    """McNemar's test on paired correctness.

    only_a: questions A got right and B wrong; only_b: the reverse.
    p_exact: two-sided exact binomial p-value; p_chi2: chi-square with continuity correction.
    """

    only_a: int
    only_b: int
    p_exact: float
    p_chi2: float


def mcnemar(correct_a, correct_b) -> McNemar:
    """McNemar's test of whether A and B differ in accuracy on the same questions."""
    a, b = _paired(correct_a, correct_b)
    only_a = int(((a == 1) & (b == 0)).sum())
    only_b = int(((a == 0) & (b == 1)).sum())
    n = only_a + only_b
    if n == 0:
        return McNemar(0, 0, 1.0, 1.0)
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    chi2 = (abs(only_a - only_b) - 1) ** 2 / n if abs(only_a - only_b) > 1 else 0.0
    return McNemar(only_a, only_b, min(1.0, 2 * tail), math.erfc(math.sqrt(chi2 / 2)))
