"""The evaluation stage: batched, resumable grading of a model on math word problems.

`run_eval` greedily decodes every question with `w2s_jax.generate.generate`,
grades the outputs with `w2s_jax.grading`, and writes into the output folder:

- `shards/part-NNNNNN.jsonl`: one file per finished batch, written atomically, so a
  killed run leaves only whole batches; a re-run skips every id already there;
- `predictions.jsonl`: all rows in dataset order (id, question, output, answer,
  gold, correct, ...), and `summary.json` (accuracy, counts, mean output length,
  share with no extractable answer, settings), written when the run finishes;
- `run.json`: the settings and the weights' fingerprint, checked on resume so one
  folder never mixes runs, and `prompt_example`, the prompt for the question
  "{question}" (`model_weights_hashed`, the files hashed, and `prompt_example` are not
  compared).

`w2s_jax.compare` lines finished runs up against each other.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from w2s_jax import stats
from w2s_jax.data.sources import Question
from w2s_jax.files import (
    DataError,
    atomic_write_json,
    atomic_write_jsonl,
    read_jsonl,
)
from w2s_jax.grading import (
    SYMBOLIC_TIMEOUT_S,
    extract_answer,
    gold_from_asdiv,
    gold_from_gsm8k,
    gold_from_math,
    grade,
    is_equiv,
)
from w2s_jax.prompts import (
    EVAL_SYSTEM_PROMPT,
    PLAIN_STOP_STRINGS,
    PROMPT_STYLES,
    prompt_example,
    prompt_ids,
    stop_ids,
)
from w2s_jax.run_folder import claim
from w2s_jax.settings import (
    allow_unused_weights_setting,
    at_least,
    check,
    comma_list,
    compute_dtype_setting,
    free_fields,
    setting,
    stop_ids_setting,
)
from w2s_jax.settings import record as settings_record

__all__ = [
    "PRESETS",
    "EvalSettings",
    "extract_answer",
    "gold_from_gsm8k",
    "is_equiv",
    "load_eval_questions",
    "run_eval",
]


@dataclasses.dataclass(frozen=True)
class Preset:
    """Where a dataset keeps its question, gold answer and id, and how to read the gold."""

    question_fields: tuple[str, ...]
    answer_field: str
    id_field: str
    gold: Callable[[str], str]


PRESETS = {
    "gsm8k": Preset(("question",), "answer", "id", gold_from_gsm8k),
    "math": Preset(("problem",), "solution", "unique_id", gold_from_math),
    "svamp": Preset(("Body", "Question"), "Answer", "ID", str.strip),
    "asdiv": Preset(("body", "question"), "answer", "id", gold_from_asdiv),
    "plain": Preset(("question",), "answer", "id", str.strip),
}


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

    Several question fields (SVAMP's Body + Question) are joined with a space, a
    period added after a part that does not end a sentence. Fields default to the
    preset's. Errors name the file and line: missing question or answer field, a
    gold answer the preset cannot read, a duplicated id, an empty file.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    q_fields = question_fields or spec.question_fields
    a_field, i_field = answer_field or spec.answer_field, id_field or spec.id_field
    questions, seen = [], {}
    for lineno, record in read_jsonl(source):
        where = f"{source}:{lineno}"
        parts = []
        for field in q_fields:
            text = record.get(field)
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"{where}: question field {field!r} is missing or empty "
                    f"(fields present: {', '.join(sorted(record)) or 'none'})"
                )
            parts.append(text.strip())
        question = " ".join(
            p if i == len(parts) - 1 or p[-1] in ".?!" else p + "." for i, p in enumerate(parts)
        )
        raw = record.get(a_field)
        if raw is None or str(raw).strip() == "":
            raise DataError(
                f"{where}: answer field {a_field!r} is missing or empty; evaluation needs a "
                f"gold answer (fields present: {', '.join(sorted(record))}; see --answer-field)"
            )
        try:
            gold = spec.gold(str(raw))
        except ValueError as exc:
            raise DataError(
                f"{where}: preset {preset!r} cannot read the gold answer: {exc}"
            ) from exc
        qid = str(record.get(i_field, f"line-{lineno}"))
        if qid in seen:
            raise DataError(f"{where}: id {qid!r} already used on line {seen[qid]}")
        seen[qid] = lineno
        questions.append(Question(qid, question, gold))
        if max_questions is not None and len(questions) >= max_questions:
            break
    if not questions:
        raise DataError(f"{source}: no questions")
    return questions


# ------------------------------------------------------------------ running


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Every setting of an evaluation; `free` ones (batch size, question count, mesh,
    progress) may change when a run resumes, the others shape its outputs."""

    model: str | None = setting(
        None, "Hugging Face model folder to evaluate.", metavar="DIR", required=True
    )
    data: str | None = setting(
        None, "JSONL file of questions with gold answers.", metavar="FILE", required=True
    )
    out: str | None = setting(None, "Output folder (resumable).", metavar="DIR", free=True)
    lora: str | None = setting(
        None, "`w2s train` checkpoint (run folder or step folder) applied to --model."
    )
    preset: str = setting(
        "gsm8k",
        "Dataset shape: gsm8k (question, answer '... #### N'), math (problem, solution with "
        "\\boxed{}), svamp (Body + Question, Answer), asdiv (body + question, answer "
        "'9 (apples)'), plain (question, answer as is).",
        choices=tuple(sorted(PRESETS)),
    )
    question_fields: tuple[str, ...] | None = setting(
        None,
        "Field(s) holding the question; several comma-separated fields are joined.",
        flags=("--question-field",),
        parse=comma_list,
    )
    answer_field: str | None = setting(None, "Field holding the gold answer.")
    id_field: str | None = setting(None, "Field holding the question id (default: line number).")
    prompt_style: str = setting("chat", "chat template or plain text.", choices=PROMPT_STYLES)
    system_prompt: str = setting(
        EVAL_SYSTEM_PROMPT, "System turn of the chat prompt ('' for none)."
    )
    max_new_tokens: int = setting(512, "Most new tokens per answer.", check=at_least(1))
    dtype: str = compute_dtype_setting()
    eos_ids: tuple[int, ...] = stop_ids_setting("an answer")
    batch_size: int = setting(16, "Questions per batch.", check=at_least(1), free=True)
    max_questions: int | None = setting(
        None, "Evaluate only the first N questions.", parse=int, check=at_least(1), free=True
    )
    mesh: str | None = setting(None, "Device mesh, e.g. 'data=8' or 'data=2,tensor=4'.", free=True)
    symbolic_timeout: float = setting(
        SYMBOLIC_TIMEOUT_S,
        "Seconds allowed per symbolic (math-verify) comparison; past it, graded wrong.",
        free=True,
    )
    progress: bool = setting(True, "Hide the progress bar.", flags=("--no-progress",), free=True)
    force: bool = setting(
        False, "Apply --lora even to a base other than the one it was trained on.", free=True
    )
    allow_unused_weights: bool = allow_unused_weights_setting()

    def __post_init__(self):
        object.__setattr__(self, "eos_ids", tuple(sorted(int(i) for i in self.eos_ids)))
        if self.question_fields is not None:
            object.__setattr__(self, "question_fields", comma_list(self.question_fields))
        check(self)


