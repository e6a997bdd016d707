"""`merge_peft_adapter`: a PEFT LoRA folded into a HF folder in numpy equals peft's own
merge (PyTorch) and `w2s export`'s merged weights; bad adapters are refused."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from test_export import save_lora_checkpoint
from transformers import AutoModelForCausalLM

from w2s_jax.cli import main
from w2s_jax.lora import LoRAConfig
from w2s_jax.models.peft_merge import merge_peft_adapter
from w2s_jax.models.safetensors_io import CheckpointError


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_qwen2_dir):
    """A `w2s export` folder (merged weights + OUT/adapter) of random rank-4 adapters."""
    tmp = tmp_path_factory.mktemp("peft")
    config = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), dropout=0.0)
    save_lora_checkpoint(tmp / "run", tiny_qwen2_dir, config, scale=0.2)
    out = tmp / "export"
    assert main(["export", "--expert", str(tiny_qwen2_dir), "--lora", str(tmp / "run"),
                 "--out", str(out)]) == 0  # fmt: skip
    return out


def test_merge_equals_peft_and_export(tmp_path, tiny_qwen2_dir, exported):
    merged = merge_peft_adapter(tiny_qwen2_dir, exported / "adapter", tmp_path / "merged")
    ours = load_file(str(merged / "model.safetensors"))
    base = load_file(str(tiny_qwen2_dir / "model.safetensors"))
    hf_base = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32)
    reference = PeftModel.from_pretrained(hf_base, str(exported / "adapter")).merge_and_unload()
    expected = {k: v.numpy() for k, v in reference.state_dict().items()}
    changed = [k for k in ours if not np.array_equal(ours[k], base[k])]
    assert len(changed) == 3 * 2  # q, v and down of both layers
    for key, value in ours.items():
        assert value.dtype == base[key].dtype, key
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    exported_weights = load_file(str(exported / "model.safetensors"))
    for key in changed:
        np.testing.assert_allclose(ours[key], exported_weights[key], rtol=1e-5, atol=1e-6)
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        if (tiny_qwen2_dir / name).is_file():
            assert (merged / name).read_bytes() == (tiny_qwen2_dir / name).read_bytes()
    assert not list(tmp_path.glob(".merged*"))  # no temp folder left


def test_bad_adapters_are_refused(tmp_path, tiny_qwen2_dir, exported):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_peft_adapter(tiny_qwen2_dir, tmp_path, tmp_path / "out")
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(
        (exported / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match="use_dora=True"):
        merge_peft_adapter(tiny_qwen2_dir, dora, tmp_path / "out")
    assert not (tmp_path / "out").exists()
