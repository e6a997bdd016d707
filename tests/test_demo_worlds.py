"""The demo worlds' model preparation on tiny checkpoints: the real-LM world's SFT recipe
(worked and slipped solutions) glue, and the checks of the models' folders."""

import json

import pytest

from w2s_jax.demo import DemoSettings
from w2s_jax.demo_worlds import SFTRecipe, prepare_models, sft_model


@pytest.mark.parametrize("slip_rate", [0.0, 1.0])
def test_sft_model_trains_on_worked_solutions_and_merges(tmp_path, tiny_qwen2_dir, slip_rate):
    from w2s_jax.models import load_tokenizer

    recipe = SFTRecipe(examples=6, steps=1)
    target = sft_model(tiny_qwen2_dir, tmp_path / "expert", slip_rate, recipe, print)
    assert (target / "config.json").is_file() and (target / "export_report.json").is_file()
    shard = next((tmp_path / "expert-data" / "samples").glob("*.jsonl"))
    records = [json.loads(line) for line in shard.open()]
    tokenizer = load_tokenizer(tiny_qwen2_dir)
    assert len(records) == 6
    text = tokenizer.decode(records[0]["completion_ids"])
    assert "The answer is \\boxed{" in text and text.endswith(tokenizer.eos_token)
    summary = json.loads((tmp_path / "expert-train" / "summary.json").read_text())
    assert summary["steps"] == 1
    assert (target / "adapter" / "adapter_config.json").is_file()  # what build.py ships
    assert sft_model(tiny_qwen2_dir, target, slip_rate, recipe, print) == target  # built once


def test_missing_model_folders_are_named(tmp_path):
    settings = DemoSettings(expert=str(tmp_path / "nowhere"), out=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="expert model folder .*nowhere has no config"):
        prepare_models(settings, tmp_path, print)
