"""Evaluation benchmarks from local JSONL files: one preset per dataset shape.

A preset says where a record keeps its question, its gold answer and its id, and how
to read the gold. The shapes are those of the files the Qwen2.5-Math evaluation toolkit
ships (LightReasoner's seven benchmarks): GSM8K (`answer` ending "#### N"), MATH and
MATH-500 (`answer` where present, else the last \\boxed{} of `solution`), SVAMP,
ASDiv, Minerva Math (boxed `solution`), OlympiadBench (`final_answer`, a list) and
MMLU-STEM (multiple choice: `choices` listed after the question, gold the letter of
`answer`; the model's answer is graded by its letter). `--question-field`,
`--answer-field` and `--id-field` map other JSONL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from w2s_jax.data.sources import Question
from w2s_jax.files import DataError, read_jsonl
from w2s_jax.grading import CHOICE_LETTERS, gold_from_asdiv, gold_from_gsm8k, gold_from_math

GoldReader = Callable[[Any], str]


def _text(raw: Any) -> str:
    gold = str(raw).strip()
    if not gold:
        raise ValueError("empty answer")
    return gold


def _first_final_answer(raw: Any) -> str:
    """OlympiadBench: the first entry of `final_answer` (a list), $ signs stripped."""
    values = raw if isinstance(raw, list) else [raw]
    if not values or not str(values[0]).strip("$ \n"):
        raise ValueError(f"no final answer in {raw!r}")
    return str(values[0]).strip().strip("$").strip()


@dataclasses.dataclass(frozen=True)
class Preset:
    """Where a dataset keeps its question, gold answer and id, and how to read the gold.

    golds: (field, reader) pairs, the first field present wins. choices_field: multiple
    choice; the choices are listed after the question as "(A) ..." and the gold is the
    letter of `answer` (an index from 0 or a letter).
    """

    question_fields: tuple[str, ...]
    golds: tuple[tuple[str, GoldReader], ...]
    id_field: str
    choices_field: str | None = None


PRESETS = {
    "gsm8k": Preset(("question",), (("answer", gold_from_gsm8k),), "id"),
    "math": Preset(("problem",), (("answer", _text), ("solution", gold_from_math)), "unique_id"),
    "svamp": Preset(("Body", "Question"), (("Answer", _text),), "ID"),
    "asdiv": Preset(("body", "question"), (("answer", gold_from_asdiv),), "id"),
    "minerva_math": Preset(("problem",), (("solution", gold_from_math),), "idx"),
    "olympiadbench": Preset(("question",), (("final_answer", _first_final_answer),), "id"),
    "mmlu_stem": Preset(("question",), (("answer", _text),), "id", choices_field="choices"),
    "plain": Preset(("question",), (("answer", _text),), "id"),
}
PRESET_HELP = (
    "Dataset shape: gsm8k (question, answer '... #### N'), math (problem; answer, else the "
    "last \\boxed{} of solution; MATH and MATH-500), svamp (Body + Question, Answer), asdiv "
    "(body + question, answer '9 (apples)'), minerva_math (problem, boxed solution), "
    "olympiadbench (question, final_answer list), mmlu_stem (question, choices, answer "
    "index or letter; graded by letter), plain (question, answer as is)."
)


def is_multiple_choice(preset: str) -> bool:
    """Whether answers of this preset are graded by their choice letter."""
    return PRESETS[preset].choices_field is not None


def _question_text(record: dict, fields: tuple[str, ...], where: str) -> str:
    """The question fields joined with a space, a period after a part that ends no sentence."""
    parts = []
    for field in fields:
        text = record.get(field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{where}: question field {field!r} is missing or empty "
                f"(fields present: {', '.join(sorted(record)) or 'none'})"
            )
        parts.append(text.strip())
    return " ".join(
        p if i == len(parts) - 1 or p[-1] in ".?!" else p + "." for i, p in enumerate(parts)
    )


def _choices(record: dict, field: str, where: str) -> list[str]:
    choices = record.get(field)
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise DataError(
            f"{where}: field {field!r} must be a list of 2 to {len(CHOICE_LETTERS)} choices, "
            f"got {choices!r}"
        )
    return [str(c).strip() for c in choices]


def _choice_gold(raw: Any, count: int) -> str:
    """The gold letter from an index (0-based) or a letter, among `count` choices."""
    letters = CHOICE_LETTERS[:count]
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < count:
        return letters[raw]
    if isinstance(raw, str) and raw.strip().upper() in letters:
        return raw.strip().upper()
    raise ValueError(f"answer {raw!r} is outside the {count} choices ({letters[0]}-{letters[-1]})")


def _gold(record: dict, golds, answer_field: str | None, where: str) -> tuple[str, Any]:
    """(field, raw value) of the gold: `answer_field`, else the preset's first present one."""
    fields = [answer_field] if answer_field else [field for field, _ in golds]
    for field in fields:
        raw = record.get(field)
        if raw is not None and str(raw).strip() != "":
            return field, raw
    raise DataError(
        f"{where}: answer field {' or '.join(map(repr, fields))} is missing or empty; "
        f"evaluation needs a gold answer (fields present: {', '.join(sorted(record))}; "
        "see --answer-field)"
    )


def read_question(record: dict, spec: Preset, where: str, fields: dict) -> tuple[str, str]:
    """(question text, gold answer) of one record under preset `spec`; `fields` holds the
    overrides question_fields / answer_field (None: the preset's). ValueError if unreadable."""
    question = _question_text(record, fields["question_fields"] or spec.question_fields, where)
    field, raw = _gold(record, spec.golds, fields["answer_field"], where)
    if spec.choices_field is not None:
        choices = _choices(record, spec.choices_field, where)
        listed = " ".join(f"({CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(choices))
        return f"{question}\nAnswer Choices: {listed}", _choice_gold(raw, len(choices))
    readers = dict(spec.golds)
    return question, readers.get(field, spec.golds[-1][1])(raw)


def load_eval_questions(
    source: str,
    *,
    preset: str = "gsm8k",
    question_fields: tuple[str, ...] | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    max_questions: int | None = None,
) -> list[Question]:
    """Questions with their gold final answers (in `Question.answer`) from a JSONL file.

    Fields default to the preset's; an `answer_field` of the preset's own is read by its
    reader, another by the preset's last (full-solution) reader. Errors name the file
    and line: missing question or answer field, a gold answer the preset cannot read
    (a choice outside the choices), a duplicated id, an empty file.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    fields = {"question_fields": question_fields, "answer_field": answer_field}
    questions, seen = [], {}
    for lineno, record in read_jsonl(source):
        where = f"{source}:{lineno}"
        try:
            question, gold = read_question(record, spec, where, fields)
        except ValueError as exc:
            if isinstance(exc, DataError):
                raise
            hint = (
                "" if preset == "plain" else "; for answers taken as they are, use --preset plain"
            )
            raise DataError(
                f"{where}: preset {preset!r} cannot read the gold answer: {exc}{hint}"
            ) from exc
        qid = str(record.get(id_field or spec.id_field, f"line-{lineno}"))
        if qid in seen:
            raise DataError(f"{where}: id {qid!r} already used on line {seen[qid]}")
        seen[qid] = lineno
        questions.append(Question(qid, question, gold))
        if max_questions is not None and len(questions) >= max_questions:
            break
    if not questions:
        raise DataError(f"{source}: no questions")
    return questions
