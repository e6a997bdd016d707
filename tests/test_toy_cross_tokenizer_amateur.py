"""The shipped cross-tokenizer amateur (experiments/toy_world/cross_tokenizer.json): it
loads, its tokenizer is not the expert's (a smaller BPE vocabulary, digits still split),
and it re-scores its recorded validation accuracy."""

import json
from dataclasses import replace

import pytest

from w2s_jax.demo_worlds import ASSETS, toy_task

NAME = "amateur-bpe384"


@pytest.fixture(scope="module")
def entry():
    return json.loads((ASSETS / "manifest.json").read_text())["models"][NAME]


def test_its_tokenizer_differs_from_the_experts(entry):
    from w2s_jax.models import ModelConfig, load_tokenizer

    expert, amateur = load_tokenizer(ASSETS / "expert"), load_tokenizer(ASSETS / NAME)
    assert len(amateur) == entry["tokenizer"]["vocab_size"] != len(expert)
    assert entry["tokenizer"]["split_digits"] is True
    config = ModelConfig.from_hf_json(ASSETS / NAME / "config.json")
    assert config.vocab_size == len(amateur)
    words = "How many books does Sam have now?"
    assert len(amateur(words)["input_ids"]) > len(expert(words)["input_ids"])
    assert amateur.decode(amateur(words)["input_ids"]) == words
    digits = "Buys 3*8=24: 75+24=99."
    assert amateur(digits)["input_ids"] == expert(digits)["input_ids"]


def test_it_reproduces_its_recorded_validation_accuracy(entry, tmp_path):
    from w2s_jax.data.arithmetic import write_split
    from w2s_jax.data.toy_tokenizer import SYSTEM_PROMPT
    from w2s_jax.evaluate import EvalSettings, run_eval

    manifest = json.loads((ASSETS / "manifest.json").read_text())
    recorded = entry["validation_check"]
    data = tmp_path / "validation.jsonl"
    task = toy_task(ASSETS / "expert")
    write_split(data, "validation", recorded["total"], seed=manifest["data_seed"], config=task)
    settings = EvalSettings(
        model=str(ASSETS / NAME),
        data=str(data),
        system_prompt=SYSTEM_PROMPT,
        max_new_tokens=manifest["eval_max_new_tokens"],
        dtype="float32",
    )
    summary = run_eval(replace(settings, out=str(tmp_path / "eval"), batch_size=64, progress=False))
    assert summary["total"] == recorded["total"]
    # greedy decoding is deterministic up to float reassociation: allow one flipped question
    assert abs(summary["correct"] - recorded["correct"]) <= 1, (summary, recorded)
    assert summary["no_answer"] <= recorded["total"] // 10  # its answers end
