"""The toy arithmetic world: determinism, correct answers, consistent solutions, disjoint splits."""

import ast
import operator
import random
import re
from fractions import Fraction

import pytest

from w2s_jax.data.arithmetic import (
    SPLITS,
    TaskConfig,
    column_slip,
    generate_problem,
    generate_split,
    problem_stream,
    slipped_solution,
    split_of,
    write_split,
)
from w2s_jax.data.sources import load_questions

N_PER_SPLIT = 300


@pytest.fixture(scope="module")
def problems_by_split():
    return {split: generate_split(split, N_PER_SPLIT, seed=0) for split in SPLITS}


@pytest.fixture(scope="module")
def all_problems(problems_by_split):
    # Plus harder problems, where borrows and carries chain across three columns.
    hard = TaskConfig(min_steps=4, max_steps=6, digits=3, operand_digits=2)
    return [p for split in SPLITS for p in problems_by_split[split]] + generate_split(
        "train", 300, seed=0, config=hard
    )


# --- Independent references -------------------------------------------------

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: None}


def eval_exact(expression: str) -> Fraction:
    """Evaluate + - * / over integer literals with exact rational arithmetic."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            return (
                left / right
                if isinstance(node.op, ast.Div)
                else _BINOPS[type(node.op)](left, right)
            )
        raise AssertionError(f"unexpected node {ast.dump(node)} in {expression!r}")

    return walk(ast.parse(expression, mode="eval"))


def interpret_question(question: str) -> int:
    """Read the question's English sentence by sentence and compute the answer."""
    sentences = re.split(r"(?<=[.?]) ", question)
    first = re.fullmatch(r"([A-Z][a-z]+) has (\d+) ([a-z]+)\.", sentences[0])
    assert first, sentences[0]
    name, item = first.group(1), first.group(3)
    value = Fraction(int(first.group(2)))
    assert sentences[-1] == f"How many {item} does {name} have now?"
    for sentence in sentences[1:-1]:
        if m := re.fullmatch(r"(?:He|She) finds (\d+) more\.", sentence):
            value += int(m.group(1))
        elif m := re.fullmatch(r"(?:He|She) gives away (\d+)\.", sentence):
            value -= int(m.group(1))
        elif m := re.fullmatch(r"(?:He|She) (doubles|triples) them\.", sentence):
            value *= {"doubles": 2, "triples": 3}[m.group(1)]
        elif m := re.fullmatch(
            r"(?:He|She) splits them into (\d+) equal piles and keeps one\.", sentence
        ):
            value /= int(m.group(1))
        elif m := re.fullmatch(r"(?:He|She) (buys|sells) (\d+) bags of (\d+)\.", sentence):
            sign = 1 if m.group(1) == "buys" else -1
            value += sign * int(m.group(2)) * int(m.group(3))
        else:
            raise AssertionError(f"unrecognised sentence {sentence!r}")
        assert value.denominator == 1 and value >= 1, (sentence, value)
    return int(value)


def column_carries(a: int, b: int, sign: str) -> int:
    """Carries (for +) or borrows (for -) done on decimal digit strings, right to left."""
    da, db = str(a)[::-1], str(b)[::-1].ljust(len(str(a)), "0")
    count = carry = 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        carry = int(x + y + carry >= 10) if sign == "+" else int(x - y - carry < 0)
        count += carry
    return count


def forgetful_column_arithmetic(a: int, b: int, sign: str) -> int:
    """a +/- b on digit strings, each column on its own, carries and borrows dropped."""
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width), str(b).zfill(width)
    step = operator.add if sign == "+" else operator.sub
    return int("".join(str(step(int(x), int(y)) % 10) for x, y in zip(da, db, strict=True)))


_EQUATION = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")
_PY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


# --- Tests ------------------------------------------------------------------


def test_deterministic_per_seed():
    a = generate_split("train", 50, seed=3)
    b = generate_split("train", 50, seed=3)
    c = generate_split("train", 50, seed=4)
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]
    stream = problem_stream("validation", seed=3)
    assert [next(stream) for _ in range(20)] == generate_split("validation", 20, seed=3)


def test_answers_match_independent_evaluators(all_problems):
    for p in all_problems:
        exact = eval_exact(p.expression)
        assert exact.denominator == 1 and exact == p.value, p.expression
        assert interpret_question(p.question) == p.value, p.question
        lines = p.answer.split("\n")
        assert lines[-1] == f"#### {p.value}"
        assert lines[-2] == f"The answer is \\boxed{{{p.value}}}."
        assert p.answer.split("####")[-1].strip() == str(p.value)


