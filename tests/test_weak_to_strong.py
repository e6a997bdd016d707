"""`w2s weak-to-strong`: a reduced run end to end on tiny checkpoints, resume, bad input."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from w2s_jax.files import DataError, atomic_write_jsonl, read_jsonl
from w2s_jax.run_folder import SettingsChanged
from w2s_jax.stages.w2s_settings import WeakToStrongSettings
from w2s_jax.stages.weak_to_strong import load_data, weak_to_strong

WORDS = "apples books pens coins boxes students tickets price cost sum more less".split()


def write_data(path, n, seed, *, chat=False):
    """`n` labelled records: label 1 when the text mentions 'apples' (learnable, balanced)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = list(rng.choice(WORDS[1:], size=6))
        label = i % 2
        if label:
            words[rng.integers(6)] = "apples"
        text = " ".join(words)
        record = {"prompt": text, "completion": "the answer"} if chat else {"text": text}
        rows.append({"id": f"{path.stem}-{i}", "label": label, **record})
    atomic_write_jsonl(path, rows)
    return path


def small(tmp_path, weak, strong, **overrides) -> WeakToStrongSettings:
    values = dict(
        out=str(tmp_path / "out"),
        weak=str(weak),
        strong=str(strong),
        data=str(write_data(tmp_path / "train.jsonl", 32, 0)),
        test_data=str(write_data(tmp_path / "test.jsonl", 16, 1)),
        epochs=1,
        batch_size=8,
        learning_rate=1e-2,
        length_bucket=8,
        dtype="float32",
    )
    return WeakToStrongSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_qwen2_dir, tiny_qwen2_amateur_dir):
    tmp = tmp_path_factory.mktemp("w2s")
    settings = small(tmp, tiny_qwen2_amateur_dir, tiny_qwen2_dir)
    lines = []
    report = weak_to_strong(settings, log=lines.append)
    return settings, report, lines


def test_reduced_run_writes_a_complete_report(run):
    settings, report, lines = run
    out = Path(settings.out)
    assert json.loads((out / "report.json").read_text()) == report
    names = [m["name"] for m in report["models"]]
    assert names == ["weak", "ceiling", "w2s-xent", "w2s-logconf", "w2s-product"]
    for row in report["models"]:
        (seed,) = row["per_seed"]
        assert seed["total"] == 16 and 0 <= seed["accuracy"] <= 1
        low, high = row["accuracy_ci95"]
        assert low <= row["accuracy_mean"] <= high
        assert ("pgr_mean" in row) == row["name"].startswith("w2s-")
    assert report["table"] in (out / "report.md").read_text()
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 100
    assert any("weak labels on half 2" in line for line in lines)


def test_halves_and_weak_labels(run):
    settings, report, _ = run
    split = json.loads((Path(settings.out) / "seed-0" / "split.json").read_text())
    assert len(split["half1"]) == len(split["half2"]) == 16
    assert not set(split["half1"]) & set(split["half2"])
    labels = [r for _, r in read_jsonl(f"{settings.out}/seed-0/weak_labels.jsonl")]
    assert [r["id"] for r in labels] == split["half2"]
    soft = np.array([r["soft_label"] for r in labels])
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-5)
    accuracy = np.mean(soft.argmax(1) == [r["label"] for r in labels])
    assert report["weak_label_accuracy"]["mean"] == pytest.approx(accuracy)


def test_resume_skips_every_sub_stage(run):
    settings, report, _ = run
    lines = []
    again = weak_to_strong(settings, log=lines.append)
    assert not any("steps" in line for line in lines)  # nothing trained again
    assert [m["per_seed"] for m in again["models"]] == [m["per_seed"] for m in report["models"]]


def test_cli_prints_the_table(run, capsys):
    from w2s_jax.cli import build_parser, main

    settings, report, _ = run
    command = next(c for c in build_parser()[1] if c.replace("_", "-") == "weak-to-strong")
    flags = ["--out", settings.out, "--weak", settings.weak, "--strong", settings.strong]
    flags += ["--data", settings.data, "--test-data", settings.test_data, "--epochs", "1"]
    flags += ["--batch-size", "8", "--lr", "1e-2", "--length-bucket", "8", "--dtype", "float32"]
    assert main([command, *flags]) == 0
    assert report["table"].splitlines()[2] in capsys.readouterr().out


# --------------------------------------------------------------------- bad input


def test_labels_that_are_not_distributions_keep_the_run(run, tmp_path):
    settings, _, _ = run
    out = tmp_path / "copy"
    shutil.copytree(settings.out, out)
    labels = out / "seed-0" / "weak_labels.jsonl"
    rows = [r for _, r in read_jsonl(labels)]
    rows[3]["soft_label"] = [0.7, 0.7]
    atomic_write_jsonl(labels, rows)
    before = (out / "report.json").read_bytes()
    with pytest.raises(ValueError, match=r"weak_labels.jsonl: labels are not distributions.*row 3"):
        weak_to_strong(replace(settings, out=str(out)), log=lambda _: None)
    assert (out / "report.json").read_bytes() == before
    assert (out / "seed-0" / "eval" / "ceiling.json").is_file()


def test_class_count_that_does_not_match_the_head(run, tmp_path):
    settings, _, _ = run
    out = tmp_path / "copy"
    shutil.copytree(settings.out, out)
    labels = out / "seed-0" / "weak_labels.jsonl"
    rows = [r | {"soft_label": [0.2, 0.3, 0.5]} for _, r in read_jsonl(labels)]
    atomic_write_jsonl(labels, rows)
    with pytest.raises(ValueError, match="3 classes but the classifier head has 2"):
        weak_to_strong(replace(settings, out=str(out)), log=lambda _: None)


