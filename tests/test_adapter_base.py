"""Adapters are bound to the base they were trained on: export and eval --lora refuse another."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from w2s_jax.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_qwen2_dir):
    from test_train import write_samples

    root = tmp_path_factory.mktemp("adapter_base")
    samples = write_samples(root / "samples", tiny_qwen2_dir, n=4)
    argv = ["train", "--expert", tiny_qwen2_dir, "--samples", samples, "--out", root / "run"]
    argv += ["--steps", "1", "--batch-positions", "4", "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    # Same architecture and shapes, other weights: one MLP matrix scaled.
    other = root / "other_base"
    shutil.copytree(tiny_qwen2_dir, other)
    tensors = load_file(other / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key] = (tensors[key] * np.float32(1.5)).astype(tensors[key].dtype)
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    return root, other


def test_export_refuses_another_base_unless_forced(trained, tiny_qwen2_dir, caplog):
    root, other = trained
    argv = ["export", "--lora", root / "run", "--out", root / "x_other", "--expert", other]
    with pytest.raises(
        SystemExit, match=r"^error: .*adapters trained on a base .*\(--force applies them anyway\)"
    ):
        main([str(a) for a in argv])
    assert not (root / "x_other").exists()
    assert main([str(a) for a in [*argv, "--force"]]) == 0
    assert "applying them anyway (--force)" in caplog.text
    argv = ["export", "--lora", root / "run", "--out", root / "x_own", "--expert", tiny_qwen2_dir]
    assert main([str(a) for a in argv]) == 0  # its own base: no question asked


def test_eval_lora_refuses_another_base_unless_forced(trained, tmp_path):
    root, other = trained
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "What is 2 + 3?", "answer": "#### 5"}\n')
    argv = ["eval", "--model", other, "--lora", root / "run", "--data", data]
    argv += ["--out", tmp_path / "e", "--max-new-tokens", "4", "--no-progress"]
    with pytest.raises(SystemExit, match=r"adapters trained on a base"):
        main([str(a) for a in argv])
    assert main([str(a) for a in [*argv, "--force"]]) == 0
