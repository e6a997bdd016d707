"""How sure an accuracy (difference) is: Wilson interval, paired bootstrap, McNemar;
sampled evaluation: pass@k, and a mean over samples with an interval clustered by question.

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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k)/C(n, k)
    (Chen et al. 2021), computed as a product so that large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def clustered_mean_interval(
    successes, sizes, *, confidence: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): the share of successes over all trials, with a normal interval
    whose standard error treats each cluster (e.g. a question's samples) as one unit.

    successes[i] of sizes[i] trials in cluster i; the ratio estimator Σs/Σn with the
    cluster-robust (linearized) variance Q/(Q−1)·Σ(s_i − mean·n_i)²/(Σn)². One cluster
    gives [0, 1]; bounds are clipped to [0, 1].
    """
    s, n = np.asarray(successes, np.float64), np.asarray(sizes, np.float64)
    if s.ndim != 1 or s.shape != n.shape or s.size == 0 or (n <= 0).any() or (s > n).any():
        raise ValueError("need one successes <= size > 0 pair per cluster, at least one cluster")
    mean = float(s.sum() / n.sum())
    q = s.size
    if q < 2:
        return mean, 0.0, 1.0
    se = math.sqrt(q / (q - 1) * float(((s - mean * n) ** 2).sum())) / float(n.sum())
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return mean, max(0.0, mean - z * se), min(1.0, mean + z * se)


def paired_bootstrap_mean_diff(
    scores_a, scores_b, *, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> BootstrapDiff:
    """Paired bootstrap CI of mean(B) − mean(A) for per-question scores in [0, 1] (e.g. the
    share of a question's samples graded correct): questions resampled with replacement,
    percentile interval (inverted-CDF quantiles), drawn in blocks of 1,000 resamples."""
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError("paired score vectors must be 1-D, non-empty and equal in length")
    d = b - a
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            d[rng.integers(0, d.size, size=(min(1000, n_resamples - i), d.size))].mean(axis=1)
            for i in range(0, n_resamples, 1000)
        ]
    )
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail], method="inverted_cdf")
    return BootstrapDiff(float(d.mean()), float(low), float(high))
