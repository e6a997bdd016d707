"""Fingerprints tell checkpoints and tokenizers apart, and only when they differ."""

import shutil

from transformers import AutoTokenizer

from w2s_jax.fingerprint import same_tokenizer_files, tokenizer_fingerprint, weights_fingerprint


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
