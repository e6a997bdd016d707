"""Supervised fine-tuning records: chat prompt ids + worked-solution ids + end of turn.

`w2s train --objective sft` reads records {"id", "prompt_ids", "completion_ids"}
from `DIR/samples/*.jsonl`; the loss covers every completion token. The prompt
is the chat form `w2s eval` and `w2s sample` use (system prompt + user turn +
assistant header), tokenized alone, so training and decoding see the same ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from w2s_jax.data.toy_tokenizer import IM_END, SYSTEM_PROMPT, chat_text
from w2s_jax.files import atomic_write_jsonl


def sft_record(tokenizer, id: str, question: str, solution: str, *, system=SYSTEM_PROMPT) -> dict:
    """One record: prompt ids of the chat prompt, completion ids of `solution` + <|im_end|>."""
    end = tokenizer.convert_tokens_to_ids(IM_END)
    if end is None or end == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IM_END} token")
    prompt = tokenizer(chat_text(question, system=system), add_special_tokens=False)["input_ids"]
    completion = tokenizer(solution, add_special_tokens=False)["input_ids"]
    return {"id": id, "prompt_ids": list(prompt), "completion_ids": [*completion, end]}


def write_sft_records(
    folder: str | Path, tokenizer, examples: Iterable[tuple[str, str, str]], *, shard="part-000000"
) -> Path:
    """Write (id, question, solution) examples as `folder/samples/<shard>.jsonl`, atomically."""
    path = Path(folder) / "samples" / f"{shard}.jsonl"
    atomic_write_jsonl(path, (sft_record(tokenizer, *ex) for ex in examples))
    return path
