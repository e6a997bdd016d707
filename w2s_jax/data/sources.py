"""Question sources: JSONL files in the LightReasoner/GSM8K shape.

A source string is a path to a `.jsonl` file. Each line is an object with a
question field, an optional answer field and an optional id field (the line
number is used when there is no id). Ground-truth answers are carried along
for evaluation; the sampling stage never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

from w2s_jax.files import DataError, read_jsonl


@dataclass(frozen=True)
class Question:
    """One problem: a stable id, the question text and the raw answer text (or None)."""

    id: str
    question: str
    answer: str | None = None


def load_questions(
    source: str,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str = "id",
    require_answer: bool = False,
    max_questions: int | None = None,
) -> list[Question]:
    """Read questions from a JSONL source, checking every line.

    Errors name the file and line: a missing or empty question, a missing answer
    when `require_answer`, a duplicated id.
    """
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for lineno, record in read_jsonl(source):
        text = record.get(question_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{source}:{lineno}: field {question_field!r} is missing or empty "
                f"(fields present: {', '.join(sorted(record)) or 'none'})"
            )
        answer = record.get(answer_field)
        if require_answer and (answer is None or str(answer).strip() == ""):
            raise DataError(f"{source}:{lineno}: field {answer_field!r} is missing or empty")
        qid = str(record.get(id_field, f"line-{lineno}"))
        if qid in seen:
            raise DataError(f"{source}:{lineno}: id {qid!r} already used on line {seen[qid]}")
        seen[qid] = lineno
        questions.append(Question(qid, text, None if answer is None else str(answer)))
        if max_questions is not None and len(questions) >= max_questions:
            break
    return questions