def test_bad_data_is_refused_before_anything_is_written(tmp_path, tiny_qwen2_dir):
    bad = tmp_path / "bad.jsonl"
    atomic_write_jsonl(bad, [{"id": "a", "label": 0, "question": "no text field"}])
    settings = small(tmp_path, tiny_qwen2_dir, tiny_qwen2_dir, data=str(bad))
    with pytest.raises(DataError, match=r"bad.jsonl:1: a classification record needs 'text'"):
        weak_to_strong(settings)
    atomic_write_jsonl(bad, [{"id": "a", "label": 2, "text": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: label 2 is not a class id in 0..1"):
        weak_to_strong(settings)
    assert not (tmp_path / "out").exists()


def test_a_max_length_beyond_the_context_is_refused(tmp_path, tiny_qwen2_dir):
    settings = small(tmp_path, tiny_qwen2_dir, tiny_qwen2_dir, max_length=513)
    with pytest.raises(ValueError, match=r"--max-length 513 is longer than .*context of 512"):
        weak_to_strong(settings)
    assert not (tmp_path / "out").exists()


def test_records_longer_than_max_length_are_cut_visibly(tmp_path, tiny_qwen2_dir):
    from w2s_jax.classify import encode_examples

    records = [{"id": "a", "text": "apples " * 40}, {"id": "b", "text": "pens"}]
    full, _, none_cut = encode_examples(
        tiny_qwen2_dir, records, style="plain", system_prompt="", max_length=512
    )
    rows, _, cut = encode_examples(
        tiny_qwen2_dir, records, style="plain", system_prompt="", max_length=8
    )
    assert (none_cut, cut) == (0, 1) and len(full[0]) > 8
    assert rows == [full[0][-8:], full[1]]  # the end is kept: the class is read there


def test_pair_without_a_shared_data_format(tmp_path, tiny_qwen2_dir, tiny_qwen2_amateur_dir):
    plain = tmp_path / "weak_no_chat"
    shutil.copytree(tiny_qwen2_amateur_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for template in plain.glob("chat_template.*"):
        template.unlink()
    chat_data = write_data(tmp_path / "chat.jsonl", 32, 0, chat=True)
    settings = small(
        tmp_path, plain, tiny_qwen2_dir, data=str(chat_data), test_data=None, test_items=8
    )
    with pytest.raises(ValueError, match=r"weak_no_chat: cannot format the data's prompt"):
        weak_to_strong(settings)
    assert not (tmp_path / "out").exists()


def test_toy_world_defaults_and_held_out_test(tmp_path, tiny_qwen2_dir):
    defaults = WeakToStrongSettings()
    assert (defaults.weak_dir / "config.json").is_file()
    assert (defaults.strong_dir / "config.json").is_file()
    train, test = load_data(WeakToStrongSettings(train_items=20, test_items=10))
    assert sum(r["label"] for r in train) == 10 and len(test) == 10
    assert all(r["id"].startswith("train-") for r in train)
    assert all(r["id"].startswith("test-") and "=" in r["text"] for r in test)
    calibration = WeakToStrongSettings(train_items=20, test_items=10, toy_eval_split="validation")
    assert load_data(calibration)[1][0]["id"].startswith("validation-")
    data = write_data(tmp_path / "all.jsonl", 30, 0)
    settings = small(
        tmp_path, tiny_qwen2_dir, tiny_qwen2_dir, data=str(data), test_data=None, test_items=10
    )
    train, test = load_data(settings)
    assert len(train) == 20 and len(test) == 10
    assert load_data(settings) == (train, test)


def test_lora_student_and_linear_ramp(tmp_path, tiny_qwen2_dir, tiny_qwen2_amateur_dir):
    settings = small(
        tmp_path,
        tiny_qwen2_amateur_dir,
        tiny_qwen2_dir,
        mode="lora",
        weak_mode="full",
        losses=("logconf",),
        warmup="linear",
    )
    report = weak_to_strong(settings, log=lambda _: None)
    assert [m["name"] for m in report["models"]] == ["weak", "ceiling", "w2s-logconf"]
    saved = json.loads((tmp_path / "out/seed-0/models/w2s-logconf/classifier.json").read_text())
    assert saved["mode"] == "lora" and saved["lora"]["rank"] == 8
    weak = json.loads((tmp_path / "out/seed-0/models/weak/classifier.json").read_text())
    assert weak["mode"] == "full"
    with pytest.raises(SettingsChanged, match="different settings"):
        weak_to_strong(replace(settings, losses=("xent",)), log=lambda _: None)


def test_weak_side_reused_from_another_run(run, tmp_path):
    settings, report, _ = run
    lines = []
    reuse = replace(
        settings, out=str(tmp_path / "reuse"), weak_from=settings.out, losses=("product",)
    )
    again = weak_to_strong(reuse, log=lines.append)
    assert sum("steps" in line for line in lines) == 2  # ceiling and product: no weak training
    assert again["models"][0]["per_seed"] == report["models"][0]["per_seed"]
    assert again["weak_label_accuracy"] == report["weak_label_accuracy"]
    other = replace(reuse, out=str(tmp_path / "other"), weak_epochs=1)
    with pytest.raises(ValueError, match=r"weak side was made with other settings.*weak_epochs"):
        weak_to_strong(other, log=lambda _: None)
    assert not (tmp_path / "other").exists()
