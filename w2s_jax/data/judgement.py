"""Toy-world binary classification: "is this worked solution (step) correct?".

Each item is a toy-world problem (`w2s_jax.data.arithmetic`) with a worked solution:
label 1 ("right") exact, label 0 ("wrong") with the planted misconception
(`slipped_solution`: some carries or borrows forgotten, the chain carried on from the
slipped value). Only problems on which a slip can happen are used, for both classes,
so "this chain needs a carry" says nothing about the label: the negatives are hard,
one wrong equation in an otherwise consistent solution. Classes are balanced exactly
(labels shuffled with a seeded rng), and items inherit the arithmetic splits (train /
validation / test never share a chain).

Two units (`unit`):
- "solution": {"id", "prompt" (the question), "completion" (the whole solution),
  "label"}: is this worked solution correct?
- "step": {"id", "text", "label"}: the solution line where the slip happens, cut after
  the first result digit the slip changes, e.g. "Finds 7: 38+7=4" (right) or
  "Finds 7: 38+7=3" (the carry forgotten): is this step right so far? The digit to
  judge is the last token, where the classifier reads; ~12 tokens instead of ~110. (On
  whole solutions the toy models' last-token features are at chance, and fine-tuning
  them to look back at one wrong digit is slow.)
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from w2s_jax.data.arithmetic import Problem, TaskConfig, problem_stream, slipped_solution
from w2s_jax.files import atomic_write_jsonl

LABEL_NAMES = ("wrong", "right")
UNITS = ("solution", "step")
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
    unit: str = "solution",
) -> list[dict]:
    """`n` balanced items of `split` (n // 2 wrong), deterministic per (split, seed, config);
    config: the toy world's TaskConfig (default TaskConfig())."""
    config = config or TaskConfig()
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
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
        if unit == "step":
            items.append({"id": problem.id, "text": _step_line(problem.answer, slipped, label)})
        else:
            solution = problem.answer if label == 1 else slipped
            items.append({"id": problem.id, "prompt": problem.question, "completion": solution})
        items[-1]["label"] = label
    return items


def _step_line(exact: str, slipped: str, label: int) -> str:
    """The step where the slipped solution departs from the exact one, cut after the first
    character that differs (a result digit): as in the exact solution (label 1) or in the
    slipped one (label 0), e.g. "Finds 7: 38+7=4" / "Finds 7: 38+7=3"."""
    pairs = zip(exact.split("\n"), slipped.split("\n"), strict=True)
    right, wrong = next((a, b) for a, b in pairs if a != b)
    cut = next(i for i, (a, b) in enumerate(zip(right, wrong, strict=False)) if a != b) + 1
    return (right if label == 1 else wrong)[:cut]


def write_judgement_split(path: str | Path, split: str, n: int, **options) -> list[dict]:
    """Write `judgement_items(split, n, **options)` to `path` as JSONL, atomically."""
    items = judgement_items(split, n, **options)
    atomic_write_jsonl(path, items)
    return items