def test_worked_solution_is_a_consistent_chain(all_problems):
    for p in all_problems:
        start = int(re.search(r"\d+", p.question).group())
        step_lines = p.answer.split("\n")[:-2]
        assert len(step_lines) == p.steps
        value, carries = start, 0
        for line in step_lines:
            equations = _EQUATION.findall(line)
            assert 1 <= len(equations) <= 2, line
            for a, sign, b, c in map(lambda e: (int(e[0]), e[1], int(e[2]), int(e[3])), equations):
                if sign == "/":
                    assert a % b == 0 and a // b == c, line
                else:
                    assert _PY[sign](a, b) == c, line
            # The last equation of each line continues from the previous result.
            a, sign, b, c = equations[-1]
            assert int(a) == value, (line, value)
            if len(equations) == 2:  # bags: the product feeds the update
                assert equations[0][3] == b, line
            if sign in "+-":
                carries += column_carries(int(a), int(b), sign)
            value = int(c)
        assert value == p.value
        assert carries == p.carries, p.answer


def test_splits_never_overlap_across_seeds(problems_by_split):
    other_seed = {split: generate_split(split, 100, seed=1) for split in SPLITS}
    keys = {
        split: {p.canonical for p in problems_by_split[split] + other_seed[split]}
        for split in SPLITS
    }
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not keys[a] & keys[b], (a, b)
    for split, problems in problems_by_split.items():
        assert len({p.canonical for p in problems}) == len(problems)  # deduplicated
        assert len({p.question for p in problems}) == len(problems)
        assert len({p.id for p in problems}) == len(problems)
        assert all(split_of(p.canonical) == split for p in problems)
        assert problems[0].id == f"{split}-00000"


def test_split_shares_follow_fractions():
    import random

    rng = random.Random(0)
    owners = [split_of(generate_problem(rng).canonical) for _ in range(4000)]
    shares = {s: owners.count(s) / len(owners) for s in SPLITS}
    assert abs(shares["train"] - 0.8) < 0.03, shares
    assert abs(shares["validation"] - 0.1) < 0.02, shares
    assert abs(shares["test"] - 0.1) < 0.02, shares


@pytest.mark.parametrize(
    "config",
    [
        TaskConfig(),
        TaskConfig(min_steps=5, max_steps=6, digits=3, operand_digits=2),
        TaskConfig(min_steps=1, max_steps=2, digits=1, operations=("add", "sub")),
        TaskConfig(min_steps=3, max_steps=3, digits=3, operations=("add", "mul", "div")),
        TaskConfig(min_steps=1, max_steps=2, digits=1, max_value=20),
    ],
)
def test_difficulty_knobs(config):
    problems = generate_split("train", 200, seed=0, config=config)
    assert {p.steps for p in problems} == set(range(config.min_steps, config.max_steps + 1))
    top = 10**config.operand_digits - 1
    for p in problems:
        assert eval_exact(p.expression) == p.value == interpret_question(p.question)
        numbers = [int(x) for x in re.findall(r"\d+", p.answer)]
        assert all(1 <= x <= config.value_cap for x in numbers), p.answer
        operands = [int(x) for x in re.findall(r"(?:finds|away) (\d+)", p.question)]
        assert all(x <= top for x in operands), p.question
        kinds = {
            op.split(":")[0] for op in p.canonical.split("|")[1:]
        }  # canonical lists the operations used
        assert kinds <= set(config.operations)
    assert max(p.carries for p in problems) >= 1 or config.value_cap < 10
    assert all(10 ** (config.digits - 1) <= p.start < 10**config.digits for p in problems)
    assert max(p.value for p in problems) > 10**config.digits - 1 or not config.max_value


def test_more_steps_means_more_equations():
    easy = generate_split("test", 100, config=TaskConfig(min_steps=2, max_steps=2))
    hard = generate_split("test", 100, config=TaskConfig(min_steps=6, max_steps=6))
    count = lambda ps: sum(len(_EQUATION.findall(p.answer)) for p in ps) / len(ps)
    assert count(hard) >= 2.5 * count(easy)