def _fingerprint(settings: EvalSettings, tokenizer) -> dict:
    from w2s_jax.checkpointing import locate_checkpoint, read_meta
    from w2s_jax.fingerprint import folder_fingerprint_record, weights_fingerprint_record

    free = free_fields(EvalSettings)
    record = {k: v for k, v in settings_record(settings).items() if k not in free}
    record["prompt_example"] = prompt_example(
        tokenizer, style=settings.prompt_style, system_prompt=settings.system_prompt
    )
    hashed = weights_fingerprint_record(settings.model)
    record["model_weights"] = hashed["fingerprint"]
    record["model_weights_hashed"] = hashed
    if settings.lora:  # every byte of the checkpoint step evaluated
        record["lora_step"] = read_meta(settings.lora).get("step")
        directory, step = locate_checkpoint(settings.lora)
        record["lora_weights"] = folder_fingerprint_record(directory / str(step))["fingerprint"]
    return record


def _check_same_run(out: Path, fingerprint: dict) -> None:
    # prompt_example is for readers (it follows from the settings and the tokenizer), and
    # a folder made before it was recorded must still resume.
    ignore = ("model_weights_hashed", "prompt_example")
    has_results = any((out / "shards").glob("part-*.jsonl"))
    claim(out / "run.json", fingerprint, ignore=ignore, what="an eval run", has_results=has_results)


def _finished_rows(out: Path, questions: list[Question]) -> tuple[dict[str, dict], int]:
    """Rows already written (by id) and the next free shard number; checks they match."""
    by_id = {q.id: q for q in questions}
    rows, next_shard = {}, 0
    for shard in sorted((out / "shards").glob("part-*.jsonl")):
        next_shard = max(next_shard, int(shard.stem.split("-")[1]) + 1)
        for lineno, row in read_jsonl(shard):
            q = by_id.get(row["id"])
            if q is not None and (q.question, q.answer) != (row["question"], row["gold"]):
                raise DataError(
                    f"{shard}:{lineno}: question {row['id']!r} differs from the data file; "
                    "the data changed since this run started: use a new --out folder"
                )
            rows[row["id"]] = row
    return rows, next_shard


