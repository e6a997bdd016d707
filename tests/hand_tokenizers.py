"""Hand-built BPE tokenizers whose splits are known in advance (tests of cross-tokenizer code).

Each listed word becomes one token through a chain of left-to-right merges, so the
tokenizer splits text into the longest listed words and single characters (byte-level)
or byte-fallback bytes (Metaspace) otherwise. Built offline with `tokenizers`.
"""

from __future__ import annotations

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPACE = "\u2581"


def _chains(words, alphabet_index):
    """vocab additions and merges making each word (a string of alphabet symbols) one token."""
    vocab, merges = {}, []
    for word in words:
        current = word[0]
        for ch in word[1:]:
            pair = (current, ch)
            current += ch
            if current not in alphabet_index and current not in vocab:
                vocab[current] = None
                merges.append(pair)
    return list(vocab), merges


def _wrap(tokenizer, specials, *, eos, pad, chat_template):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in specials if t not in (eos, pad)],
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def byte_level(
    words=(),
    *,
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    eos="<|im_end|>",
    pad="<|endoftext|>",
    split_digits=False,
    prefix_space=False,
    chat_template=CHATML,
):
    """A ByteLevel BPE tokenizer (GPT-2 alphabet) whose `words` (plain text, "Ġ"-free;
    write a leading space as " ") are single tokens; specials get ids 0, 1, ..."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet = sorted(alphabet)
    index = {c: i for i, c in enumerate(alphabet)}
    to_unicode = {b: c for c, b in _byte_table().items()}
    symbols = ["".join(to_unicode[b] for b in w.encode()) for w in words]
    extra, merges = _chains(symbols, index)
    vocab = {t: i for i, t in enumerate(list(specials) + alphabet + extra)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)]
    if split_digits:
        steps.insert(0, pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(specials))
    return _wrap(tokenizer, specials, eos=eos, pad=pad, chat_template=chat_template)


def _byte_table():
    from w2s_jax.vocab_map import _unicode_to_byte

    return _unicode_to_byte()


def metaspace(
    words=(),
    *,
    chars="abcdefghijklmnopqrstuvwxyz0123456789.",
    specials=("<unk>", "<s>", "</s>"),
    eos="</s>",
    pad=None,
    chat_template=None,
):
    """A SentencePiece-style BPE tokenizer: Metaspace ("▁" for spaces, prepended to the
    text), byte fallback (<0xNN>) for characters outside `chars` + "▁"; `words` (plain
    text, spaces as " ") are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = [SPACE] + list(dict.fromkeys(chars))
    index = {c: i for i, c in enumerate(alphabet)}
    extra, merges = _chains([w.replace(" ", SPACE) for w in words], index)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab = {t: i for i, t in enumerate(list(specials) + byte_tokens + alphabet + extra)}
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.add_special_tokens(list(specials))
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eos, bos_token="<s>", unk_token="<unk>", pad_token=pad
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast
