"""Question sources: JSONL files in the LightReasoner/GSM8K shape.

A source string is a path to a `.jsonl` file. Each line is an object with a
question field, an optional answer field and an optional id field (the line
number is used when there is no id). Ground-truth answers are carried along
for evaluation; the sampling stage never reads them. `questions_from_records`
holds the per-record checks, shared with the TFDS reader (`w2s_jax.data.tfds_source`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from w2s_jax.files import DataError, read_jsonl


@dataclass(frozen=True)
class Question:
    """One problem: a stable id, the question text and the raw answer text (or None)."""

    id: str
    question: str
    answer: str | None = None


class SourceRecord(NamedTuple):
    """One raw record of a question source, with how to name it.

    `where` prefixes its errors ("FILE:LINE", "tfds:NAME (split ...) record I"),
    `label` names it in a later duplicate's error ("line 3", "record 3") and
    `default_id` is its id when it has none (or an empty one).
    """

    where: str
    label: str
    default_id: str
    fields: Mapping[str, Any]


def questions_from_records(
    records: Iterable[SourceRecord],
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str = "id",
    require_answer: bool = False,
    max_questions: int | None = None,
) -> list[Question]:
    """Check records one by one and turn them into Questions (the first `max_questions`).

    Errors name the record: a missing or empty question, a missing answer when
    `require_answer`, a duplicated id. Records past `max_questions` are not read.
    """
    questions: list[Question] = []
    first_use: dict[str, str] = {}
    for where, label, default_id, record in itertools.islice(records, max_questions):
        text = record.get(question_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{where}: field {question_field!r} is missing or empty "
                f"(fields present: {', '.join(sorted(record)) or 'none'})"
            )
        answer = record.get(answer_field)
        if require_answer and (answer is None or str(answer).strip() == ""):
            raise DataError(f"{where}: field {answer_field!r} is missing or empty")
        raw_id = record.get(id_field)
        qid = default_id if raw_id is None or raw_id == "" else str(raw_id)
        if qid in first_use:
            raise DataError(f"{where}: id {qid!r} already used on {first_use[qid]}")
        first_use[qid] = label
        questions.append(Question(qid, text, None if answer is None else str(answer)))
    return questions


def load_questions(source: str, **fields) -> list[Question]:
    """Read questions from a JSONL source, checking every line.

    `fields` are the options of `questions_from_records` (field names,
    `require_answer`, `max_questions`). Errors name the file and line; a record
    without an id gets "line-N".
    """
    records = (
        SourceRecord(f"{source}:{lineno}", f"line {lineno}", f"line-{lineno}", record)
        for lineno, record in read_jsonl(source)
    )
    return questions_from_records(records, **fields)
