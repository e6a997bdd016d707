"""Grading many answers at once: the symbolic checks on a pool of worker processes."""

import time

from w2s_jax import grading
from w2s_jax.grading import grade, grade_all

PAIRS = [
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("(x+1)^2", "x^2+2x+1"),
    ("x^2+1", "x^2-1"),
    ("42", "42.0"),
    (None, "7"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("2\\pi", "\\pi+\\pi"),
    ("9^{9^{9}}", "1"),  # runs past its time limit
]


def test_grade_all_equals_grading_one_by_one_with_time_limits(monkeypatch):
    sequential = [grade(p, g, timeout=2.0) for p, g in PAIRS]
    assert sequential[-1] == (False, "timeout")
    assert [v.how for v in sequential].count("symbolic") >= 4
    start = time.perf_counter()
    assert grade_all(PAIRS, timeout=2.0) == sequential
    assert time.perf_counter() - start < 30
    monkeypatch.setattr(grading, "GRADING_WORKERS", 1)
    assert grade_all(PAIRS[:3], timeout=2.0) == sequential[:3]
