"""The training halves and the performance gap recovered."""

import numpy as np
import pytest

from w2s_jax.w2s_metrics import pgr, pgr_bootstrap, split_halves


def test_split_halves_disjoint_complete_and_reproducible():
    ids = [f"q{i}" for i in range(101)]
    one, two = split_halves(ids, seed=3)
    assert len(one) == 51 and len(two) == 50
    assert not set(one) & set(two) and set(one) | set(two) == set(ids)
    assert split_halves(ids, seed=3) == (one, two)
    assert split_halves(ids, seed=4) != (one, two)
    with pytest.raises(ValueError, match="unique"):
        split_halves(["a", "a"], seed=0)


def test_pgr_values_and_undefined_edge():
    assert pgr(0.6, 0.7, 0.8) == pytest.approx(0.5)
    assert pgr(0.6, 0.6, 0.8) == 0.0
    assert pgr(0.6, 0.85, 0.8) == pytest.approx(1.25)
    assert pgr(0.6, 0.55, 0.8) == pytest.approx(-0.25)
    assert pgr(0.7, 0.9, 0.7) is None


def test_pgr_bootstrap_matches_index_resampling():
    rng = np.random.default_rng(0)
    n = 400
    weak = rng.random(n) < 0.6
    w2s = np.where(rng.random(n) < 0.5, weak, rng.random(n) < 0.8)
    ceiling = rng.random(n) < 0.85
    got = pgr_bootstrap(weak, w2s, ceiling, n_resamples=4000, seed=1)
    assert got.value == pytest.approx(pgr(weak.mean(), w2s.mean(), ceiling.mean()))
    # the same interval from resampling item indices directly (independent implementation)
    idx = np.random.default_rng(2).integers(0, n, size=(4000, n))
    a, b, c = weak[idx].mean(1), w2s[idx].mean(1), ceiling[idx].mean(1)
    ref = np.quantile((b - a) / (c - a), [0.025, 0.975])
    assert got.low == pytest.approx(ref[0], abs=0.06) and got.high == pytest.approx(
        ref[1], abs=0.06
    )
    assert got.low < got.value < got.high and got.undefined_share == 0.0


def test_pgr_bootstrap_undefined_when_weak_equals_ceiling():
    same = np.array([1, 0, 1, 1, 0, 1])
    got = pgr_bootstrap(same, np.ones(6, int), same)
    assert got == (None, None, None, 1.0)
    with pytest.raises(ValueError, match="one length"):
        pgr_bootstrap([1, 0], [1], [0, 1])
    with pytest.raises(ValueError, match="0/1"):
        pgr_bootstrap([2, 0], [1, 0], [0, 1])