def _truncate(text: str, stops: tuple[str, ...]) -> str:
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _load_model(settings: EvalSettings, mesh_spec: str | None):
    """(model, tokenizer), padded vocabulary rows masked. A LoRA checkpoint is merged into
    float32 weights; in a half-precision dtype its adapters stay separate layers, since
    rounding the merged weights would lose most of a small update."""
    from w2s_jax.models import ModelConfig, load_pretrained, load_tokenizer
    from w2s_jax.models.dtypes import warn_if_slow
    from w2s_jax.sharding import make_mesh

    folder = Path(settings.model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    ModelConfig.from_hf_json(folder)  # a bad config.json is reported before anything loads
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{folder}: cannot load its tokenizer ({exc})") from exc
    if settings.lora:
        from w2s_jax.lora import check_adapter_base

        check_adapter_base(settings.lora, folder, force=settings.force)
    model = load_pretrained(
        folder,
        dtype=settings.dtype,
        mesh=make_mesh(mesh_spec) if mesh_spec else None,
        allow_unused=settings.allow_unused_weights,
    )
    warn_if_slow(model.config.dtype)
    model.restrict_vocab(len(tokenizer))
    if settings.lora:
        from w2s_jax.lora import load_lora_into, merge_lora

        load_lora_into(model, settings.lora)
        if model.config.dtype == "float32":
            merge_lora(model)
    return model, tokenizer


def summarize(rows: list[dict]) -> dict:
    """Accuracy (with a 95% Wilson interval), counts, mean output length, no-answer share."""
    total = len(rows)
    correct = sum(r["correct"] for r in rows)
    no_answer = sum(r["answer"] is None for r in rows)
    low, high = stats.wilson_interval(correct, total)
    return {
        "accuracy": correct / total,
        "accuracy_text": f"{100 * correct / total:.1f}% ({correct}/{total})",
        "accuracy_ci95": [low, high],
        "correct": correct,
        "total": total,
        "no_answer": no_answer,
        "no_answer_share": no_answer / total,
        "mean_output_tokens": sum(r["num_tokens"] for r in rows) / total,
        "hit_max_new_tokens": sum(r["hit_max_new_tokens"] for r in rows),
        "graded_by": dict(sorted(Counter(r["graded_by"] for r in rows).items())),
    }


def _graded_row(q: Question, generated: list[int], tokenizer, eos, stops, settings) -> dict:
    """One predictions.jsonl row: the decoded output, its extracted answer and its grade."""
    output = _truncate(tokenizer.decode(generated, skip_special_tokens=True), stops)
    answer = extract_answer(output)
    verdict = grade(answer, q.answer, timeout=settings.symbolic_timeout)
    return {
        "id": q.id,
        "question": q.question,
        "output": output,
        "answer": answer,
        "gold": q.answer,
        "correct": verdict.correct,
        "graded_by": verdict.how,
        "num_tokens": len(generated),
        "hit_max_new_tokens": len(generated) == settings.max_new_tokens
        and generated[-1] not in eos,
    }


def run_eval(settings: EvalSettings) -> dict:
    """Evaluate `settings.model` on `settings.data` into `settings.out`; return the summary.

    Resumes from the shards already there. Batches are fixed chunks of the questions
    sorted by prompt length (longest first), so a resumed run decodes the same batches
    as an uninterrupted one.
    """
    from tqdm import tqdm

    from w2s_jax.generate import generate
    from w2s_jax.models.dtypes import resolve_dtype

    if not settings.out:
        raise ValueError("--out is required")
    settings = dataclasses.replace(settings, dtype=resolve_dtype(settings.dtype))
    out = Path(settings.out)
    questions = load_eval_questions(
        settings.data,
        preset=settings.preset,
        question_fields=settings.question_fields,
        answer_field=settings.answer_field,
        id_field=settings.id_field,
        max_questions=settings.max_questions,
    )
    model, tokenizer = _load_model(settings, settings.mesh)
    _check_same_run(out, _fingerprint(settings, tokenizer))
    done, next_shard = _finished_rows(out, questions)
    eos = stop_ids(tokenizer, settings.model, model.config.eos_token_ids, settings.eos_ids)
    stops = PLAIN_STOP_STRINGS if settings.prompt_style == "plain" else ()
    pending = [q for q in questions if q.id not in done]
    prompts = {
        q.id: prompt_ids(
            tokenizer, q.question, style=settings.prompt_style, system_prompt=settings.system_prompt
        )
        for q in pending
    }
    order = sorted(range(len(pending)), key=lambda i: (-len(prompts[pending[i].id]), i))
    size = settings.batch_size
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    bar = tqdm(
        total=len(questions),
        initial=len(questions) - len(pending),
        desc="eval",
        disable=not settings.progress,
    )
    for shard, batch in enumerate(batches, start=next_shard):
        batch_q = [pending[i] for i in batch]
        result = generate(
            model,
            [prompts[q.id] for q in batch_q],
            max_new_tokens=settings.max_new_tokens,
            eos_ids=eos,
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
        )
        result.check_finite([f"question {q.id!r}" for q in batch_q], what=settings.model)
        rows = [
            _graded_row(q, [int(t) for t in tokens[: int(length)]], tokenizer, eos, stops, settings)
            for q, tokens, length in zip(batch_q, result.tokens, result.lengths, strict=True)
        ]
        atomic_write_jsonl(out / "shards" / f"part-{shard:06d}.jsonl", rows)
        done.update((r["id"], r) for r in rows)
        bar.update(len(rows))
        bar.set_postfix(acc=f"{sum(r['correct'] for r in done.values()) / len(done):.3f}")
    bar.close()
    rows = [done[q.id] for q in questions]
    summary = summarize(rows) | {"settings": json.loads((out / "run.json").read_text())}
    atomic_write_jsonl(out / "predictions.jsonl", rows)
    atomic_write_json(out / "summary.json", summary)
    return summary
