"""Toy-world binary classification: "is this worked solution correct?".

Each item is a toy-world problem (`w2s_jax.data.arithmetic`) with a worked solution:
label 1 ("right") the exact solution, label 0 ("wrong") the same problem's solution
with the planted misconception (`slipped_solution`: some carries or borrows forgotten,
the chain carried on from the slipped value). Only problems on which a slip can
happen are used, for both classes, so "this chain needs a carry" says nothing about
the label: the negatives are hard, one wrong equation in an otherwise consistent
solution. Classes are balanced exactly (labels shuffled with a seeded rng), and items
inherit the arithmetic splits (train / validation / test never share a chain).

Records: {"id", "prompt" (the question), "completion" (the solution), "label"}, the
classification format `w2s weak-to-strong` reads.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from w2s_jax.data.arithmetic import Problem, TaskConfig, problem_stream, slipped_solution
from w2s_jax.files import atomic_write_jsonl

LABEL_NAMES = ("wrong", "right")
_TRIES = 8  # slip draws at `rate` before one at rate 1


def _rng(split: str, seed: int) -> random.Random:
    digest = hashlib.sha256(f"w2s-judgement-v1|{split}|{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def slipped_or_none(problem: Problem, rng: random.Random, rate: float, config: TaskConfig):
    """A solution of `problem` with at least one slip, or None when no slip can happen."""
    for attempt in range(_TRIES + 1):
        solution = slipped_solution(problem, rng, rate if attempt < _TRIES else 1.0, config)
        if solution != problem.answer:
            return solution
    return None


def judgement_items(
    split: str,
    n: int,
    *,
    seed: int = 0,
    config: TaskConfig | None = None,
    slip_rate: float = 0.5,
) -> list[dict]:
    """`n` balanced items of `split` (n // 2 wrong), deterministic per (split, seed, config);
    config: the toy world's TaskConfig (default TaskConfig())."""
    config = config or TaskConfig()
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = _rng(split, seed)
    labels = [0] * (n // 2) + [1] * (n - n // 2)
    rng.shuffle(labels)
    problems = problem_stream(split, seed=seed, config=config)
    items = []
    for label in labels:
        slipped = None
        while slipped is None:
            problem = next(problems)
            slipped = slipped_or_none(problem, rng, slip_rate, config)
        solution = problem.answer if label == 1 else slipped
        items.append(
            {"id": problem.id, "prompt": problem.question, "completion": solution, "label": label}
        )
    return items


def write_judgement_split(path: str | Path, split: str, n: int, **options) -> list[dict]:
    """Write `judgement_items(split, n, **options)` to `path` as JSONL, atomically."""
    items = judgement_items(split, n, **options)
    atomic_write_jsonl(path, items)
    return items
