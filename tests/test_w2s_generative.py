"""`w2s weak-to-strong-gen`: the confidence filter on hand-made samples, a reduced run on the
toy world end to end, resume without work, bad input refused before anything is written."""

from __future__ import annotations

import json

import pytest

from w2s_jax.files import DataError, read_jsonl
from w2s_jax.stages.w2s_gen_settings import GenerativeW2SSettings
from w2s_jax.stages.w2s_generative import (
    filter_targets,
    solution_and_gold,
    weak_targets,
    weak_to_strong_gen,
)
from w2s_jax.w2s_metrics import pgr


def _rows(qid: str, answers: list, right: str) -> list[dict]:
    return [
        {"id": qid, "sample": j, "output": f"sol {j} #### {a}", "answer": a, "correct": a == right}
        for j, a in enumerate(answers)
    ]


def _same(a: str, b: str) -> bool:
    return a == b


def test_weak_targets_majority_and_agreement():
    groups = [
        _rows("q1", ["3", "4", "3", "3"], "3"),  # 3/4 agree, right
        _rows("q2", ["5", "6", "6", None], "5"),  # 2/4 agree on 6 (first at sample 1), wrong
        _rows("q3", [None, None, None, None], "1"),  # no answer
        _rows("q4", ["7", "8", "9", "7"], "9"),  # 2/4 on 7
    ]
    targets = weak_targets(groups, same=_same)
    assert [t["agreement"] for t in targets] == [0.75, 0.5, 0.0, 0.5]
    assert [t["solution"] for t in targets] == ["sol 0", "sol 1", "sol 0", "sol 0"]
    assert targets[1]["output"] == "sol 1 #### 6"
    assert [t["correct"] for t in targets] == [True, False, False, False]
    assert targets[2]["answer"] is None


@pytest.mark.parametrize(
    ("threshold", "kept"), [(0.0, 3), (0.5, 3), (0.51, 1), (0.75, 1), (0.76, 0)]
)
def test_agreement_filter_counts(threshold, kept):
    groups = [
        _rows("q1", ["3", "4", "3", "3"], "3"),
        _rows("q2", ["5", "6", "6", None], "5"),
        _rows("q3", [None, None, None, None], "1"),
        _rows("q4", ["7", "8", "9", "7"], "9"),
    ]
    out, counts = filter_targets(
        weak_targets(groups, same=_same), "agreement", min_agreement=threshold
    )
    assert counts == {
        "questions": 4,
        "no_answer": 1,
        "below_threshold": 3 - kept,
        "kept": kept,
        "kept_correct": int(threshold <= 0.75),
    }
    assert sum(t["kept"] for t in out) == kept and not out[2]["kept"]


def test_logprob_filter_counts():
    targets = [
        {"id": "a", "answer": "1", "correct": True, "logprob": -0.1},
        {"id": "b", "answer": "2", "correct": False, "logprob": -0.5},
        {"id": "c", "answer": "3", "correct": True, "logprob": -0.51},
        {"id": "d", "answer": None, "correct": False, "logprob": None},
    ]
    out, counts = filter_targets(targets, "logprob", min_logprob=-0.5)
    assert [t["kept"] for t in out] == [True, True, False, False]
    assert counts == {
        "questions": 4,
        "no_answer": 1,
        "below_threshold": 1,
        "kept": 2,
        "kept_correct": 1,
    }
    _, none = filter_targets(targets, "none")
    assert none["kept"] == 3 and none["below_threshold"] == 0


def test_solution_and_gold():
    assert solution_and_gold("a=1.\nThe answer is \\boxed{1}.\n#### 1") == (
        "a=1.\nThe answer is \\boxed{1}.",
        "1",
    )
    assert solution_and_gold("2+2=4\n#### 4") == ("2+2=4\nThe answer is \\boxed{4}.", "4")


def test_pgr_edge_case_is_undefined():
    assert pgr(0.5, 0.7, 0.5) is None


SMALL = dict(
    train_questions=12,
    test_questions=6,
    steps=2,
    batch_positions=32,
    max_new_tokens=64,
    batch_size=8,
)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("w2s_gen")
    settings = GenerativeW2SSettings(out=str(out), samples=2, filter="agreement", **SMALL)
    lines = []
    return out, settings, weak_to_strong_gen(settings, log=lines.append)


def test_reduced_run_end_to_end(small_run):
    out, _, report = small_run
    assert json.loads((out / "report.json").read_text()) == report
    names = [m["name"] for m in report["models"]]
    assert names == ["weak", "ceiling", "w2s-sft", "strong-base"]
    split = json.loads((out / "seed-0" / "split.json").read_text())
    assert not set(split["half1"]) & set(split["half2"]) and len(split["half2"]) == 6
    targets = [r for _, r in read_jsonl(out / "seed-0" / "weak_targets.jsonl")]
    counts = report["weak_targets"][0]
    assert counts["kept"] == sum(t["kept"] for t in targets) and counts["questions"] == 6
    assert all(t["agreement"] in (0.0, 0.5, 1.0) for t in targets)
    for row in report["models"]:
        (seed,) = row["per_seed"]
        assert seed["total"] == 6
    w2s = report["models"][2]["per_seed"][0]
    accs = {m["name"]: m["accuracy_mean"] for m in report["models"]}
    assert w2s["pgr"] == pgr(accs["weak"], accs["w2s-sft"], accs["ceiling"])
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert report["table"] in (out / "report.md").read_text()


def test_resume_does_no_work(small_run, monkeypatch):
    import importlib

    out, settings, report = small_run

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for module, name in (
        ("w2s_jax.train", "train"),
        ("w2s_jax.export", "export"),
        ("w2s_jax.evaluate", "run_eval"),
        ("w2s_jax.stages.score", "score"),
    ):
        monkeypatch.setattr(importlib.import_module(module), name, refuse)
    again = weak_to_strong_gen(settings, log=lambda _: None)
    assert again["models"] == report["models"]


def test_bad_input_refused_before_anything_is_written(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "q", "answer": "no marker"}) + "\n")
    out = tmp_path / "out"
    settings = GenerativeW2SSettings(out=str(out), data=str(data), test_data=str(data))
    with pytest.raises(DataError, match="####"):
        weak_to_strong_gen(settings)
    assert not out.exists()
    with pytest.raises(ValueError, match="--samples"):
        GenerativeW2SSettings(filter="agreement")
    with pytest.raises(ValueError, match="--test-data"):
        GenerativeW2SSettings(data=str(data))


def test_help_lists_the_filter_flags(capsys):
    from w2s_jax.cli import main

    with pytest.raises(SystemExit):
        main(["weak-to-strong-gen", "--help"])
    text = capsys.readouterr().out
    assert "--min-agreement" in text and "--min-logprob" in text
