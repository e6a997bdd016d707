"""The toy world's "is this worked solution correct?" task."""

import re

import pytest

from w2s_jax.data.arithmetic import TaskConfig, generate_split
from w2s_jax.data.judgement import judgement_items, write_judgement_split
from w2s_jax.files import read_jsonl


def wrong_equations(solution: str) -> int:
    """Equations a=b whose sides differ, e.g. "38+7=35" (evaluated from the text)."""
    bad = 0
    for left, right in re.findall(r"(\d+(?:[-+*/]\d+)+)=(\d+)", solution):
        bad += eval(left) != int(right)  # noqa: S307 (digits and operators only)
    return bad


def test_balanced_labels_and_hard_negatives():
    items = judgement_items("train", 200, seed=1)
    assert sum(i["label"] for i in items) == 100
    assert len({i["id"] for i in items}) == 200
    for item in items:
        assert item["completion"].endswith(item["completion"].rsplit("#### ", 1)[1])
        assert (wrong_equations(item["completion"]) == 0) == (item["label"] == 1), item
    negatives = [wrong_equations(i["completion"]) for i in items if i["label"] == 0]
    assert sum(n == 1 for n in negatives) > len(negatives) // 2  # mostly one slip


def test_deterministic_and_split_disjoint(tmp_path):
    a = write_judgement_split(tmp_path / "a.jsonl", "train", 50, seed=3)
    assert [r for _, r in read_jsonl(tmp_path / "a.jsonl")] == a
    assert judgement_items("train", 50, seed=3) == a
    assert judgement_items("train", 50, seed=4) != a
    test = judgement_items("test", 50, seed=3)
    assert not {i["prompt"] for i in a} & {i["prompt"] for i in test}
    assert all(i["id"].startswith("test-") for i in test)


def test_items_use_only_problems_that_can_slip():
    config = TaskConfig(min_steps=1, max_steps=2)
    items = judgement_items("validation", 40, seed=0, config=config)
    by_question = {p.question: p for p in generate_split("validation", 400, config=config)}
    for item in items:
        problem = by_question[item["prompt"]]
        assert problem.carries > 0  # both classes: chains whose arithmetic carries or borrows
    with pytest.raises(ValueError, match="n must be"):
        judgement_items("train", -1)


def test_step_items_end_at_the_first_result_digit_a_slip_changes():
    items = judgement_items("train", 100, seed=2, unit="step")
    assert sum(i["label"] for i in items) == 50
    for item in items:
        left, result = item["text"].rsplit("=", 1)
        expression = left.rsplit(": ", 1)[1]
        exact = str(eval(expression))  # noqa: S307 (digits and operators only)
        # the candidate digits: a prefix of the exact result (right) or not (wrong)
        assert exact.startswith(result) == (item["label"] == 1), item
    with pytest.raises(ValueError, match="unit must be one of"):
        judgement_items("train", 2, unit="word")
