"""The real-LM world's task: the toy world's arithmetic chains, phrased for a chat model.

The arithmetic (start value, chain of steps, exact answer, train/validation/test
split by the chain's hash) is `w2s_jax.data.arithmetic`'s. Only the wording differs:
every step kind and the closing question have several natural-language templates,
split in two disjoint families:

- "seen": the phrasings of the train split (and of validation and test);
- "held_out": phrasings that no training question uses, to check that a gain on the
  test set is not memorization of the training templates.

A problem's templates, name and item are drawn from a generator seeded by the
problem's id and the family, so each split is deterministic per seed. The answer
record ends GSM8K-style in "#### N"; `w2s eval` grades the model's last "the answer
is N", boxed answer or number against it.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence

from w2s_jax.data.arithmetic import (
    SPLITS,
    Problem,
    Step,
    TaskConfig,
    generate_split,
    slipped_solution,
)

PHRASINGS = ("seen", "held_out")
ANSWER_INSTRUCTION = "Solve it step by step, then end with: The answer is N."

PEOPLE = {
    "seen": (("Tom", "he"), ("Mia", "she"), ("Ben", "he"), ("Ana", "she")),
    "held_out": (("Omar", "he"), ("Zoe", "she"), ("Ivan", "he"), ("Nia", "she")),
}
ITEMS = ("apples", "coins", "books", "stamps", "marbles", "shells", "cards", "pens")

# Per step kind, per family: templates with {S} (subject pronoun), {a}, {b}, {item}.
TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "add": {
        "seen": ("{S} finds {a} more.", "{S} gets {a} more {item} from a friend."),
        "held_out": ("Then {a} more {item} are put in the box.",),
    },
    "sub": {
        "seen": ("{S} gives away {a}.", "{S} loses {a} of them."),
        "held_out": ("Then {a} {item} are taken out of the box.",),
    },
    "mul": {
        "seen": ("{S} {verb} them.", "{S} ends up with {times} times as many."),
        "held_out": ("The number of {item} in the box is multiplied by {a}.",),
    },
    "div": {
        "seen": (
            "{S} splits them into {a} equal piles and keeps one.",
            "{S} shares them equally among {a} friends, {self} included, and keeps one share.",
        ),
        "held_out": ("The box is split into {a} equal parts and only one part stays in it.",),
    },
    "buy": {
        "seen": ("{S} buys {a} bags of {b}.", "{S} gets {a} packs with {b} {item} in each."),
        "held_out": ("Then {a} bags holding {b} {item} each are emptied into the box.",),
    },
    "sell": {
        "seen": ("{S} sells {a} bags of {b}.", "{S} gives {a} friends {b} {item} each."),
        "held_out": ("Then {a} groups of {b} {item} are taken out of the box.",),
    },
}
OPENINGS = {
    "seen": ("{name} has {n} {item}.", "{name} starts with {n} {item}."),
    "held_out": ("At first there are {n} {item} in {name}'s box.",),
}
QUESTIONS = {
    "seen": (
        "How many {item} does {name} have now?",
        "How many {item} does {name} have in the end?",
    ),
    "held_out": ("How many {item} are in the box at the end?",),
}
_TIMES = {2: "two", 3: "three"}
_VERBS = {2: "doubles", 3: "triples"}


def _rng(problem_id: str, phrasing: str, seed: int) -> random.Random:
    digest = hashlib.sha256(f"w2s-word-problems|{problem_id}|{phrasing}|{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _step_text(step: Step, template: str, pronoun: str, item: str) -> str:
    args = step.args + (0,) * (2 - len(step.args))
    return template.format(
        S=pronoun.capitalize(),
        self="herself" if pronoun == "she" else "himself",
        a=args[0],
        b=args[1],
        item=item,
        verb=_VERBS.get(args[0], ""),
        times=_TIMES.get(args[0], str(args[0])),
    )


def phrase(problem: Problem, phrasing: str, *, seed: int = 0) -> str:
    """The question of `problem`'s chain in the `phrasing` family ("seen" or "held_out")."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r}; expected one of {', '.join(PHRASINGS)}")
    rng = _rng(problem.id, phrasing, seed)
    name, pronoun = rng.choice(PEOPLE[phrasing])
    item = rng.choice(ITEMS)
    parts = [rng.choice(OPENINGS[phrasing]).format(name=name, n=problem.start, item=item)]
    for step in problem.chain:
        parts.append(_step_text(step, rng.choice(TEMPLATES[step.op][phrasing]), pronoun, item))
    parts.append(rng.choice(QUESTIONS[phrasing]).format(item=item, name=name))
    return " ".join(parts)


def word_problem_records(
    split: str,
    n: int,
    *,
    phrasing: str = "seen",
    seed: int = 0,
    config: TaskConfig | None = None,
    instruction: str = ANSWER_INSTRUCTION,
) -> list[dict]:
    """The first `n` problems of `split` as JSONL records {"id", "question", "answer"}:
    the question phrased in `phrasing` plus `instruction`, the answer "#### N"."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if split == "train" and phrasing != "seen":
        raise ValueError("the train split is phrased 'seen' only (held_out is for evaluation)")
    return [
        {
            "id": problem.id,
            "question": " ".join(filter(None, (phrase(problem, phrasing, seed=seed), instruction))),
            "answer": f"#### {problem.value}",
        }
        for problem in generate_split(split, n, seed=seed, config=config or TaskConfig())
    ]


def template_sentences(phrasing: str) -> Sequence[str]:
    """Every template of a family (openings, steps, questions), for overlap checks."""
    steps = [t for kinds in TEMPLATES.values() for t in kinds[phrasing]]
    return [*OPENINGS[phrasing], *steps, *QUESTIONS[phrasing]]


_LABEL = re.compile(r"^[A-Z][a-z]*(?: [a-z]+)*(?: (?P<inner>\d+\*\d+=\d+|\d+))?: (?P<eq>.*)$")


def worked_solution(problem: Problem, *, slip_rate: float = 0.0, rng=None) -> str:
    """The problem's solution as a chat answer: one equation per line, then "The answer
    is \\boxed{N}." (the toy world's worked solution without its step labels, which
    name the toy phrasing's verbs, and without "#### N"). With `slip_rate` > 0, the
    toy world's planted carry/borrow slips (`slipped_solution`, drawn from `rng`)."""
    text = problem.answer if not slip_rate else slipped_solution(problem, rng, slip_rate)
    lines = []
    for line in text.split("\n"):
        if line.startswith("####"):
            continue
        match = _LABEL.match(line)
        if match and not line.startswith("The answer"):
            inner = match.group("inner")
            line = (f"{inner}. " if inner and "=" in inner else "") + match.group("eq")
        lines.append(line)
    return "\n".join(lines)
