"""The toy reasoning world: seeded multi-step arithmetic word problems.

A problem follows one quantity through a chain of dependent steps (find more,
give away, buy or sell bags of n, double or triple, keep one of k equal piles).
Every step starts from the previous result, so a single slip anywhere spoils
the answer; difficulty comes from the number of steps and the digits of the
operands (carries and borrows happen naturally). The worked solution writes
one line per step with its equations and ends GSM8K-style::

    Tom has 23 apples. He finds 7 more. He buys 3 bags of 4. He doubles them.
    How many apples does Tom have now?

    Finds 7: 23+7=30.
    Buys 3*4=12: 30+12=42.
    Doubles: 42*2=84.
    The answer is \\boxed{84}.
    #### 84

A training corpus may also carry a planted misconception: `slipped_solution`
rewrites a worked solution so that some additions forget to carry and some
subtractions forget to borrow (column arithmetic without carries, e.g.
38+7=35, 42-7=45), and the rest of the chain follows from the slipped value.
Questions, validation and test answers are always exact.

Splits are decided by a hash of the problem's arithmetic alone (start value and
operations, not the names or items), so train / validation / test never share
a chain of computations, whatever the seed. Each split is a deduplicated stream,
deterministic per seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from w2s_jax.files import atomic_write_jsonl

SPLITS = ("train", "validation", "test")
# Share of the problem space owned by each split (by hash of the arithmetic).
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
OPERATIONS = ("add", "sub", "mul", "div", "buy", "sell")

NAMES = (
    ("Tom", "he"),
    ("Ben", "he"),
    ("Sam", "he"),
    ("Mia", "she"),
    ("Ana", "she"),
    ("Lea", "she"),
)
ITEMS = ("apples", "coins", "books", "stamps", "marbles", "shells", "cards", "pens")
_MULTIPLIER_VERBS = {2: "doubles", 3: "triples"}
_MAX_BAGS = 5
_MAX_BAG_SIZE = 9
_MAX_PILES = 5
_HASH_SALT = "w2s-arithmetic-v1"


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs of the generator.

    Each problem has between `min_steps` and `max_steps` dependent operations.
    Quantities have up to `digits` digits: the start amount has exactly `digits`
    digits and every intermediate quantity stays within 1..10**digits - 1.
    Amounts found or given away have up to `operand_digits` digits; bags hold
    2..9 items and there are 2..5 bags (times tables); piles are 2..5.
    `operations` picks which step kinds may occur. `max_value` (0: 10**digits - 1)
    lets intermediate quantities grow past the start's digits, up to max_value
    (digits=1, max_value=20: one-digit starts, sums into the teens).
    """

    min_steps: int = 2
    max_steps: int = 4
    digits: int = 2
    operand_digits: int = 1
    operations: tuple[str, ...] = OPERATIONS
    max_value: int = 0

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"need 1 <= min_steps <= max_steps, got min_steps={self.min_steps}, "
                f"max_steps={self.max_steps}"
            )
        if not 1 <= self.digits <= 6:
            raise ValueError(f"digits must be in 1..6, got {self.digits}")
        if not 1 <= self.operand_digits <= self.digits:
            raise ValueError(
                f"operand_digits must be in 1..digits={self.digits}, got {self.operand_digits}"
            )
        unknown = sorted(set(self.operations) - set(OPERATIONS))
        if unknown or not self.operations:
            raise ValueError(
                f"operations must be a non-empty subset of {OPERATIONS}, got {self.operations}"
            )
        if self.max_value and self.max_value < 10**self.digits - 1:
            raise ValueError(
                f"max_value must be 0 or >= {10**self.digits - 1} (digits={self.digits}), "
                f"got {self.max_value}"
            )
        if not {"add", "buy", "mul"} & set(self.operations):
            raise ValueError("operations need at least one of add, buy, mul to grow the quantity")

    @property
    def value_cap(self) -> int:
        """The largest quantity a problem may reach."""
        return self.max_value or 10**self.digits - 1


