"""Statistics against hand-computed values and an exact enumeration of the bootstrap."""

import itertools
import math

import numpy as np
import pytest

from w2s_jax.stats import mcnemar, paired_bootstrap_diff, wilson_interval


def _pairs(both: int, only_a: int, only_b: int, neither: int):
    """Correctness vectors of A and B with the given counts of each agreement kind."""
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return a, b


def test_mcnemar_hand_computed():
    # 5 questions only A solves, 1 only B solves: n = 6 discordant pairs.
    # exact: 2 * P(X <= 1), X ~ Bin(6, 1/2) = 2 * (1 + 6) / 64 = 0.21875
    # chi2 with continuity: (|5 - 1| - 1)^2 / 6 = 1.5, P(chi2_1 > 1.5) = 0.2207 (tables)
    a, b = _pairs(both=3, only_a=5, only_b=1, neither=1)
    result = mcnemar(a, b)
    assert (result.only_a, result.only_b) == (5, 1)
    assert result.p_exact == pytest.approx(0.21875, abs=1e-12)
    assert result.p_chi2 == pytest.approx(0.2207, abs=1e-4)
    assert mcnemar(b, a).p_exact == result.p_exact


def test_mcnemar_extremes():
    a, b = _pairs(both=4, only_a=0, only_b=10, neither=2)
    assert mcnemar(a, b).p_exact == pytest.approx(2 / 1024)  # 2 * 0.5^10
    same = mcnemar([1, 0, 1], [1, 0, 1])
    assert (same.p_exact, same.p_chi2) == (1.0, 1.0)
    # |b - c| = 1: the continuity-corrected statistic is 0, p = 1
    assert mcnemar(*_pairs(both=0, only_a=2, only_b=1, neither=0)).p_chi2 == 1.0


def test_wilson_interval_hand_computed():
    # 7/10, z = 1.96: centre (0.7 + 0.19207) / 1.38415, half-width 1.96 * 0.17494 / 1.38415
    low, high = wilson_interval(7, 10)
    assert (low, high) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((1 - 0.2775, 1.0), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def test_bootstrap_two_questions_by_hand():
    # d = (+1, 0): resampled mean is 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    result = paired_bootstrap_diff([0, 1], [1, 1], n_resamples=20_000)
    assert result == (0.5, 0.0, 1.0)
    # the 30% and 70% quantiles both fall on the 0.5 atom
    narrow = paired_bootstrap_diff([0, 1], [1, 1], n_resamples=20_000, confidence=0.4)
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def _exact_bootstrap_quantile(d: np.ndarray, q: float) -> tuple[float, float]:
    """Inverted-CDF quantile of the exact bootstrap distribution, by enumerating
    every resample of indices, and the CDF just below it (to check it is not a tie)."""
    means = np.array(
        [d[list(idx)].mean() for idx in itertools.product(range(d.size), repeat=d.size)]
    )
    values = np.unique(means)
    cdf = np.array([(means <= v).mean() for v in values])
    k = int(np.searchsorted(cdf, q))
    return float(values[k]), float(cdf[k])


def test_bootstrap_matches_exact_enumeration():
    a, b = _pairs(both=1, only_a=1, only_b=3, neither=1)  # d = 0, -1, +1, +1, +1, 0
    d = np.array(b, float) - np.array(a, float)
    result = paired_bootstrap_diff(a, b, n_resamples=40_000, seed=1)
    low, cdf_low = _exact_bootstrap_quantile(d, 0.025)
    high, cdf_high = _exact_bootstrap_quantile(d, 0.975)
    # the quantile levels are not close to a CDF step, so Monte Carlo noise cannot flip them
    assert abs(cdf_low - 0.025) > 0.005 and abs(cdf_high - 0.975) > 0.005
    assert result.diff == pytest.approx(2 / 6)
    assert (result.low, result.high) == pytest.approx((low, high))
    assert low < result.diff < high


def test_bootstrap_no_difference_and_bad_input():
    assert paired_bootstrap_diff([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="length"):
        paired_bootstrap_diff([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([1, 2], [1, 0])
    assert math.isfinite(paired_bootstrap_diff([True, False], [False, False]).low)
