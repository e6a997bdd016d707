"""Weak-to-strong bookkeeping: the two disjoint training halves and the performance gap recovered.

PGR = (acc_w2s − acc_weak) / (acc_ceiling − acc_weak) (Burns et al., 2023): 0 when the
strong student only matches its weak supervisor, 1 when it matches the strong ceiling
trained on ground truth. It is undefined (None, never a division error) when the
ceiling equals the weak model. Its confidence interval resamples test items: the three
models are scored on the same items, so each resample draws items (with their three
correctness bits) with replacement. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from w2s_jax.stats import _as_correct


def split_halves(ids: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """Two disjoint halves of `ids` (half 1 gets the extra item of an odd count), drawn by a
    seeded permutation: the same ids and seed always give the same halves."""
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique to split them into disjoint halves")
    order = np.random.default_rng(seed).permutation(len(ids))
    cut = (len(ids) + 1) // 2
    return [ids[i] for i in order[:cut]], [ids[i] for i in order[cut:]]


def pgr(acc_weak: float, acc_w2s: float, acc_ceiling: float) -> float | None:
    """Performance gap recovered; None when the ceiling equals the weak accuracy."""
    gap = acc_ceiling - acc_weak
    if gap == 0:
        return None
    return (acc_w2s - acc_weak) / gap


class PGRInterval(NamedTuple):
    """PGR on the test items with a bootstrap percentile interval.

    value/low/high are None when undefined. undefined_share: the share of resamples
    whose ceiling equalled the weak accuracy (left out of the interval).
    """

    value: float | None
    low: float | None
    high: float | None
    undefined_share: float


def pgr_bootstrap(
    correct_weak,
    correct_w2s,
    correct_ceiling,
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PGRInterval:
    """PGR of three aligned per-item correctness vectors, with a bootstrap CI over items.

    Each item is one of 8 correctness patterns (weak, w2s, ceiling), so a resample is
    drawn as multinomial counts of the patterns: the same distribution as resampling
    item indices, in O(n_resamples) memory (as `stats.paired_bootstrap_diff`).
    """
    vectors = [
        _as_correct(v, name)
        for v, name in (
            (correct_weak, "correct_weak"),
            (correct_w2s, "correct_w2s"),
            (correct_ceiling, "correct_ceiling"),
        )
    ]
    if len({v.size for v in vectors}) != 1 or vectors[0].size == 0:
        raise ValueError(
            f"need three non-empty vectors of one length, got {[v.size for v in vectors]}"
        )
    weak, w2s, ceiling = vectors
    n = weak.size
    value = pgr(weak.mean(), w2s.mean(), ceiling.mean())
    code = (weak * 4 + w2s * 2 + ceiling).astype(np.int64)
    patterns = np.array([[(k >> 2) & 1, (k >> 1) & 1, k & 1] for k in range(8)], np.float64)
    shares = np.bincount(code, minlength=8) / n
    counts = np.random.default_rng(seed).multinomial(n, shares, size=n_resamples)
    accs = counts @ patterns / n  # [R, 3]: weak, w2s, ceiling
    gap = accs[:, 2] - accs[:, 0]
    defined = gap != 0
    if not defined.any():
        return PGRInterval(value, None, None, 1.0)
    ratios = (accs[defined, 1] - accs[defined, 0]) / gap[defined]
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail], method="inverted_cdf")
    return PGRInterval(value, float(low), float(high), float(1 - defined.mean()))