@dataclasses.dataclass(frozen=True)
class Step:
    """One operation: `op` in OPERATIONS with its operands (amount; or count, size)."""

    op: str
    args: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Problem:
    """A generated problem with its worked solution and the structure it came from.

    `answer` is the full worked solution ending in "#### N"; `value` is N;
    `expression` is the fully parenthesized arithmetic of the chain (evaluates to
    N with exact division); `canonical` is the name-free key used for splitting
    and deduplication; `carries` counts column carries of additions and borrows
    of subtractions along the chain; `start` and `chain` are the chain itself.
    """

    id: str
    question: str
    answer: str
    value: int
    expression: str
    canonical: str
    steps: int
    carries: int
    start: int
    chain: tuple[Step, ...]

    def record(self) -> dict:
        """The JSONL record {"id", "question", "answer"} read by `load_questions`."""
        return {"id": self.id, "question": self.question, "answer": self.answer}


def _column_carries(a: int, b: int) -> int:
    """Number of carries when adding a and b column by column."""
    carries = carry = 0
    while a or b:
        carry = 1 if a % 10 + b % 10 + carry >= 10 else 0
        carries += carry
        a, b = a // 10, b // 10
    return carries


def _column_borrows(a: int, b: int) -> int:
    """Number of borrows when subtracting b from a (a >= b) column by column."""
    borrows = borrow = 0
    while a or b:
        borrow = 1 if a % 10 - b % 10 - borrow < 0 else 0
        borrows += borrow
        a, b = a // 10, b // 10
    return borrows


