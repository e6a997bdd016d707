"""Sampling stage, model-free parts: TFDS/JSONL sources, output folder, summary, export, checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from w2s_jax import sample_store
from w2s_jax.data.tfds_source import load_source
from w2s_jax.files import DataError, atomic_write_jsonl
from w2s_jax.generate import left_pad
from w2s_jax.run_folder import SettingsChanged
from w2s_jax.sampling import (
    check_shared_tokenizer,
    teacher_forced_inputs,
    tokenizer_difference,
)
from w2s_jax.stages.sample_settings import SampleSettings

GSM8K_ROWS = [
    {
        "question": f"Tom has {i} apples and buys {i + 2} more. How many now? ü",
        "answer": f"...\n#### {2 * i + 2}",
    }
    for i in range(7)
]


def prepare_tfds_gsm8k(data_dir, tmp_path):
    """Build TFDS's gsm8k in array_record format from local JSONL, offline (no TensorFlow)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from unittest import mock

    from tensorflow_datasets.text.gsm8k import gsm8k  # noqa: F401  (registers the builder)

    paths = {}
    for split in ("train", "test", "train_socratic", "test_socratic"):
        paths[split] = tmp_path / f"{split}.jsonl"
        atomic_write_jsonl(paths[split], GSM8K_ROWS)
    builder = tfds.builder("gsm8k", data_dir=str(data_dir), file_format="array_record")
    with mock.patch.object(
        tfds.download.DownloadManager, "download_and_extract", lambda self, urls: paths
    ):
        builder.download_and_prepare()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfds")
    prepare_tfds_gsm8k(folder / "data", folder)
    return folder / "data"


def test_tfds_source_reads_gsm8k_without_tensorflow(tfds_dir):
    import sys

    questions = load_source("tfds:gsm8k", split="test", data_dir=str(tfds_dir))
    assert "tensorflow" not in sys.modules
    assert sorted(q.question for q in questions) == sorted(r["question"] for r in GSM8K_ROWS)
    by_text = {r["question"]: r["answer"] for r in GSM8K_ROWS}
    assert all(q.answer == by_text[q.question] for q in questions)
    assert [q.id for q in questions] == [f"gsm8k/test/{i}" for i in range(len(GSM8K_ROWS))]
    assert len(load_source("tfds:gsm8k", data_dir=str(tfds_dir), max_questions=3)) == 3


def test_tfds_source_errors(tfds_dir, tmp_path):
    with pytest.raises(DataError, match="not found.*tfds build gsm8k"):
        load_source("tfds:gsm8k", data_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="split 'validation'"):
        load_source("tfds:gsm8k", split="validation", data_dir=str(tfds_dir))
    with pytest.raises(DataError, match="field 'problem' is missing"):
        load_source("tfds:gsm8k", data_dir=str(tfds_dir), question_field="problem")


def test_load_source_dispatches_jsonl(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a", "question": "x?"}\n{"question": "y?", "answer": "#### 3"}\n')
    questions = load_source(str(path))
    assert [(q.id, q.question, q.answer) for q in questions] == [
        ("a", "x?", None),
        ("line-2", "y?", "#### 3"),
    ]
    path.write_text('{"id": "a", "question": "x?"}\n{"question": \n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        load_source(str(path))


REQUIRED = {"expert": "e", "amateur": "a", "data": "d.jsonl", "out": "o"}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alpha", 0.0, "--alpha must lie in"),
        ("alpha", 1.5, "--alpha must lie in"),
        ("beta", -0.1, "--beta must be a finite number >= 0.0, got -0.1"),
        ("beta", float("nan"), "--beta must be a finite number, got nan"),
        ("top_k", 0, "--top-k must be an integer >= 1, got 0"),
        ("max_new_tokens", 1.5, "--max-new-tokens must be an integer"),
        ("prompt_style", "fancy", "--prompt-style must be one of chat, plain"),
        ("expert", None, "--expert is required"),
    ],
)
def test_settings_ranges(field, value, message):
    with pytest.raises(ValueError, match=message):
        SampleSettings(**(REQUIRED | {field: value}))
    SampleSettings(**REQUIRED)


