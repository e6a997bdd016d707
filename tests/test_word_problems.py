"""The real-LM world's phrasing of the arithmetic chains: deterministic, disjoint
phrasing families, and questions whose text alone gives the recorded answer."""

import re

import pytest

from w2s_jax.data.arithmetic import TaskConfig
from w2s_jax.data.word_problems import (
    ANSWER_INSTRUCTION,
    PHRASINGS,
    template_sentences,
    word_problem_records,
)

# An independent reader of the questions: one pattern per sentence shape, written
# from the rendered text (not from the templates), and what it does to the count.
N = r"(\d+)"
HE = "(?:He|She)"
ADD = rf"^(?:{HE} finds|{HE} gets|Then) {N} more( \w+)?(?: from a friend| are put in the box)?$"
SUB = rf"^(?:{HE} gives away|{HE} loses|Then) {N}(?: of them| \w+ are taken out of the box)?$"
SHARE = rf"^{HE} shares them equally among {N} friends, \w+ included, and keeps one share$"
BUY = rf"^(?:{HE} buys {N} bags of|{HE} gets {N} packs with|Then {N} bags holding) {N}"
SELL = rf"^(?:{HE} sells {N} bags of|{HE} gives {N} friends|Then {N} groups of) {N}"
READERS = [
    (rf"^\w+ (?:has|starts with) {N} \w+$", lambda v, a: a[0]),
    (rf"^At first there are {N} \w+ in \w+'s box$", lambda v, a: a[0]),
    (ADD, lambda v, a: v + a[0]),
    (SUB, lambda v, a: v - a[0]),
    (rf"^{HE} doubles them$", lambda v, a: 2 * v),
    (rf"^{HE} triples them$", lambda v, a: 3 * v),
    (rf"^{HE} ends up with two times as many$", lambda v, a: 2 * v),
    (rf"^{HE} ends up with three times as many$", lambda v, a: 3 * v),
    (rf"^The number of \w+ in the box is multiplied by {N}$", lambda v, a: v * a[0]),
    (rf"^{HE} splits them into {N} equal piles and keeps one$", lambda v, a: v // a[0]),
    (SHARE, lambda v, a: v // a[0]),
    (
        rf"^The box is split into {N} equal parts and only one part stays in it$",
        lambda v, a: v // a[0],
    ),
    (BUY, lambda v, a: v + a[0] * a[1]),
    (SELL, lambda v, a: v - a[0] * a[1]),
    (r"^How many \w+ (?:does \w+ have|are in the box)", lambda v, a: v),
]


def read_answer(question: str) -> int:
    value = None
    for sentence in re.split(r"(?<=[.?])\s+", question.removesuffix(" " + ANSWER_INSTRUCTION)):
        sentence = sentence.rstrip(".?")
        matches = [(m, fn) for pattern, fn in READERS if (m := re.match(pattern, sentence))]
        assert len(matches) == 1, f"{sentence!r}: {len(matches)} readers"
        match, fn = matches[0]
        value = fn(value, [int(g) for g in match.groups() if g and g.strip().isdigit()])
    return value


@pytest.mark.parametrize("phrasing", PHRASINGS)
def test_questions_state_their_answers(phrasing):
    config = TaskConfig(min_steps=1, max_steps=4)
    records = word_problem_records("test", 300, phrasing=phrasing, config=config)
    for record in records:
        assert record["answer"] == f"#### {read_answer(record['question'])}", record
    ops = {sentence.split()[1] for r in records for sentence in r["question"].split(". ")[1:]}
    assert len(ops) > 5  # every step kind was phrased


def test_splits_are_deterministic_and_phrasings_share_the_arithmetic():
    seen = word_problem_records("validation", 50, seed=3)
    assert seen == word_problem_records("validation", 50, seed=3)
    assert seen != word_problem_records("validation", 50, seed=4)
    held_out = word_problem_records("validation", 50, phrasing="held_out", seed=3)
    assert [r["answer"] for r in held_out] == [r["answer"] for r in seen]
    assert all(a["question"] != b["question"] for a, b in zip(seen, held_out, strict=True))
    train = {r["question"] for r in word_problem_records("train", 200)}
    assert not train & {r["question"] for r in word_problem_records("test", 200)}


def test_phrasing_families_share_no_sentence():
    seen, held_out = (set(template_sentences(p)) for p in PHRASINGS)
    assert seen and held_out and not seen & held_out
    train = " ".join(r["question"] for r in word_problem_records("train", 300))
    for template in held_out:  # no held-out wording ever reaches a training question
        fixed = max(re.split(r"\{\w+\}", template), key=len).strip()
        assert fixed not in train, template


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown phrasing 'odd'"):
        word_problem_records("test", 1, phrasing="odd")
    with pytest.raises(ValueError, match="train split is phrased 'seen' only"):
        word_problem_records("train", 1, phrasing="held_out")


def test_worked_solutions_are_true_equations_ending_in_the_boxed_answer():
    import random

    from w2s_jax.data.arithmetic import generate_split
    from w2s_jax.data.word_problems import worked_solution

    config = TaskConfig(min_steps=1, max_steps=4)
    slipped_any = False
    for problem in generate_split("train", 200, config=config):
        text = worked_solution(problem)
        *steps, last = text.split("\n")
        assert last == f"The answer is \\boxed{{{problem.value}}}."
        assert "####" not in text and not re.search(r"[A-Za-z]", "\n".join(steps))
        for a, op, b, result in re.findall(r"(\d+)([-+*/])(\d+)=(\d+)", text):
            assert eval(f"{a}{op}{b}") == int(result), text  # noqa: S307 (digits only)
        slipped = worked_solution(problem, slip_rate=1.0, rng=random.Random(0))
        slipped_any |= slipped != text
        assert slipped.count("\n") == text.count("\n")
    assert slipped_any
