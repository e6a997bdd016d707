"""Alignment of expert positions to amateur tokens at the same text boundary, on hand-made
strings whose splits by the two tokenizers are written out by hand."""

import numpy as np
import pytest
from hand_tokenizers import byte_level, metaspace

from w2s_jax.token_alignment import align_completion, plain_encoder
from w2s_jax.vocab_map import build_vocab_map, token_bytes


def _pieces(tokenizer, ids):
    spelled = token_bytes(tokenizer)
    return [
        spelled[i] if spelled[i] is not None else tokenizer.convert_ids_to_tokens(i) for i in ids
    ]


def _align(expert, amateur, expert_ids):
    vm = build_vocab_map(expert, amateur)
    return align_completion(expert_ids, vm, plain_encoder(amateur))


def _ids(tokenizer, pieces):
    """Expert ids from token strings (byte-level symbols or special tokens)."""
    ids = tokenizer.convert_tokens_to_ids(pieces)
    assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id is None
    return ids


@pytest.fixture(scope="module")
def pair():
    expert = byte_level([" the", "123", "日本"])
    amateur = metaspace([" the", "12"])
    return expert, amateur


def test_multibyte_digits_spaces_and_eos(pair):
    expert, amateur = pair
    text = " the 123 é日本🙂"
    ids = expert(text, add_special_tokens=False)["input_ids"] + [expert.eos_token_id]
    assert _pieces(expert, ids) == [
        b" the", b" ", b"123", b" ", b"\xc3", b"\xa9", "日本".encode(),
        b"\xf0", b"\x9f", b"\x99", b"\x82", "<|im_end|>",
    ]  # fmt: skip
    result = _align(expert, amateur, ids)
    assert amateur.convert_ids_to_tokens(result.amateur_ids) == [
        "▁the", "▁", "12", "3", "▁", "<0xC3>", "<0xA9>",
        "<0xE6>", "<0x97>", "<0xA5>", "<0xE6>", "<0x9C>", "<0xAC>",
        "<0xF0>", "<0x9F>", "<0x99>", "<0x82>", "</s>",
    ]  # fmt: skip
    # " the" -> ▁the; " " -> ▁; "123" starts where "12" does but is cut differently;
    # " " -> the second ▁; é's first byte -> <0xC3>, its second byte is inside the
    # character; 日本 starts where <0xE6> does, cut differently; 🙂's first byte ->
    # <0xF0>, the other three inside it; the expert's eos -> </s>.
    expected = [0, 1, -1, 4, 5, -1, -1, 13, -1, -1, -1, 17]
    np.testing.assert_array_equal(result.columns, expected)


@pytest.mark.parametrize(
    ("expert_words", "expert_split", "amateur_words", "amateur_split", "expected"),
    [
        # expert 1|2|3 vs amateur 123: only "1" starts an amateur token, which is "123"
        ((), True, ("123",), False, [-1, -1, -1]),
        # expert 1|2|3 vs amateur 12|3: "1" against "12" is cut differently; "3" is shared
        ((), True, ("12",), False, [-1, -1, 1]),
        # expert 12|3 vs amateur 1|2|3: both boundaries exist, only "3" is the same token
        (("12",), False, (), True, [-1, 2]),
        # expert 123 vs amateur 12|3
        (("123",), False, ("12",), False, [-1]),
        # the same split on both sides: every position aligned
        ((), True, (), True, [0, 1, 2]),
    ],
)
def test_digits_split_versus_merged(
    expert_words, expert_split, amateur_words, amateur_split, expected
):
    expert = byte_level(expert_words, split_digits=expert_split)
    amateur = byte_level(amateur_words, split_digits=amateur_split)
    ids = expert("123", add_special_tokens=False)["input_ids"]
    assert len(ids) == len(expected)
    np.testing.assert_array_equal(_align(expert, amateur, ids).columns, expected)


def test_leading_space_byte_level_versus_metaspace():
    merged = metaspace([" the"])
    # Ġthe vs ▁the: the same bytes, aligned; "a" then " the": two boundaries.
    expert = byte_level([" the"])
    ids = expert("a the", add_special_tokens=False)["input_ids"]
    assert _pieces(expert, ids) == [b"a", b" the"]
    result = _align(expert, merged, ids)
    assert merged.convert_ids_to_tokens(result.amateur_ids) == ["a", "▁the"]  # no prepended ▁
    np.testing.assert_array_equal(result.columns, [0, 1])
    # Ġ|t|h|e vs ▁the: only the space starts an amateur token, and that token is " the".
    split = byte_level([])
    ids = split(" the", add_special_tokens=False)["input_ids"]
    assert _pieces(split, ids) == [b" ", b"t", b"h", b"e"]
    np.testing.assert_array_equal(_align(split, merged, ids).columns, [-1, -1, -1, -1])


def test_no_prefix_space_is_added_mid_sequence():
    # An amateur whose ByteLevel pre-tokenizer adds a prefix space ("a" -> "Ġa") at the
    # start of a text: the completion continues a prompt, so none is added there.
    expert = byte_level([" the"])
    amateur = byte_level([" the", " a"], prefix_space=True)
    assert amateur.convert_ids_to_tokens(amateur("a", add_special_tokens=False)["input_ids"]) == [
        "Ġa"
    ]
    ids = expert("a the", add_special_tokens=False)["input_ids"]
    result = _align(expert, amateur, ids)
    assert amateur.convert_ids_to_tokens(result.amateur_ids) == ["a", "Ġthe"]
    np.testing.assert_array_equal(result.columns, [0, 1])


def test_special_without_counterpart_ends_alignment(pair):
    expert, amateur = pair
    start = expert.convert_tokens_to_ids("<|im_start|>")  # no amateur role or string
    ids = expert(" the", add_special_tokens=False)["input_ids"] + [start]
    ids += expert(" the", add_special_tokens=False)["input_ids"]
    result = _align(expert, amateur, ids)
    # The amateur never sees <|im_start|>: its prediction there and after reads other text.
    np.testing.assert_array_equal(result.columns, [0, -1, -1])


def test_invalid_utf8_aligns_up_to_the_bad_byte(pair):
    expert, amateur = pair
    lead = expert.convert_tokens_to_ids("Ã")  # byte C3, a UTF-8 lead byte
    the = expert.convert_tokens_to_ids("Ġthe")
    # A rollout cut after a lead byte: the text before it is intact; the amateur reads
    # U+FFFD (EF BF BD) where the expert wrote C3, not the same token.
    np.testing.assert_array_equal(_align(expert, amateur, [the, lead]).columns, [0, -1])
    # C3 followed by a space is invalid: " the" after it is not the same text any more.
    np.testing.assert_array_equal(_align(expert, amateur, [lead, the]).columns, [-1, -1])


def test_text_is_encoded_once_per_segment(pair):
    expert, amateur = pair
    encoder = plain_encoder(amateur)
    calls = []

    class Counting:
        def encode(self, text, **kwargs):
            calls.append(text)
            return encoder.encode(text, **kwargs)

    vm = build_vocab_map(expert, amateur)
    ids = expert(" the 123 the 123", add_special_tokens=False)["input_ids"]
    ids += [expert.eos_token_id]
    align_completion(ids, vm, Counting())
    assert calls == [" the 123 the 123"]