def test_tokenizer_difference(tiny_tokenizer_dir, tmp_path):
    from tiny_checkpoints import make_tiny_tokenizer
    from transformers import AutoTokenizer

    same = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    other_same = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert tokenizer_difference(same, other_same) is None
    check_shared_tokenizer(same, other_same, expert="E", amateur="A")

    smaller = make_tiny_tokenizer(tmp_path / "small", vocab_size=280)
    message = tokenizer_difference(same, smaller)
    assert "sizes 300 vs 280" in message
    by_id = {i: t for t, i in same.get_vocab().items()}
    by_id_small = {i: t for t, i in smaller.get_vocab().items()}
    first = min(i for i in by_id if by_id[i] != by_id_small.get(i))
    assert f"first: {first} ({by_id[first]!r} vs {by_id_small.get(first)!r})" in message
    with pytest.raises(ValueError, match="different tokenizers"):
        check_shared_tokenizer(same, smaller, expert="E", amateur="A")

    renamed = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    renamed.eos_token = "<|endoftext|>"
    assert "special tokens differ: eos_token '<|im_end|>' vs '<|endoftext|>'" in (
        tokenizer_difference(same, renamed)
    )


def test_teacher_forced_layout():
    prompt, mask = left_pad([[5, 6, 7], [8]], 0, multiple=4)
    assert prompt.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    completion = np.array([[11, 12, 13], [21, 2, 0]])
    ids, full_mask, valid = teacher_forced_inputs(prompt, mask, completion, np.array([3, 2]))
    # column P - 1 + t holds the last token of prompt + completion[:t]
    assert ids.tolist() == [[0, 5, 6, 7, 11, 12], [0, 0, 0, 8, 21, 2]]
    assert full_mask.tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert valid.tolist() == [[True, True, True], [True, True, False]]


def _record(qid, n, positions, rng):
    return {
        "id": qid,
        "prompt_ids": [1, 2, 3],
        "completion_ids": rng.integers(3, 300, n).tolist(),
        "kl": rng.exponential(0.5, n).tolist(),
        "positions": positions,
        "target_ids": [[7, 9] for _ in positions],
        "target_weights": [[0.75, 0.25] for _ in positions],
    }


def _stats(plausible, dropped, dropped_max, wall):
    return {
        "plausible_size_sum": plausible,
        "dropped_mass_sum": dropped,
        "dropped_mass_max": dropped_max,
        "wall_time_s": wall,
    }


