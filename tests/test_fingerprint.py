"""Fingerprints tell checkpoints and tokenizers apart, and only when they differ."""

import hashlib
import json
import os
import shutil

import pytest
from transformers import AutoTokenizer

from w2s_jax import fingerprint
from w2s_jax.fingerprint import (
    same_tokenizer_files,
    tokenizer_fingerprint,
    weights_fingerprint,
    weights_fingerprint_record,
)

MIB = 1 << 20
OLD = 1_600_000_000  # an mtime long past, so digests get cached


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A private digest cache, never the user's ~/.cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("W2S_JAX_CACHE_DIR", str(folder))
    return folder


def write_model(folder, *, weight_bytes=8 * MIB, shards=1, mtime=OLD):
    """A fake model folder: config.json and random weight files (never parsed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    names = ["model.safetensors"]
    if shards > 1:
        names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
        index = {"weight_map": {f"layer{i}.weight": name for i, name in enumerate(names)}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for i, name in enumerate(names):
        (folder / name).write_bytes(os.urandom(weight_bytes // shards) + bytes([i]))
    for path in folder.iterdir():
        os.utime(path, ns=(mtime * 10**9, mtime * 10**9))
    return folder


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_weights_fingerprint_distinguishes_checkpoints(
    tiny_qwen2_dir, tiny_qwen2_amateur_dir, tmp_path
):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_qwen2_dir, copy)
    assert weights_fingerprint(copy) == weights_fingerprint(tiny_qwen2_dir)
    assert weights_fingerprint(tiny_qwen2_amateur_dir) != weights_fingerprint(tiny_qwen2_dir)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(copy) != weights_fingerprint(tiny_qwen2_dir)


def test_tokenizer_fingerprint(tiny_qwen2_dir, tiny_qwen2_amateur_dir, tmp_path):
    from tiny_checkpoints import make_tiny_tokenizer

    a = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    b = AutoTokenizer.from_pretrained(str(tiny_qwen2_amateur_dir))
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    other = make_tiny_tokenizer(tmp_path / "other", vocab_size=280)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(a)


def test_same_tokenizer_files(tiny_qwen2_dir, tiny_qwen2_amateur_dir, tmp_path):
    assert same_tokenizer_files(tiny_qwen2_dir, tiny_qwen2_amateur_dir)
    assert not same_tokenizer_files(tmp_path, tmp_path)  # no tokenizer at all
    copy = tmp_path / "copy"
    shutil.copytree(tiny_qwen2_amateur_dir, copy)
    config = copy / "tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "model_max_length": 7}', 1))
    assert not same_tokenizer_files(tiny_qwen2_dir, copy)  # one file's bytes differ
    (copy / "tokenizer_config.json").unlink()
    assert not same_tokenizer_files(tiny_qwen2_dir, copy)  # a file missing on one side


def test_one_middle_byte_changes_the_fingerprint(tmp_path, cache_dir):
    folder = write_model(tmp_path / "model")
    weights = folder / "model.safetensors"
    before = weights_fingerprint(folder)
    assert weights_fingerprint(folder) == before  # now from the cache
    flip_byte(weights, 4 * MIB)  # a plain write: the mtime moves on
    assert weights_fingerprint(folder) != before
    # Same size, mtime restored: the hash itself sees the byte once the cache is gone.
    # (With the cache, such an edit is a hit: the documented limit of size+mtime keys.)
    flip_byte(weights, 4 * MIB)
    os.utime(weights, ns=(OLD * 10**9, OLD * 10**9))
    assert weights_fingerprint(folder) == before
    flip_byte(weights, 4 * MIB + 1)
    os.utime(weights, ns=(OLD * 10**9, OLD * 10**9))
    (cache_dir / "fingerprints.json").unlink()
    assert weights_fingerprint(folder) != before


def test_record_lists_every_file_it_hashed(tmp_path):
    folder = write_model(tmp_path / "model", shards=3)
    (folder / "generation_config.json").write_text('{"eos_token_id": 2}')
    (folder / "stray.safetensors").write_bytes(b"not in the index")
    record = weights_fingerprint_record(folder)
    names = ["config.json", "generation_config.json", "model.safetensors.index.json"]
    names += [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(record["files"]) == sorted(names)
    assert record["algorithm"] == "sha256"
    for name, entry in record["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "digest": hashlib.sha256(data).hexdigest()}
    listing = "".join(f"{record['files'][n]['digest']}  {n}\n" for n in sorted(names))
    assert record["fingerprint"] == hashlib.sha256(listing.encode()).hexdigest()
    assert weights_fingerprint(folder) == record["fingerprint"]
    (folder / names[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="listed in model.safetensors.index.json"):
        weights_fingerprint(folder)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_config_files_change_the_fingerprint(tmp_path, name):
    folder = write_model(tmp_path / "model", weight_bytes=MIB)
    (folder / "generation_config.json").write_text('{"eos_token_id": 2}')
    before = weights_fingerprint(folder)
    path = folder / name
    path.write_text(path.read_text().replace("}", ', "extra": 1}'))
    assert weights_fingerprint(folder) != before


def test_a_cache_hit_reads_no_file(tmp_path, cache_dir, monkeypatch):
    folder = write_model(tmp_path / "model", shards=2)
    calls = []
    real = fingerprint._file_digest
    monkeypatch.setattr(fingerprint, "_file_digest", lambda path: calls.append(path) or real(path))
    first = weights_fingerprint(folder)
    assert len(calls) == 4  # config, index, two shards
    assert (cache_dir / "fingerprints.json").is_file()
    assert weights_fingerprint(folder) == first
    assert len(calls) == 4
    os.utime(folder / "config.json", ns=(OLD * 10**9, (OLD + 1) * 10**9))
    assert weights_fingerprint(folder) == first
    assert calls[4:] == [folder / "config.json"]
    fresh = tmp_path / "fresh"
    shutil.copytree(folder, fresh)  # copy2 keeps the old mtimes but the paths are new
    (fresh / "config.json").write_text('{"model_type": "llama"}')  # just now: not cached
    weights_fingerprint(fresh)
    weights_fingerprint(fresh)
    assert calls[5:].count(fresh / "config.json") == 2
    assert len(calls) == 5 + 4 + 1


def test_a_corrupt_cache_is_ignored_and_rebuilt(tmp_path, cache_dir):
    folder = write_model(tmp_path / "model", weight_bytes=MIB)
    expected = weights_fingerprint(folder)
    cache = cache_dir / "fingerprints.json"
    for garbage in ("{not json", "[]", '{"format": "other"}', "\x00" * 9):
        cache.write_text(garbage)
        assert weights_fingerprint(folder) == expected
        assert len(json.loads(cache.read_text())["entries"]) == 2
    entries = json.loads(cache.read_text())
    for entry in entries["entries"].values():
        entry["digest"] = None  # well-formed JSON, malformed entries
    cache.write_text(json.dumps(entries))
    assert weights_fingerprint(folder) == expected


def test_an_unwritable_cache_only_means_no_caching(tmp_path, monkeypatch):
    folder = write_model(tmp_path / "model", weight_bytes=MIB)
    expected = weights_fingerprint(folder)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("W2S_JAX_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    assert weights_fingerprint(folder) == expected


def test_the_cache_keeps_only_the_newest_entries(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(fingerprint, "_CACHE_ENTRIES", 3)
    old = write_model(tmp_path / "old", weight_bytes=MIB)
    weights_fingerprint(old)
    new = write_model(tmp_path / "new", weight_bytes=MIB, shards=2)
    weights_fingerprint(new)
    entries = json.loads((cache_dir / "fingerprints.json").read_text())["entries"]
    assert len(entries) == 3
    assert all(key.startswith(str(new.resolve())) for key in entries)


def test_folder_fingerprint_covers_every_file_below(tmp_path, monkeypatch):
    from w2s_jax.fingerprint import folder_fingerprint_record

    monkeypatch.setenv("W2S_JAX_CACHE_DIR", str(tmp_path / "cache"))
    step = tmp_path / "checkpoints" / "7"
    (step / "params").mkdir(parents=True)
    (step / "meta").write_text("{}")
    (step / "params" / "lora_b").write_bytes(bytes(range(256)) * 64)
    first = folder_fingerprint_record(step)
    assert sorted(first["files"]) == ["meta", "params/lora_b"]
    data = bytearray((step / "params" / "lora_b").read_bytes())
    data[len(data) // 2] ^= 1
    (step / "params" / "lora_b").write_bytes(bytes(data))
    assert folder_fingerprint_record(step)["fingerprint"] != first["fingerprint"]
