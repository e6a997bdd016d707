"""Prompts: the system prompts, the prompt styles, chat formatting and the stop ids.

Sampling and evaluation format a question the same way (`prompt_ids`) but default
to different system prompts:

- `SAMPLE_SYSTEM_PROMPT`, "Please reason step by step.": `w2s sample`'s default, as
  in LightReasoner's published sampling code;
- `EVAL_SYSTEM_PROMPT`, the Qwen2.5-Math prompt that also asks for the final answer
  in \\boxed{}: `w2s eval`'s default, as in the Qwen2.5-Math evaluation toolkit.

So by default the expert's rollouts are scored under a prompt without the \\boxed{}
instruction and the trained model is graded under one with it. Each stage records
the prompt it used, rendered for the placeholder question "{question}"
(`prompt_example`): `prompt_example` in the samples' manifest.json and in eval's
run.json.

Stop ids (`stop_ids`): only tokens that are *special or added* in the tokenizer can
be stop ids: an ordinary vocabulary entry that happens to spell an end string
(Qwen's vocabulary holds the plain BPE token `</s>`, id 128247) is text, and
stopping on it would cut answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from w2s_jax.files import DataError

SAMPLE_SYSTEM_PROMPT = "Please reason step by step."
EVAL_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_STYLES = ("chat", "plain")
PLAIN_TEMPLATE = "Question: {question}\nAnswer: "
# A base model prompted "Question: ...\nAnswer: " goes on to invent the next
# question; its output is cut there before extraction.
PLAIN_STOP_STRINGS = ("\nQuestion:",)
QUESTION_PLACEHOLDER = "{question}"

# End-of-turn / end-of-text strings of common chat formats (ChatML, Llama 3, Gemma, SentencePiece).
END_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "</s>",
)


# ------------------------------------------------------------------ prompts


def prompt_text(tokenizer, question: str, *, style: str, system_prompt: str) -> str:
    """The prompt as text: the chat template (system + user turn + assistant header), or
    the plain template ("Question: {q}\\nAnswer: "; `system_prompt` unused)."""
    if style == "plain":
        return PLAIN_TEMPLATE.format(question=question)
    if style != "chat":
        raise ValueError(f"prompt style must be 'chat' or 'plain', got {style!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use --prompt-style plain")
    messages = [{"role": "user", "content": question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, question: str, *, style: str, system_prompt: str) -> list[int]:
    """Token ids of `prompt_text`. The chat text already holds its special tokens; the plain
    text gets the tokenizer's own (a BOS token, for tokenizers that add one)."""
    text = prompt_text(tokenizer, question, style=style, system_prompt=system_prompt)
    if style == "plain":
        return list(tokenizer(text)["input_ids"])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(
    tokenizer, questions, *, style: str, system_prompt: str, context: int | None
) -> list[list[int]]:
    """`prompt_ids` of each question, each checked to leave room for a generated token
    within `context` positions (the model's max_position_embeddings; None: unchecked).

    Raises DataError naming the first question that does not fit, its prompt's token
    count and the limit, before anything is generated or written.
    """
    encoded = []
    for question in questions:
        ids = prompt_ids(tokenizer, question.question, style=style, system_prompt=system_prompt)
        if context is not None and len(ids) >= context:
            raise DataError(
                f"question {question.id!r}: its prompt is {len(ids):,} tokens, which leaves no "
                f"room to generate within the model's context of {context:,} positions "
                "(max_position_embeddings); shorten or drop the question"
            )
        encoded.append(ids)
    return encoded


def prompt_example(tokenizer, *, style: str, system_prompt: str) -> str:
    """The prompt a stage uses, rendered for the placeholder question "{question}"
    (recorded in each stage's manifest so a reader sees the exact prompt text)."""
    return prompt_text(tokenizer, QUESTION_PLACEHOLDER, style=style, system_prompt=system_prompt)


# ------------------------------------------------------------------ stop ids


def special_token_ids(tokenizer) -> dict[str, int]:
    """{content: id} of every special or added token (never an ordinary vocabulary entry)."""
    found = {str(t.content): int(i) for i, t in tokenizer.added_tokens_decoder.items()}
    for token, token_id in zip(
        tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True
    ):
        found.setdefault(str(token), int(token_id))
    return found


def chat_end_of_turn(tokenizer) -> str | None:
    """The special token the chat template puts right after an assistant turn, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "w2s-end-of-turn-probe"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 (templates may raise anything for unusual roles)
        return None
    after = text[text.find(marker) + len(marker) :] if marker in text else ""
    specials = special_token_ids(tokenizer)
    starts = [(after.find(token), token) for token in specials if token and token in after]
    if not starts:
        return None
    position, token = min(starts, key=lambda item: (item[0], -len(item[1])))
    return token if not after[:position].strip() else None


def generation_config_eos(model_dir: str | Path) -> list[int]:
    """eos_token_id of the folder's generation_config.json (empty when absent)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]


def stop_ids(
    tokenizer, model_dir: str | Path, config_eos: Iterable[int] = (), extra: Iterable[int] = ()
) -> list[int]:
    """Sorted stop ids: the tokenizer's eos, the chat template's end-of-turn token, the
    special tokens named in `END_TOKENS`, the model config's and generation_config.json's
    eos_token_id, and the user's `extra` ids. Raises ValueError when there is none."""
    specials = special_token_ids(tokenizer)
    ids = {int(i) for i in config_eos} | {int(i) for i in extra}
    ids.update(generation_config_eos(model_dir))
    if tokenizer.eos_token_id is not None:  # a declared eos token is special by definition
        ids.add(int(tokenizer.eos_token_id))
    end_of_turn = chat_end_of_turn(tokenizer)
    ids.update(specials[token] for token in (*END_TOKENS, end_of_turn) if token in specials)
    if not ids:
        raise ValueError(f"{model_dir}: found no end-of-sequence token to stop generation at")
    return sorted(ids)


def end_of_turn_id(tokenizer) -> int:
    """The id that ends an assistant turn: the chat template's end of turn, else eos."""
    token = chat_end_of_turn(tokenizer)
    end = tokenizer.convert_tokens_to_ids(token) if token else tokenizer.eos_token_id
    if end is None:
        raise ValueError("the tokenizer has no end-of-turn or eos token to end a solution with")
    return int(end)