def test_shards_resume_and_summary(tmp_path):
    rng = np.random.default_rng(0)
    first = [_record("a", 5, [0, 3], rng), _record("b", 4, [], rng)]
    second = [_record("c", 6, [1, 2, 5], rng)]
    sample_store.write_shard(tmp_path, first, _stats(4.0, 0.1, 0.08, 1.5), process_index=0)
    sample_store.write_shard(tmp_path, second, _stats(6.0, 0.0, 0.0, 0.5), process_index=0)
    sample_store.write_shard(tmp_path, [], _stats(0, 0, 0, 0), process_index=1)
    names = [p.name for p in sample_store.shard_paths(tmp_path)]
    assert names == ["p000-00000.jsonl", "p000-00001.jsonl", "p001-00000.jsonl"]
    assert list(sample_store.read_samples(tmp_path)) == first + second
    assert sample_store.finished_ids(tmp_path) == {"a", "b", "c"}

    # A kill mid-write leaves temp files; only this process's are cleaned up.
    (tmp_path / "samples" / ".p000-00002.jsonl.x.tmp").write_text('{"id": "d"')
    (tmp_path / "samples" / ".p001-00001.jsonl.y.tmp").write_text("")
    sample_store.remove_stale_temp_files(tmp_path, 0)
    left = sorted(p.name for p in (tmp_path / "samples").glob(".*.tmp"))
    assert left == [".p001-00001.jsonl.y.tmp"]
    assert sample_store.finished_ids(tmp_path) == {"a", "b", "c"}

    summary, kl = sample_store.summarize(tmp_path, beta=0.4)
    expected_kl = np.concatenate([r["kl"] for r in first + second])
    np.testing.assert_array_equal(kl, expected_kl)
    assert summary["questions"] == 3 and summary["positions"] == 15 and summary["selected"] == 5
    assert summary["selected_fraction"] == pytest.approx(5 / 15)
    assert summary["kl_quantiles"]["p50"] == pytest.approx(np.median(expected_kl))
    assert summary["kl_quantiles"]["p90"] == pytest.approx(np.quantile(expected_kl, 0.9))
    assert summary["mean_plausible_size"] == pytest.approx(10 / 5)
    assert summary["mean_dropped_mass"] == pytest.approx(0.1 / 5)
    assert summary["max_dropped_mass"] == 0.08
    assert summary["tokens_per_s"] == pytest.approx(15 / 2.0)

    png = tmp_path / "kl.png"
    sample_store.plot_kl_histogram(kl, 0.4, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_shards_are_reported(tmp_path):
    rng = np.random.default_rng(1)
    record = _record("a", 5, [0, 3], rng)
    record["kl"] = record["kl"][:4]
    sample_store.write_shard(tmp_path, [record], _stats(0, 0, 0, 0), process_index=0)
    with pytest.raises(DataError, match=r"p000-00000.jsonl:1: 4 kl values for 5"):
        sample_store.finished_ids(tmp_path)


def test_manifest_refuses_changed_settings(tmp_path):
    manifest = {"format": sample_store.FORMAT, "settings": {"alpha": 0.2, "beta": 0.4}}
    assert sample_store.check_or_create_manifest(tmp_path, manifest) is False
    assert sample_store.check_or_create_manifest(tmp_path, manifest) is True
    sample_store.write_shard(tmp_path, [], _stats(0, 0, 0, 0), process_index=0)  # a result
    before = sample_store.manifest_path(tmp_path).read_bytes()
    changed = {"format": sample_store.FORMAT, "settings": {"alpha": 0.2, "beta": 0.5}}
    with pytest.raises(SettingsChanged, match=r"beta: 0.4 -> 0.5"):
        sample_store.check_or_create_manifest(tmp_path, changed)
    assert sample_store.manifest_path(tmp_path).read_bytes() == before

    orphan = tmp_path / "orphan"
    sample_store.write_shard(orphan, [], _stats(0, 0, 0, 0), process_index=0)
    with pytest.raises(DataError, match="manifest.json is missing"):
        sample_store.check_or_create_manifest(orphan, manifest)


def test_reference_export(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    completion = tokenizer("the answer is 42 apples")["input_ids"]
    record = {
        "id": "q1",
        "prompt_ids": [1],
        "completion_ids": completion,
        "kl": [0.1 * (i + 1) for i in range(len(completion))],
        "positions": [0, 2],
        "target_ids": [[completion[0], 5], [completion[2]]],
        "target_weights": [[0.9, 0.1], [1.0]],
    }
    sample_store.write_shard(tmp_path, [record], _stats(0, 0, 0, 0), process_index=0)
    path = tmp_path / "ref.jsonl"
    assert sample_store.export_reference(tmp_path, tokenizer, path) == 2
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[1] == {
        "prompt_id": "q1",
        "step": 2,
        "prefix": tokenizer.decode(completion[:2]),
        "tokens": [tokenizer.decode([completion[2]])],
        "token_ids": [completion[2]],
        "weights": [1.0],
        "kl_divergence": record["kl"][2],
    }
    assert rows[0]["prefix"] == "" and rows[0]["tokens"][1] == tokenizer.decode([5])
