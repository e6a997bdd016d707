"""The toy-world tokenizer: exact round trips, single-digit tokens, HF loading, chat template."""

import json
import re

import pytest

from w2s_jax.data.arithmetic import generate_split
from w2s_jax.data.toy_tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    SYSTEM_PROMPT,
    build_toy_tokenizer,
    chat_text,
    corpus_texts,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def toy_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_tokenizer")
    build_toy_tokenizer(folder, vocab_size=512, n_problems=1000, seed=0)
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(toy_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(toy_tokenizer_dir))


@pytest.fixture(scope="module")
def held_out_texts():
    # Validation problems: text the tokenizer never saw during training.
    return corpus_texts(generate_split("validation", 150, seed=5))


def test_folder_layout_and_config(toy_tokenizer_dir):
    names = {p.name for p in toy_tokenizer_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((toy_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|pad|>"
    assert config["clean_up_tokenization_spaces"] is False


def test_special_tokens_have_fixed_ids(hf_tokenizer):
    assert [hf_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert hf_tokenizer.pad_token_id == 0
    assert hf_tokenizer.eos_token_id == 3
    assert hf_tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"][0] == 2
    assert hf_tokenizer("<|im_end|>")["input_ids"] == [3]
    assert hf_tokenizer("<|endoftext|>")["input_ids"] == [1]


def test_vocab_is_small_and_digits_are_single_tokens(hf_tokenizer):
    vocab = hf_tokenizer.get_vocab()
    assert 300 <= len(vocab) <= 512
    for token_id in vocab.values():
        text = hf_tokenizer.decode([token_id])
        if re.search(r"\d", text):
            assert re.fullmatch(r"\d", text), (token_id, text)
    # Numbers are spelled digit by digit.
    ids = hf_tokenizer("9071 + 65 = 9136")["input_ids"]
    digits = [hf_tokenizer.decode([i]) for i in ids if hf_tokenizer.decode([i]).isdigit()]
    assert digits == list("9071659136")


def test_round_trip_is_exact_on_held_out_text(hf_tokenizer, held_out_texts):
    odd = "Naïve café: 3½ → ∞, tabs\tand  spaces\n\n#### -12"
    for text in [*held_out_texts, odd]:
        ids = hf_tokenizer(text)["input_ids"]
        assert hf_tokenizer.decode(ids) == text


def test_task_text_compresses(hf_tokenizer, held_out_texts):
    # Template words are merged: clearly fewer tokens than bytes.
    n_tokens = sum(len(hf_tokenizer(t)["input_ids"]) for t in held_out_texts)
    n_bytes = sum(len(t.encode()) for t in held_out_texts)
    assert n_tokens < 0.5 * n_bytes
    words = hf_tokenizer(" apples marbles gives away")["input_ids"]
    assert len(words) == 4


def test_chat_template_renders_qwen_format(hf_tokenizer):
    question, answer = "Tom has 5 pens. How many pens does Tom have now?", "#### 5"
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question},
    ]
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>user\n" + question + "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt == chat_text(question)
    full = hf_tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False
    )
    assert full == chat_text(question, answer)
    assert hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    ) == chat_text(question, system=None)
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids == hf_tokenizer(prompt)["input_ids"]
    assert ids.count(2) == 3 and ids.count(3) == 2


def test_training_is_deterministic(tmp_path, toy_tokenizer_dir):
    again = build_toy_tokenizer(tmp_path / "again", vocab_size=512, n_problems=1000, seed=0)
    assert (again / "tokenizer.json").read_text() == (
        toy_tokenizer_dir / "tokenizer.json"
    ).read_text()


def test_too_small_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size must be at least 260"):
        train_tokenizer(["hello"], vocab_size=100)


def test_default_build_is_the_shipped_tokenizer(tmp_path):
    # The shipped models depend on it: the default stays digit by digit, merge for merge.
    from w2s_jax.demo_worlds import ASSETS, toy_task

    folder = build_toy_tokenizer(tmp_path / "again", config=toy_task(ASSETS / "expert"))
    built = json.loads((folder / "tokenizer.json").read_text())
    shipped = json.loads((ASSETS / "expert" / "tokenizer.json").read_text())
    for key in ("vocab", "merges"):
        assert built["model"][key] == shipped["model"][key], key
    assert built["pre_tokenizer"] == shipped["pre_tokenizer"]


def test_merged_digits_variant_spells_numbers_as_whole_tokens(tmp_path):
    from transformers import AutoTokenizer

    from w2s_jax.data.arithmetic import TaskConfig

    task = TaskConfig(min_steps=1, max_steps=3, digits=2, operand_digits=1)
    folder = build_toy_tokenizer(
        tmp_path / "merged", vocab_size=768, n_problems=2000, config=task, split_digits=False
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    pieces = [tokenizer.decode([i]) for i in tokenizer("Buys 3*8=24: 75+24=99.")["input_ids"]]
    assert pieces == ["Buys", " 3", "*", "8", "=", "24", ":", " 75", "+", "24", "=", "99", "."]
    # every number of the task is one token, with and without its leading space (" 0" never
    # occurs: no question starts from zero)
    for n in range(100):
        assert len(tokenizer(str(n))["input_ids"]) == 1, n
        assert len(tokenizer(f" {n}")["input_ids"]) == (2 if n == 0 else 1), n
    for text in corpus_texts(generate_split("validation", 50, seed=5, config=task)):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
