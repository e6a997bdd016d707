"""Token byte strings and the expert <- amateur vocabulary map (w2s_jax.vocab_map)."""

import numpy as np
import pytest
from hand_tokenizers import byte_level, metaspace

from w2s_jax.vocab_map import build_vocab_map, check_coverage, token_bytes

TEXTS = [
    "the 123 apples cost 45 coins",
    " leading spaces  and  double",
    "café 日本 🙂 ünïcödé 7",
    "The answer is \\boxed{12}.",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two trained byte-level tokenizers (different sizes, digits merged) and one
    trained SentencePiece-style (Metaspace, byte fallback) tokenizer."""
    from tiny_checkpoints import make_tiny_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    big = make_tiny_tokenizer(tmp_path_factory.mktemp("big"), vocab_size=400)
    small = make_tiny_tokenizer(tmp_path_factory.mktemp("small"), vocab_size=290)
    sp = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    sp.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=330, special_tokens=specials))
    sp_fast = PreTrainedTokenizerFast(
        tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    return {"big": big, "small": small, "sp": sp_fast}


def test_byte_level_bytes_of_hand_tokens():
    tok = byte_level([" the", "123", "日本"])
    spelled = token_bytes(tok)
    for word in (" the", "123", "日本"):
        assert spelled[tok.convert_tokens_to_ids(_byte_level_symbols(word))] == word.encode()
    ids = tok("é", add_special_tokens=False)["input_ids"]  # two byte tokens, "Ã" "©"
    assert [spelled[i] for i in ids] == [b"\xc3", b"\xa9"]
    assert spelled[tok.eos_token_id] is None and spelled[0] is None  # specials: no text


def _byte_level_symbols(word):
    from w2s_jax.vocab_map import _unicode_to_byte

    to_char = {b: c for c, b in _unicode_to_byte().items()}
    return "".join(to_char[b] for b in word.encode())


def test_metaspace_bytes_of_hand_tokens():
    tok = metaspace([" the", "12"])
    spelled = token_bytes(tok)
    assert spelled[tok.convert_tokens_to_ids("▁the")] == b" the"
    assert spelled[tok.convert_tokens_to_ids("12")] == b"12"
    assert spelled[tok.convert_tokens_to_ids("<0xE6>")] == b"\xe6"
    assert spelled[tok.convert_tokens_to_ids("</s>")] is None


@pytest.mark.parametrize("name", ["big", "small", "sp"])
def test_token_bytes_spell_every_encoded_text(trained, name):
    """Independent check: the bytes of an encoding's tokens concatenate to the text
    (SentencePiece prepends one space)."""
    tok = trained[name]
    spelled = token_bytes(tok)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        expected = text.encode()
        if name == "sp" and not text.startswith(" "):
            expected = b" " + expected
        assert b"".join(spelled[i] for i in ids) == expected


def _brute_force(expert, amateur):
    """O(Ve·Va): each amateur id -> the lowest expert id with identical non-None bytes."""
    e_bytes, a_bytes = token_bytes(expert), token_bytes(amateur)
    out = np.full(len(a_bytes), -1, np.int32)
    for a, ab in enumerate(a_bytes):
        if ab is None:
            continue
        for e, eb in enumerate(e_bytes):
            if eb == ab:
                out[a] = e
                break
    return out


@pytest.mark.parametrize(("expert", "amateur"), [("big", "small"), ("small", "sp"), ("sp", "big")])
def test_map_equals_brute_force_byte_comparison(trained, expert, amateur):
    e, a = trained[expert], trained[amateur]
    vm = build_vocab_map(e, a)
    brute = _brute_force(e, a)
    text_ids = [i for i, b in enumerate(token_bytes(a)) if b is not None]
    np.testing.assert_array_equal(vm.amateur_to_expert[text_ids], brute[text_ids])
    mapped = np.zeros(len(e), bool)
    mapped[vm.amateur_to_expert[vm.amateur_to_expert >= 0]] = True
    np.testing.assert_array_equal(vm.expert_mapped, mapped)
    assert (brute >= 0).sum() > 0.5 * len(a)  # a real overlap (the 256 bytes at least)


def test_duplicate_byte_strings_sum_onto_the_lowest_expert_id():
    # Metaspace "▁" and a byte-fallback <0x20> both spell b" ".
    amateur = metaspace([])
    expert = byte_level([])
    vm = build_vocab_map(expert, amateur)
    space_expert = expert.convert_tokens_to_ids("Ġ")
    assert vm.amateur_to_expert[amateur.convert_tokens_to_ids("▁")] == space_expert
    assert vm.amateur_to_expert[amateur.convert_tokens_to_ids("<0x20>")] == space_expert
    # Two expert ids with the same bytes: the lower one is canonical.
    dup_expert = metaspace([])
    vm2 = build_vocab_map(dup_expert, byte_level([]))
    low = min(dup_expert.convert_tokens_to_ids("▁"), dup_expert.convert_tokens_to_ids("<0x20>"))
    assert vm2.amateur_to_expert[byte_level([]).convert_tokens_to_ids("Ġ")] == low
    high = max(dup_expert.convert_tokens_to_ids("▁"), dup_expert.convert_tokens_to_ids("<0x20>"))
    assert not vm2.expert_mapped[high]


def test_special_tokens_map_by_role_and_by_string():
    expert = byte_level([], specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"))
    amateur = metaspace([], specials=("<unk>", "<s>", "</s>", "<tool>"), chat_template=None)
    vm = build_vocab_map(expert, amateur)
    # Roles: the expert's end of turn / eos <|im_end|> <-> the amateur's eos </s>.
    assert vm.expert_special_to_amateur[expert.eos_token_id] == amateur.eos_token_id
    assert vm.amateur_to_expert[amateur.eos_token_id] == expert.eos_token_id
    # By identical string.
    tool_e, tool_a = expert.convert_tokens_to_ids("<tool>"), amateur.convert_tokens_to_ids("<tool>")
    assert vm.amateur_to_expert[tool_a] == tool_e
    # No counterpart: the amateur's bos, unk; the expert's <|im_start|>.
    assert vm.amateur_to_expert[amateur.bos_token_id] == -1
    assert vm.amateur_to_expert[amateur.unk_token_id] == -1
    assert expert.convert_tokens_to_ids("<|im_start|>") not in vm.expert_special_to_amateur


def test_coverage_on_a_hand_checkable_case():
    expert = byte_level([" the", "123"])
    amateur = byte_level([" the"], split_digits=True)
    vm = build_vocab_map(expert, amateur)
    # Every amateur token exists in the expert; the expert's "123" and its chain's "12"
    # and two of the three special tokens' ... all specials map by role or string.
    unmapped = [t for t in ("12", "123") if not vm.expert_mapped[expert.convert_tokens_to_ids(t)]]
    assert unmapped == ["12", "123"]
    cov = vm.coverage([expert(" the 123 the", add_special_tokens=False)["input_ids"]])
    # tokens: " the" " " "123" " the" -> 3 of 4 mapped
    assert cov["token_occurrences"] == pytest.approx(3 / 4)
    assert cov["amateur_ids"] == 1.0
    assert cov["expert_ids"] == pytest.approx((len(expert) - 2) / len(expert))


def test_refusal_below_threshold_names_measured_coverage():
    cov = {"token_occurrences": 0.375, "expert_ids": 0.5, "amateur_ids": 0.25}
    with pytest.raises(ValueError, match=r"covers 37\.5% .* below --min-vocab-coverage 50\.0%"):
        check_coverage(cov, 0.5, expert="E", amateur="A")
    check_coverage(cov, 0.3, expert="E", amateur="A")  # above: accepted