def column_slip(a: int, b: int, sign: str) -> int:
    """a + b (sign "+") or a - b (sign "-") worked column by column with every carry
    or borrow forgotten: each digit is (a_i +/- b_i) mod 10 (38+7 -> 35, 42-7 -> 45)."""
    result, place = 0, 1
    while a or b:
        digit = (a % 10 + b % 10) if sign == "+" else (a % 10 - b % 10)
        result += (digit % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return result


def _candidate_steps(value: int, config: TaskConfig, rng: random.Random) -> list[Step]:
    """One random valid step of each allowed kind that can apply to `value`."""
    cap, top = config.value_cap, 10**config.operand_digits - 1
    steps = []
    for op in config.operations:
        if op == "add" and value + 2 <= cap:
            steps.append(Step(op, (rng.randint(2, min(top, cap - value)),)))
        elif op == "sub" and value >= 3:
            steps.append(Step(op, (rng.randint(2, min(top, value - 1)),)))
        elif op == "mul":
            factors = [k for k in _MULTIPLIER_VERBS if value * k <= cap]
            if factors:
                steps.append(Step(op, (rng.choice(factors),)))
        elif op == "div":
            divisors = [k for k in range(2, _MAX_PILES + 1) if value % k == 0]
            if divisors:
                steps.append(Step(op, (rng.choice(divisors),)))
        elif op in ("buy", "sell"):
            room = cap - value if op == "buy" else value - 1
            bags = rng.randint(2, _MAX_BAGS)
            size_top = min(_MAX_BAG_SIZE, room // bags)
            if size_top >= 2:
                steps.append(Step(op, (bags, rng.randint(2, size_top))))
    return steps


def _applies(value: int, step: Step, cap: int) -> bool:
    """Whether `step` is a valid step from `value` (result within 1..cap, exact division)."""
    if step.op == "div":
        return value % step.args[0] == 0
    return 1 <= _apply(value, step) <= cap


def _apply(value: int, step: Step) -> int:
    if step.op == "add":
        return value + step.args[0]
    if step.op == "sub":
        return value - step.args[0]
    if step.op == "mul":
        return value * step.args[0]
    if step.op == "div":
        return value // step.args[0]
    total = step.args[0] * step.args[1]
    return value + total if step.op == "buy" else value - total


def _sample_chain(rng: random.Random, config: TaskConfig) -> tuple[int, list[Step]]:
    """A random start and `n_steps` valid steps; chains that reach a dead end are redrawn."""
    n_steps = rng.randint(config.min_steps, config.max_steps)
    low = 10 ** (config.digits - 1) if config.digits > 1 else 2
    for _ in range(1000):
        start = rng.randint(low, 10**config.digits - 1)
        value, steps = start, []
        while len(steps) < n_steps:
            candidates = _candidate_steps(value, config, rng)
            if not candidates:
                break
            steps.append(rng.choice(candidates))
            value = _apply(value, steps[-1])
        else:
            return start, steps
    raise ValueError(f"{config} cannot build chains of {n_steps} steps; allow more operations")


def canonical_key(start: int, steps: list[Step]) -> str:
    """The name-free description of a chain, e.g. "23|add:15|buy:3,12"."""
    return "|".join([str(start)] + [f"{s.op}:{','.join(map(str, s.args))}" for s in steps])


def split_of(canonical: str) -> str:
    """The split that owns a canonical chain, from a salted SHA-256 of it."""
    digest = hashlib.sha256(f"{_HASH_SALT}|{canonical}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split in SPLITS:
        edge += SPLIT_FRACTIONS[split]
        if u < edge:
            return split
    return SPLITS[-1]


def _question(start: int, steps: Sequence[Step], name: str, pronoun: str, item: str) -> str:
    subject = pronoun.capitalize()
    question = [f"{name} has {start} {item}."]
    for step in steps:
        if step.op in ("add", "sub"):
            verb, more = ("finds", " more") if step.op == "add" else ("gives away", "")
            question.append(f"{subject} {verb} {step.args[0]}{more}.")
        elif step.op == "mul":
            question.append(f"{subject} {_MULTIPLIER_VERBS[step.args[0]]} them.")
        elif step.op == "div":
            question.append(f"{subject} splits them into {step.args[0]} equal piles and keeps one.")
        else:
            verb = "buys" if step.op == "buy" else "sells"
            question.append(f"{subject} {verb} {step.args[0]} bags of {step.args[1]}.")
    question.append(f"How many {item} does {name} have now?")
    return " ".join(question)


def _column_term(step: Step) -> tuple[str, int] | None:
    """(sign, amount) of an add/sub/buy/sell step, the column arithmetic a slip can hit."""
    if step.op in ("add", "sub"):
        return ("+" if step.op == "add" else "-"), step.args[0]
    if step.op in ("buy", "sell"):
        return ("+" if step.op == "buy" else "-"), step.args[0] * step.args[1]
    return None


def _solution(start: int, steps: Sequence[Step], slips: frozenset[int] = frozenset()):
    """(worked solution, expression, carries, final value); steps whose index is in
    `slips` forget their carries / borrows."""
    lines = []
    expression, value, carries = str(start), start, 0
    for index, step in enumerate(steps):
        new = _apply(value, step)
        term = _column_term(step)
        if term is not None:
            sign, amount = term
            carries += (_column_carries if sign == "+" else _column_borrows)(value, amount)
            if index in slips:
                new = column_slip(value, amount, sign)
        if step.op in ("add", "sub"):
            (x,) = step.args
            verb = "finds" if step.op == "add" else "gives away"
            lines.append(f"{verb.capitalize()} {x}: {value}{sign}{x}={new}.")
            expression = f"({expression} {sign} {x})"
        elif step.op == "mul":
            (k,) = step.args
            lines.append(f"{_MULTIPLIER_VERBS[k].capitalize()}: {value}*{k}={new}.")
            expression = f"({expression} * {k})"
        elif step.op == "div":
            (k,) = step.args
            lines.append(f"Keeps one of {k}: {value}/{k}={new}.")
            expression = f"({expression} / {k})"
        else:
            bags, size = step.args
            verb = "buys" if step.op == "buy" else "sells"
            lines.append(
                f"{verb.capitalize()} {bags}*{size}={amount}: {value}{sign}{amount}={new}."
            )
            expression = f"({expression} {sign} {bags} * {size})"
        value = new
    lines.append(f"The answer is \\boxed{{{value}}}.")
    lines.append(f"#### {value}")
    return "\n".join(lines), expression, carries, value


def slipped_solution(
    problem: Problem, rng: random.Random, rate: float, config: TaskConfig = TaskConfig()
) -> str:
    """The worked solution of `problem` with the planted misconception: each step whose
    column arithmetic carries or borrows forgets it with probability `rate` (and the
    chain goes on from the slipped value). A slip is skipped when the value it gives
    would make a later step invalid (out of range, inexact division)."""
    if not 0 <= rate <= 1:
        raise ValueError(f"slip rate must be in [0, 1], got {rate}")
    slips: set[int] = set()
    value = problem.start
    for index, step in enumerate(problem.chain):
        new = _apply(value, step)
        term = _column_term(step)
        if term is not None and rng.random() < rate:
            slipped = column_slip(value, term[1], term[0])
            if slipped != new and _chain_applies(slipped, problem.chain[index + 1 :], config):
                slips.add(index)
                new = slipped
        value = new
    return _solution(problem.start, problem.chain, frozenset(slips))[0]


def _chain_applies(value: int, steps: Sequence[Step], config: TaskConfig) -> bool:
    if not 1 <= value <= config.value_cap:
        return False
    for step in steps:
        if not _applies(value, step, config.value_cap):
            return False
        value = _apply(value, step)
    return True


def generate_problem(
    rng: random.Random, config: TaskConfig = TaskConfig(), *, id: str = ""
) -> Problem:
    """Draw one problem (any split) from `rng`."""
    start, steps = _sample_chain(rng, config)
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    answer, expression, carries, value = _solution(start, steps)
    return Problem(
        id=id,
        question=_question(start, steps, name, pronoun, item),
        answer=answer,
        value=value,
        expression=expression,
        canonical=canonical_key(start, steps),
        steps=len(steps),
        carries=carries,
        start=start,
        chain=tuple(steps),
    )


def _split_rng(split: str, seed: int) -> random.Random:
    digest = hashlib.sha256(f"{_HASH_SALT}|rng|{split}|{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def problem_stream(
    split: str, *, seed: int = 0, config: TaskConfig = TaskConfig()
) -> Iterator[Problem]:
    """An endless, deduplicated stream of problems owned by `split`, deterministic per seed.

    Ids are "{split}-{index:05d}" in stream order.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    rng = _split_rng(split, seed)
    seen: set[str] = set()
    misses = 0
    while True:
        problem = generate_problem(rng, config)
        if problem.canonical in seen or split_of(problem.canonical) != split:
            misses += 1
            if misses > 10_000 + 100 * len(seen):
                raise ValueError(
                    f"the {split} split of {config} ran out of new problems after "
                    f"{len(seen)}; raise digits or max_steps"
                )
            continue
        seen.add(problem.canonical)
        yield dataclasses.replace(problem, id=f"{split}-{len(seen) - 1:05d}")


def generate_split(
    split: str, n: int, *, seed: int = 0, config: TaskConfig = TaskConfig()
) -> list[Problem]:
    """The first `n` problems of `problem_stream(split, seed=seed, config=config)`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = problem_stream(split, seed=seed, config=config)
    return [next(stream) for _ in range(n)]


def write_split(
    path: str | Path, split: str, n: int, *, seed: int = 0, config: TaskConfig = TaskConfig()
) -> list[Problem]:
    """Write `n` problems of `split` to `path` as JSONL {"id","question","answer"}, atomically."""
    problems = generate_split(split, n, seed=seed, config=config)
    atomic_write_jsonl(path, (p.record() for p in problems))
    return problems
