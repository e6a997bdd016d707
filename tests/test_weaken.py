"""Weaker copies of a checkpoint (amateurs with the expert's tokenizer): layer truncation
against transformers' own early exit, group requantization against a loop reference."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from w2s_jax.models.safetensors_io import SafetensorsFolder
from w2s_jax.models.weaken import quantize_groups, requantize, truncate_layers


def test_truncated_copy_is_the_early_exit_of_the_source(tmp_path, tiny_qwen2_dir):
    out = truncate_layers(tiny_qwen2_dir, tmp_path / "short", keep=1)
    source = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    short = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert short.config.num_hidden_layers == 1 < source.config.num_hidden_layers
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        hidden = source(ids, output_hidden_states=True).hidden_states[1]  # after layer 0
        expected = source.lm_head(source.model.norm(hidden))
        got = short(ids).logits
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
    assert (out / "tokenizer.json").is_file() and (out / "weakened.json").is_file()


def _loop_reference(matrix, bits, group_size):
    levels = 2 ** (bits - 1) - 1
    out = np.empty_like(matrix, dtype=np.float64)
    for r in range(matrix.shape[0]):
        for start in range(0, matrix.shape[1], group_size):
            group = matrix[r, start : start + group_size].astype(np.float64)
            scale = max(abs(group).max() / levels, 1e-300) if abs(group).max() else 1.0
            out[r, start : start + group_size] = [
                min(max(round(w / scale), -levels), levels) * scale for w in group
            ]
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_groups_matches_a_loop_reference(bits):
    matrix = np.random.default_rng(bits).normal(size=(6, 64)).astype(np.float32)
    matrix[2, :16] = 0  # an all-zero group stays zero
    got = quantize_groups(matrix, bits, 16)
    np.testing.assert_allclose(got, _loop_reference(matrix, bits, 16), rtol=1e-12, atol=1e-12)
    assert len(np.unique(got[0, :16])) <= 2**bits - 1
    assert np.abs(got - matrix).max() > 0


def test_requantized_copy_changes_projections_only(tmp_path, tiny_qwen2_dir):
    out = requantize(tiny_qwen2_dir, tmp_path / "q3", bits=3, group_size=16)
    before, after = SafetensorsFolder(tiny_qwen2_dir), SafetensorsFolder(out)
    assert sorted(before.entries) == sorted(after.entries)
    for key in before.entries:
        old, new = np.asarray(before.get(key), np.float32), np.asarray(after.get(key))
        if key.endswith("_proj.weight"):
            np.testing.assert_allclose(new, quantize_groups(old, 3, 16), rtol=1e-6)
        else:
            np.testing.assert_array_equal(new, old)
    assert json.loads((out / "weakened.json").read_text())["bits"] == 3
    AutoModelForCausalLM.from_pretrained(out)  # loads as an HF folder


def test_bad_arguments_are_named_and_nothing_is_written(tmp_path, tiny_qwen2_dir):
    with pytest.raises(ValueError, match=r"keep must be in 1\.\.1 .* got 2"):
        truncate_layers(tiny_qwen2_dir, tmp_path / "a", keep=2)
    with pytest.raises(ValueError, match="bits must be in 2..8, got 1"):
        requantize(tiny_qwen2_dir, tmp_path / "b", bits=1)
    with pytest.raises(ValueError, match="group_size 7 does not divide"):
        requantize(tiny_qwen2_dir, tmp_path / "c", bits=3, group_size=7)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        truncate_layers(tiny_qwen2_dir, tmp_path / "d", keep=1)
