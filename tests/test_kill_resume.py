"""kill -9 during each stage, then the same command again: the end state equals an
uninterrupted run's. Each killed run is a `w2s` process of its own, killed with SIGKILL
as soon as a file of its output exists; the re-run is `w2s` in this process.
(`w2s lightreasoner` is killed the same way in test_rounds.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from w2s_jax.cli import main
from w2s_jax.files import read_jsonl

TIMING_KEYS = {"seconds", "tokens_per_s", "train_s", "train_s_mean", "wall_time_s", "table"}


def _killed_once(argv, finished_part) -> None:
    """`w2s ARGV` in a process of its own, killed with SIGKILL once `finished_part()` holds;
    then the same command again in this process."""
    command = [sys.executable, "-m", "w2s_jax.cli", *map(str, argv)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not finished_part() and process.poll() is None:
        assert time.monotonic() < deadline, "nothing finished within 240 s"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert main([str(a) for a in argv]) == 0


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _records(folder: Path) -> dict[str, dict]:
    """Sample records by question id, from every shard (shard boundaries may differ)."""
    rows = [r for shard in folder.glob("samples/*.jsonl") for _, r in read_jsonl(shard)]
    return {row["id"]: row for row in rows}


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("kill_questions") / "q.jsonl"
    rows = [
        {"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}
        for i in range(24)  # batches of two: many left when the first lands
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _sample(tiny_qwen2_dir, tiny_qwen2_amateur_dir, questions, out):
    return ["sample", "--expert", tiny_qwen2_dir, "--amateur", tiny_qwen2_amateur_dir,
            "--data", questions, "--out", out, "--batch-size", "2", "--max-new-tokens", "24",
            "--beta", "0.05", "--dtype", "float32"]  # fmt: skip


def _train(tiny_qwen2_dir, samples, out):
    return ["train", "--samples", samples, "--expert", tiny_qwen2_dir, "--out", out,
            "--steps", "8", "--batch-positions", "16", "--length-bucket", "64", "--lr", "1e-2",
            "--save-every", "1", "--lora-rank", "4", "--dtype", "float32"]  # fmt: skip


def _export(tiny_qwen2_dir, run, out):
    return ["export", "--expert", tiny_qwen2_dir, "--lora", run, "--out", out]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_qwen2_dir, tiny_qwen2_amateur_dir, questions):
    """sample -> train -> export, each uninterrupted."""
    root = tmp_path_factory.mktemp("straight")
    assert main(list(map(str, _sample(tiny_qwen2_dir, tiny_qwen2_amateur_dir, questions,
                                      root / "samples")))) == 0  # fmt: skip
    assert main(list(map(str, _train(tiny_qwen2_dir, root / "samples", root / "train")))) == 0
    assert main(list(map(str, _export(tiny_qwen2_dir, root / "train", root / "model")))) == 0
    return root


def test_sample_killed_after_its_first_shard(
    straight, tmp_path, tiny_qwen2_dir, tiny_qwen2_amateur_dir, questions
):
    out = tmp_path / "samples"
    first_shard = lambda: any(out.glob("samples/*.jsonl"))  # noqa: E731
    _killed_once(_sample(tiny_qwen2_dir, tiny_qwen2_amateur_dir, questions, out), first_shard)
    assert _records(out) == _records(straight / "samples")
    assert len(_records(out)) == 24
    summary = lambda folder: json.loads((folder / "summary.json").read_text())  # noqa: E731
    assert _without_timings(summary(out)) == _without_timings(summary(straight / "samples"))
    assert not list(out.rglob("*.tmp"))


def test_train_killed_after_a_checkpoint(straight, tmp_path, tiny_qwen2_dir):
    out = tmp_path / "train"
    saved = lambda: (out / "checkpoints" / "2").is_dir()  # noqa: E731
    _killed_once(_train(tiny_qwen2_dir, straight / "samples", out), saved)
    # the same adapters as the straight run's: its export, byte for byte
    assert main(list(map(str, _export(tiny_qwen2_dir, out, tmp_path / "model")))) == 0
    ours, theirs = _files(tmp_path / "model"), _files(straight / "model")
    assert ours.pop("export_report.json") and theirs.pop("export_report.json")
    assert ours == theirs
    curve = lambda run: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").open()]  # noqa: E731
    assert curve(out) == curve(straight / "train")


def test_export_killed_while_writing_the_model(straight, tmp_path, tiny_qwen2_dir):
    out = tmp_path / "model"
    started = lambda: (out / "config.json").is_file()  # noqa: E731
    _killed_once(_export(tiny_qwen2_dir, straight / "train", out), started)
    ours, theirs = _files(out), _files(straight / "model")
    assert ours.pop("export_report.json") and theirs.pop("export_report.json")
    assert ours == theirs
    assert not list(out.rglob("*.tmp"))


def test_eval_killed_mid_run_resumes_to_the_same_predictions(tmp_path, tiny_qwen2_dir, questions):
    common = ["--max-new-tokens", "32", "--batch-size", "1", "--dtype", "float32"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    argv = lambda out: ["eval", "--model", tiny_qwen2_dir, "--data", questions,  # noqa: E731
                        "--out", out, "--no-progress", *common]  # fmt: skip
    assert main([str(a) for a in argv(full)]) == 0
    _killed_once(argv(resumed), lambda: any((resumed / "shards").glob("part-*.jsonl")))
    assert (resumed / "predictions.jsonl").read_bytes() == (full / "predictions.jsonl").read_bytes()
    assert not list(resumed.rglob("*.tmp"))


def test_weak_to_strong_killed_after_its_first_models(
    tmp_path, tiny_qwen2_dir, tiny_qwen2_amateur_dir
):
    from test_weak_to_strong import write_data

    flags = ["--weak", tiny_qwen2_amateur_dir, "--strong", tiny_qwen2_dir,
             "--data", write_data(tmp_path / "train.jsonl", 32, 0),
             "--test-data", write_data(tmp_path / "test.jsonl", 16, 1), "--epochs", "1",
             "--batch-size", "8", "--lr", "1e-2", "--length-bucket", "8",
             "--dtype", "float32"]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main([str(a) for a in ["weak-to-strong", *flags, "--out", full]]) == 0
    ceiling = resumed / "seed-0" / "models" / "ceiling" / "classifier.json"
    _killed_once(["weak-to-strong", *flags, "--out", resumed], ceiling.is_file)
    report = lambda out: json.loads((out / "report.json").read_text())  # noqa: E731
    assert _without_timings(report(resumed)) == _without_timings(report(full))
    weights = {k: v for k, v in _files(full).items() if k.endswith(".safetensors")}
    assert len(weights) == 5
    assert weights == {k: v for k, v in _files(resumed).items() if k.endswith(".safetensors")}
