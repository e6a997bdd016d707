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


def test_transplant_keeps_the_model_on_tokens_both_vocabularies_have(tmp_path):
    """experiments/toy_world/build.py's transplant: a token both tokenizers spell alike
    keeps its embedding row, a new one gets the mean of the old rows spelling it, and on
    text both tokenize alike the transplant's logits equal the source's (transformers)."""
    import importlib.util

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from w2s_jax.data.toy_tokenizer import build_toy_tokenizer
    from w2s_jax.models import load_tokenizer

    path = ASSETS.parents[2] / "experiments" / "toy_world" / "build.py"
    spec = importlib.util.spec_from_file_location("toy_world_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    source = ASSETS / "amateur"
    tok_dir = build_toy_tokenizer(  # numbers merged: tokens the source lacks
        tmp_path / "tok",
        vocab_size=300,
        n_problems=200,
        config=toy_task(ASSETS / "expert"),
        split_digits=False,
    )
    new, old = load_tokenizer(tok_dir), load_tokenizer(source)
    build.transplant(source, new, tok_dir, tmp_path / "model")
    before = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    after = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    rows_before = before.get_input_embeddings().weight.detach().numpy()
    rows_after = after.get_input_embeddings().weight.detach().numpy()
    assert rows_after.shape == (len(new), rows_before.shape[1])
    old_vocab, transplanted = old.get_vocab(), 0
    for token, i in new.get_vocab().items():
        if token in old_vocab:  # same string, same bytes (both byte-level BPE)
            np.testing.assert_array_equal(rows_after[i], rows_before[old_vocab[token]])
        else:  # brute force: the old ids of the old tokenizer's own spelling
            pieces = [old_vocab[p] for p in old.tokenize(new.convert_tokens_to_string([token]))]
            np.testing.assert_allclose(rows_after[i], rows_before[pieces].mean(0), atol=1e-6)
            transplanted += 1
    assert transplanted > 0  # the mean-of-pieces branch ran
    text = "3*8=2-5+1\n7"
    ids_old, ids_new = old(text)["input_ids"], new(text)["input_ids"]
    assert [old.decode([i]) for i in ids_old] == [new.decode([i]) for i in ids_new]
    with torch.no_grad():
        logits_old = before(torch.tensor([ids_old])).logits[0].numpy()
        logits_new = after(torch.tensor([ids_new])).logits[0].numpy()
    shared = [(old_vocab[t], i) for t, i in new.get_vocab().items() if t in old_vocab]
    cols_old, cols_new = zip(*shared, strict=True)
    np.testing.assert_allclose(
        logits_new[:, list(cols_new)], logits_old[:, list(cols_old)], rtol=1e-5, atol=1e-5
    )
