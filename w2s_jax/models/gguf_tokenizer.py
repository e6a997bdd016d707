"""A GGUF file's tokenizer, rebuilt from its metadata with the `tokenizers` library.

Byte-level BPE (`tokenizer.ggml.model` "gpt2"): the vocabulary (`.tokens`, each id's
string in the byte alphabet), the merges (`.merges`, "left right"), and the way text is
split before BPE, chosen by `.pre` as transformers' own GGUF tokenizer chooses it for the
files this project ships: "qwen2" splits with Qwen2's regular expression, "smollm" and
"gpt-2" with GPT-2's. Control tokens (`.token_type` 3) become special added tokens,
user-defined ones (4) plain added tokens, so both stay whole in text. The result is
transformers' `PreTrainedTokenizerFast` with the file's bos/eos/unk/pad tokens, its
add_bos/add_eos flags and its chat template; no torch is imported.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

# Qwen2's split: English contractions, letters with one leading non-letter, single
# digits, punctuation runs with their line breaks, line breaks, other whitespace.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `.pre` -> the split regex applied before the byte-level step (None: GPT-2's own).
PRE_TOKENIZER_SPLITS = {"qwen2": QWEN2_SPLIT, "smollm": None, "gpt-2": None}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
# the tokenizer's role -> the metadata key (under tokenizer.ggml.) of its id
_ROLES = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _byte_spelling(token: str, alphabet: frozenset[str]) -> str:
    """`token` in the byte alphabet (a file may store a token in plain text)."""
    if set(token) <= alphabet:
        return token
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return "".join(piece for piece, _ in spell.pre_tokenize_str(token))


def _pre_tokenizer(where, pre: str):
    if pre not in PRE_TOKENIZER_SPLITS:
        known = ", ".join(sorted(PRE_TOKENIZER_SPLITS))
        raise ValueError(
            f"{where}: tokenizer.ggml.pre {pre!r} is not supported (supported: {known}); "
            "splitting its text another way would not give the model's token ids"
        )
    split = PRE_TOKENIZER_SPLITS[pre]
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _merges(where, merges: list[str]) -> list[tuple[str, str]]:
    pairs = [tuple(merge.split(" ")) for merge in merges]
    bad = next((merge for merge, pair in zip(merges, pairs, strict=True) if len(pair) != 2), None)
    if bad is not None:
        raise ValueError(f"{where}: tokenizer.ggml.merges holds {bad!r}, not two tokens")
    return pairs


def byte_level_bpe(checkpoint) -> Tokenizer:
    """The `tokenizers` tokenizer a `GGUFCheckpoint`'s metadata describes, with its added
    tokens."""
    where, metadata = checkpoint.path, checkpoint.value
    tokens = metadata("tokenizer.ggml.tokens")
    alphabet = frozenset(pre_tokenizers.ByteLevel.alphabet())
    vocab = {_byte_spelling(token, alphabet): i for i, token in enumerate(tokens)}
    merges = _merges(where, metadata("tokenizer.ggml.merges"))
    model = BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = _pre_tokenizer(where, metadata("tokenizer.ggml.pre", "gpt-2"))
    tokenizer.decoder = decoders.ByteLevel()
    kinds = metadata("tokenizer.ggml.token_type", None) or [1] * len(tokens)
    if len(kinds) != len(tokens):
        raise ValueError(
            f"{where}: tokenizer.ggml.token_type has {len(kinds)} entries for {len(tokens)} tokens"
        )
    typed = list(zip(tokens, kinds, strict=True))
    # a control token outside the byte alphabet would be a new id past the vocabulary
    control = [t for t, kind in typed if kind == CONTROL and set(t) <= alphabet]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user = [t for t, kind in typed if kind == USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tokenizer


def gguf_tokenizer(checkpoint):
    """A `GGUFCheckpoint`'s tokenizer as transformers' `PreTrainedTokenizerFast` (see the
    module doc)."""
    from transformers import PreTrainedTokenizerFast

    where, metadata = checkpoint.path, checkpoint.value

    kind = metadata("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{where}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', byte-level BPE)"
        )
    tokens = metadata("tokenizer.ggml.tokens")
    ids = {role: metadata(f"tokenizer.ggml.{key}", None) for role, key in _ROLES.items()}
    roles = {role: None if i is None else tokens[i] for role, i in ids.items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(checkpoint),
        chat_template=metadata("tokenizer.chat_template", None),
        add_bos_token=metadata("tokenizer.ggml.add_bos_token", False),
        add_eos_token=metadata("tokenizer.ggml.add_eos_token", False),
        clean_up_tokenization_spaces=False,
        **roles,
    )