def test_write_split_round_trips_through_load_questions(tmp_path):
    path = tmp_path / "nested" / "test.jsonl"
    problems = write_split(path, "test", 25, seed=7)
    questions = load_questions(str(path), require_answer=True)
    assert [(q.id, q.question, q.answer) for q in questions] == [
        (p.id, p.question, p.answer) for p in problems
    ]
    assert not list(path.parent.glob(".*.tmp"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_steps=3, max_steps=2), "min_steps"),
        (dict(min_steps=0), "min_steps"),
        (dict(digits=0), "digits"),
        (dict(digits=2, operand_digits=3), "operand_digits"),
        (dict(operations=("add", "pow")), "operations"),
        (dict(operations=("sub", "div")), "grow"),
        (dict(digits=2, max_value=50), "max_value must be 0 or >= 99"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig(**kwargs)


def test_bad_split_and_exhausted_space_are_clear_errors():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        generate_split("dev", 1)
    with pytest.raises(ValueError, match="n must be"):
        generate_split("train", -1)
    tiny = TaskConfig(min_steps=1, max_steps=1, digits=1, operations=("add",))
    with pytest.raises(ValueError, match="ran out of new problems"):
        generate_split("test", 200, config=tiny)
    no_room = TaskConfig(min_steps=6, max_steps=6, digits=1, operations=("add",))
    with pytest.raises(ValueError, match="cannot build chains of 6 steps"):
        generate_split("train", 1, config=no_room)


def test_project_evaluator_reads_the_answers(problems_by_split):
    from w2s_jax.evaluate import extract_answer, gold_from_gsm8k, is_equiv

    for p in problems_by_split["test"]:
        assert gold_from_gsm8k(p.answer) == str(p.value)
        assert is_equiv(extract_answer(p.answer), str(p.value))
        # Without the closing lines, the fallback (last number) still reads the result.
        assert extract_answer(p.answer.rsplit("\nThe answer", 1)[0]) == str(p.value)


@pytest.mark.parametrize(
    "a, b, sign, slipped",
    [(38, 7, "+", 35), (42, 7, "-", 45), (23, 16, "-", 17), (78, 9, "+", 77), (34, 15, "+", 49)],
)
def test_column_slip_examples(a, b, sign, slipped):
    assert column_slip(a, b, sign) == slipped


def test_column_slip_matches_digit_string_reference():
    for a in range(1, 400, 3):
        for b in range(1, a, 7):
            for sign in "+-":
                assert column_slip(a, b, sign) == forgetful_column_arithmetic(a, b, sign)
                if column_carries(a, b, sign) == 0:  # nothing to forget
                    assert column_slip(a, b, sign) == _PY[sign](a, b)


def last_equation(line: str) -> tuple[int, str, int, int]:
    a, sign, b, c = _EQUATION.findall(line)[-1]
    return int(a), sign, int(b), int(c)


@pytest.mark.parametrize(
    "config", [TaskConfig(), TaskConfig(min_steps=4, max_steps=6, digits=3, operand_digits=2)]
)
def test_slipped_solutions_are_consistent_chains_with_exact_slips(config):
    rng = random.Random(0)
    slipped_steps = carry_steps = 0
    for p in generate_split("train", 300, seed=0, config=config):
        assert slipped_solution(p, rng, 0.0, config) == p.answer
        solution = slipped_solution(p, rng, 1.0, config)
        lines = solution.split("\n")
        assert len(lines) == p.steps + 2
        value = p.start
        for line in lines[:-2]:
            a, sign, b, c = last_equation(line)
            assert a == value, (solution, value)
            if sign in "+-" and column_carries(a, b, sign):
                carry_steps += 1
                slipped_steps += c != _PY[sign](a, b)
                assert c in (_PY[sign](a, b), forgetful_column_arithmetic(a, b, sign)), line
            elif sign == "/":
                assert a % b == 0 and a // b == c, line
            else:
                assert _PY[sign](a, b) == c, line
            assert 1 <= c <= config.value_cap, line
            value = c
        assert lines[-1] == f"#### {value}" and lines[-2] == f"The answer is \\boxed{{{value}}}."
    # At rate 1 a slip is only skipped when it would break a later step.
    assert slipped_steps > 0.8 * carry_steps


def test_slip_rate_is_the_share_of_forgotten_carries(problems_by_split):
    rng = random.Random(1)
    forgotten = carry_steps = 0
    for p in problems_by_split["train"] * 5:
        for line in slipped_solution(p, rng, 0.3).split("\n")[:-2]:
            a, sign, b, c = last_equation(line)
            if sign in "+-" and column_carries(a, b, sign):
                carry_steps += 1
                forgotten += c != _PY[sign](a, b)
    assert carry_steps > 500
    assert 0.22 < forgotten / carry_steps < 0.32  # 0.3, less the few skipped slips
    with pytest.raises(ValueError, match="slip rate"):
        slipped_solution(problems_by_split["train"][0], rng, 1.5)
