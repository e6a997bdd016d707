"""Stop ids come from special/added tokens, configs and the user, never from plain text."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from w2s_jax.prompts import chat_end_of_turn, special_token_ids, stop_ids

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>{% endfor %}"
)


def _tokenizer(words, special, *, eos=None, template=None):
    """A word-level tokenizer: `words` are ordinary vocabulary entries, `special` added ones."""
    vocab = {word: i for i, word in enumerate(["<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    if eos is not None:
        tokenizer.add_special_tokens({"eos_token": eos})
    tokenizer.chat_template = template
    return tokenizer


def test_a_plain_vocabulary_entry_spelling_an_end_token_is_no_stop_id(tmp_path):
    tokenizer = _tokenizer(
        ["hello", "</s>", "<|eot_id|>", "world"],
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        template=CHATML,
    )
    vocab = tokenizer.get_vocab()
    ids = stop_ids(tokenizer, tmp_path)
    assert vocab["</s>"] not in ids and vocab["<|eot_id|>"] not in ids
    assert ids == sorted([vocab["<|im_end|>"], vocab["<|endoftext|>"]])
    assert "</s>" not in special_token_ids(tokenizer)


def test_chat_template_end_of_turn_is_found():
    chatml = _tokenizer(["hi"], ["<|im_start|>", "<|im_end|>"], template=CHATML)
    assert chat_end_of_turn(chatml) == "<|im_end|>"
    llama = _tokenizer(
        ["hi"], ["<|start_header_id|>", "<|end_header_id|>", "<|my_end|>"], template=LLAMA3
    )
    assert chat_end_of_turn(llama) is None  # <|eot_id|> is not a token of this tokenizer
    llama = _tokenizer(
        ["hi"], ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], template=LLAMA3
    )
    assert chat_end_of_turn(llama) == "<|eot_id|>"
    # A template whose end of turn is unusual is still read from the template itself.
    custom = _tokenizer(
        ["hi"], ["<turn>", "<stop>"], template=CHATML.replace("<|im_end|>", "<stop>")
    )
    assert chat_end_of_turn(custom) == "<stop>"
    assert chat_end_of_turn(_tokenizer(["hi"], ["<|im_end|>"])) is None  # no template


def test_generation_config_config_and_user_ids_are_added(tmp_path):
    tokenizer = _tokenizer(["hello", "world", "again"], ["<|im_end|>"])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    im_end = tokenizer.get_vocab()["<|im_end|>"]
    assert stop_ids(tokenizer, tmp_path, config_eos=(1,), extra=(0,)) == sorted(
        {0, 1, 2, 3, im_end}
    )


def test_no_stop_token_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        stop_ids(_tokenizer(["hello", "</s>"], []), tmp_path)
