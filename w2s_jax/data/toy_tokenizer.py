"""A small byte-level BPE tokenizer for the toy reasoning world.

Trained offline with `tokenizers` on generated problems and solutions (plain,
in the base-model "Question: …\\nAnswer: " form and in the chat form), with a
Qwen2-style pre-tokenizer that splits every digit into its own token, so the
model sees numbers digit by digit. Saved as a Hugging Face tokenizer folder
(tokenizer.json, tokenizer_config.json with the chat template,
special_tokens_map.json) that `transformers.AutoTokenizer` loads.

Special tokens have fixed ids: 0 <|pad|>, 1 <|endoftext|>, 2 <|im_start|>,
3 <|im_end|>. The end-of-sequence token is <|im_end|>, as in Qwen2.5-Instruct.
`train_tokenizer` and `save_tokenizer` also serve other offline tokenizers (the
tests' and benchmarks' tiny ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from w2s_jax.data.arithmetic import Problem, TaskConfig, generate_split
from w2s_jax.files import atomic_write_json, atomic_write_text
from w2s_jax.prompts import EVAL_SYSTEM_PROMPT

PAD, ENDOFTEXT, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, ENDOFTEXT, IM_START, IM_END)
SYSTEM_PROMPT = EVAL_SYSTEM_PROMPT  # the toy world samples, trains and evaluates with it
# Qwen2.5's chat format without its default system message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2's pre-tokenization pattern: words with one leading non-letter, single digits,
# punctuation runs, newlines and spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def chat_text(
    question: str, answer: str | None = None, *, system: str | None = SYSTEM_PROMPT
) -> str:
    """`question` (and `answer`, if given) in the chat format the template renders."""
    text = f"{IM_START}system\n{system}{IM_END}\n" if system is not None else ""
    text += f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"
    if answer is not None:
        text += f"{answer}{IM_END}\n"
    return text


def corpus_texts(problems: Iterable[Problem]) -> list[str]:
    """Training texts for the tokenizer: each problem plain, as Question/Answer and as chat."""
    texts = []
    for p in problems:
        texts.append(f"{p.question}\n{p.answer}")
        texts.append(f"Question: {p.question}\nAnswer: {p.answer}")
        texts.append(chat_text(p.question, p.answer))
    return texts


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    split_digits: bool = True,
):
    """Train a byte-level BPE `tokenizers.Tokenizer` on `texts`.

    Special tokens get ids 0, 1, ... in the order given. split_digits: Qwen2's
    pre-tokenizer (every digit its own token); otherwise GPT-2's byte-level regex.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size must be at least {256 + len(special_tokens)} (bytes + special "
            f"tokens), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    if split_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(
    tokenizer,
    folder: str | Path,
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    eos_token: str = IM_END,
    pad_token: str = PAD,
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Write `tokenizer` as a Hugging Face tokenizer folder (each file atomically).

    The special tokens other than eos and pad become additional special tokens.
    """
    folder = Path(folder)
    atomic_write_text(folder / "tokenizer.json", tokenizer.to_str(pretty=True))
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in special_tokens
    }
    additional = [t for t in special_tokens if t not in (eos_token, pad_token)]
    atomic_write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "bos_token": None,
            "eos_token": eos_token,
            "pad_token": pad_token,
            "unk_token": None,
            "additional_special_tokens": additional,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 4096,
            "chat_template": chat_template,
        },
    )
    atomic_write_json(
        folder / "special_tokens_map.json",
        {"eos_token": eos_token, "pad_token": pad_token, "additional_special_tokens": additional},
    )
    return folder


def build_toy_tokenizer(
    folder: str | Path,
    *,
    vocab_size: int = 512,
    n_problems: int = 2000,
    seed: int = 0,
    config: TaskConfig | None = None,
    split_digits: bool = True,
) -> Path:
    """Train the toy-world tokenizer on `n_problems` train problems; save it to `folder`.

    `config` is the task's TaskConfig (default: TaskConfig()). split_digits=False gives
    the cross-tokenizer amateur's variant: GPT-2's pre-tokenizer, so BPE merges numbers
    into multi-digit tokens (the default, digit by digit, is the shipped models').
    """
    problems = generate_split("train", n_problems, seed=seed, config=config or TaskConfig())
    texts = corpus_texts(problems)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, split_digits=split_digits)
    return save_tokenizer(tokenizer, folder)
