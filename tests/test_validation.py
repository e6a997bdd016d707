"""Validation during training (`w2s train --eval-data FILE --eval-every N`): which steps
are scored, the best step kept in OUT/best through checkpoint rotation, exact resume, and
the settings it refuses."""

import json

import pytest

from w2s_jax.cli import main
from w2s_jax.train import train
from w2s_jax.train_config import TrainSettings
from w2s_jax.validation import BEST_DIR, VALIDATION_FILE, Validator, _keep_best


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_qwen2_dir):
    from test_train import write_samples

    folder = tmp_path_factory.mktemp("validation_inputs")
    write_samples(folder / "samples", tiny_qwen2_dir, n=8, seed=2)
    rows = [
        {"id": f"v{i}", "question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}
        for i in range(6)
    ]
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _settings(inputs, tiny_qwen2_dir, out, **changes):
    values = dict(
        samples=str(inputs / "samples"), expert=str(tiny_qwen2_dir), out=str(out), steps=6,
        batch_positions=8, grad_accum=1, learning_rate=5e-2, length_bucket=16,
        dtype="float32", save_every=100, keep_checkpoints=1, log_every=2, progress=False,
        eval_data=str(inputs / "valid.jsonl"), eval_every=2, eval_max_new_tokens=6,
        eval_batch_size=4,
    )  # fmt: skip
    return TrainSettings(**{**values, **changes})


@pytest.fixture(scope="module")
def straight(inputs, tiny_qwen2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("validated")
    return out, train(_settings(inputs, tiny_qwen2_dir, out))


def test_every_nth_step_is_scored_and_the_best_is_kept(straight):
    out, summary = straight
    records = [json.loads(line) for line in (out / VALIDATION_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["total"] == 6 and 0 <= r["correct"] <= 6 for r in records)
    best = max(records, key=lambda r: (r["accuracy"], -r["step"]))
    assert summary["validation"]["best_step"] == best["step"]
    assert summary["validation"]["steps"] == records
    # keep_checkpoints=1 rotated the best step's own checkpoint away unless it is the last;
    # OUT/best still holds it, the only step there
    assert [p.name for p in (out / BEST_DIR).iterdir()] == [str(best["step"])]
    for record in records:  # each step was scored by the eval stage into its own folder
        scored = json.loads(
            (out / "validation" / f"step-{record['step']:06d}" / "summary.json").read_text()
        )
        assert (scored["correct"], scored["total"]) == (record["correct"], record["total"])


def test_the_best_step_exports(straight, tiny_qwen2_dir, tmp_path):
    out, summary = straight
    argv = ["export", "--expert", tiny_qwen2_dir, "--lora", out / BEST_DIR, "--out", tmp_path / "m"]
    assert main([str(a) for a in argv]) == 0
    report = json.loads((tmp_path / "m" / "export_report.json").read_text())
    assert report["checkpoint"].endswith(f"{BEST_DIR}/{summary['validation']['best_step']}")


def test_a_resumed_run_scores_the_same_steps_once(straight, inputs, tiny_qwen2_dir, tmp_path):
    out = tmp_path / "resumed"
    first = train(_settings(inputs, tiny_qwen2_dir, out), should_stop=lambda step: step == 3)
    assert first["stopped"] and first["validation"]["best_step"] == 2
    scored_2 = (out / "validation" / "step-000002" / "predictions.jsonl").stat().st_mtime_ns
    train(_settings(inputs, tiny_qwen2_dir, out))
    assert (out / VALIDATION_FILE).read_bytes() == (straight[0] / VALIDATION_FILE).read_bytes()
    assert (out / "validation" / "step-000002" / "predictions.jsonl").stat().st_mtime_ns == scored_2


def test_the_best_is_the_highest_accuracy_and_the_earliest_on_a_tie(tmp_path):
    validator = Validator(_FakeConfig(), tmp_path, is_leader=True)
    validator.records = [
        {"step": 2, "accuracy": 0.5},
        {"step": 4, "accuracy": 0.75},
        {"step": 6, "accuracy": 0.75},
    ]
    assert validator.best()["step"] == 4
    assert [validator.due(s) for s in (1, 2, 3, 4, 5)] == [False, True, False, True, True]


def test_keeping_a_new_best_removes_the_earlier_one(tmp_path):
    for step in ("3", "7"):
        (tmp_path / "checkpoints" / step).mkdir(parents=True)
        (tmp_path / "checkpoints" / step / "meta").write_text(step)
    _keep_best(tmp_path / "checkpoints" / "3", tmp_path / "best")
    _keep_best(tmp_path / "checkpoints" / "7", tmp_path / "best")
    assert [p.name for p in (tmp_path / "best").iterdir()] == ["7"]
    assert (tmp_path / "best" / "7" / "meta").read_text() == "7"


class _FakeConfig:
    eval_every, steps = 2, 5


def test_settings_validation_refuses(inputs, tiny_qwen2_dir, tmp_path):
    with pytest.raises(ValueError, match="--eval-data and --eval-every N"):
        _settings(inputs, tiny_qwen2_dir, tmp_path, eval_every=0)
    with pytest.raises(ValueError, match="needs --expert and --lora-rank >= 1"):
        _settings(inputs, tiny_qwen2_dir, tmp_path, lora_rank=0)
    plain = _settings(inputs, tiny_qwen2_dir, tmp_path, eval_data=None, eval_every=0)
    assert not any(key.startswith("eval_") for key in plain.settings())  # older runs read the same
