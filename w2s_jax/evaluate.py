"""Batched, resumable evaluation of a model on math word problems, and run comparison.

`run_eval` greedily decodes every question with `w2s_jax.generate.generate`,
grades the outputs with `w2s_jax.grading`, and writes into the output folder:

- `shards/part-NNNNNN.jsonl`: one file per finished batch, written atomically, so a
  killed run leaves only whole batches; a re-run skips every id already there;
- `predictions.jsonl`: all rows in dataset order (id, question, output, answer,
  gold, correct, ...), and `summary.json` (accuracy, counts, mean output length,
  share with no extractable answer, settings), written when the run finishes;
- `run.json`: the settings and the weights' fingerprint, checked on resume so one
  folder never mixes runs (`model_weights_hashed`, the files hashed, is not compared).

`compare_runs` lines up finished runs on the same questions: accuracies with
Wilson intervals, paired differences with a bootstrap CI and McNemar's test, and
a bar chart.
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
    atomic_save_figure,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
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
from w2s_jax.run_folder import claim
from w2s_jax.stop_tokens import stop_ids

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "PRESETS",
    "EvalSettings",
    "compare_runs",
    "extract_answer",
    "gold_from_gsm8k",
    "is_equiv",
    "load_eval_questions",
    "run_eval",
]

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
PLAIN_TEMPLATE = "Question: {question}\nAnswer: "
# A base model prompted "Question: ...\nAnswer: " goes on to invent the next
# question; its output is cut there before extraction.
PLAIN_STOP_STRINGS = ("\nQuestion:",)


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


# ------------------------------------------------------------------ prompts


def prompt_ids(tokenizer, question: str, *, style: str, system_prompt: str) -> list[int]:
    """Token ids of the prompt: the chat template (system + user turn) or the plain template."""
    if style == "plain":
        return list(tokenizer(PLAIN_TEMPLATE.format(question=question))["input_ids"])
    if style != "chat":
        raise ValueError(f"prompt style must be 'chat' or 'plain', got {style!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use --prompt-style plain")
    messages = [{"role": "user", "content": question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------ running


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Everything that determines a run's outputs (batch size and question count do not)."""

    model: str
    data: str
    lora: str | None = None
    preset: str = "gsm8k"
    question_fields: tuple[str, ...] | None = None
    answer_field: str | None = None
    id_field: str | None = None
    prompt_style: str = "chat"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_new_tokens: int = 512
    dtype: str | None = "auto"
    eos_ids: tuple[int, ...] = ()  # stop ids added to the tokenizer's and configs' own


def _fingerprint(settings: EvalSettings) -> dict:
    from w2s_jax.checkpointing import locate_checkpoint, read_meta
    from w2s_jax.fingerprint import folder_fingerprint_record, weights_fingerprint_record

    record = dataclasses.asdict(settings)
    record["question_fields"] = list(settings.question_fields or [])
    record["eos_ids"] = sorted(settings.eos_ids)
    hashed = weights_fingerprint_record(settings.model)
    record["model_weights"] = hashed["fingerprint"]
    record["model_weights_hashed"] = hashed
    if settings.lora:  # every byte of the checkpoint step evaluated
        record["lora_step"] = read_meta(settings.lora).get("step")
        directory, step = locate_checkpoint(settings.lora)
        record["lora_weights"] = folder_fingerprint_record(directory / str(step))["fingerprint"]
    return record


def _check_same_run(out: Path, fingerprint: dict) -> None:
    claim(out / "run.json", fingerprint, ignore=("model_weights_hashed",), what="an eval run")


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
    model = load_pretrained(
        folder, dtype=settings.dtype, mesh=make_mesh(mesh_spec) if mesh_spec else None
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


def run_eval(
    settings: EvalSettings,
    out: str | Path,
    *,
    batch_size: int = 16,
    max_questions: int | None = None,
    mesh: str | None = None,
    symbolic_timeout: float = SYMBOLIC_TIMEOUT_S,
    progress: bool = True,
) -> dict:
    """Evaluate `settings.model` on `settings.data` into folder `out`; return the summary.

    Resumes from the shards already in `out`. Batches are fixed chunks of the
    questions sorted by prompt length (longest first), so a resumed run decodes
    the same batches as an uninterrupted one.
    """
    from tqdm import tqdm

    from w2s_jax.generate import generate
    from w2s_jax.models.dtypes import resolve_dtype

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    settings = dataclasses.replace(settings, dtype=resolve_dtype(settings.dtype))
    out = Path(out)
    questions = load_eval_questions(
        settings.data,
        preset=settings.preset,
        question_fields=settings.question_fields,
        answer_field=settings.answer_field,
        id_field=settings.id_field,
        max_questions=max_questions,
    )
    model, tokenizer = _load_model(settings, mesh)
    _check_same_run(out, _fingerprint(settings))
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
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(
        total=len(questions),
        initial=len(questions) - len(pending),
        desc="eval",
        disable=not progress,
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
        rows = []
        for q, tokens, length in zip(batch_q, result.tokens, result.lengths, strict=True):
            generated = [int(t) for t in tokens[: int(length)]]
            output = _truncate(tokenizer.decode(generated, skip_special_tokens=True), stops)
            answer = extract_answer(output)
            verdict = grade(answer, q.answer, timeout=symbolic_timeout)
            rows.append(
                {
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
            )
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


# ---------------------------------------------------------------- comparing


def _load_finished_run(run: str | Path) -> tuple[dict, dict[str, dict]]:
    run = Path(run)
    summary_path, predictions = run / "summary.json", run / "predictions.jsonl"
    if not (summary_path.is_file() and predictions.is_file()):
        raise FileNotFoundError(
            f"{run} is not a finished eval run (needs summary.json and predictions.jsonl); "
            "run or resume `w2s eval` into it first"
        )
    return json.loads(summary_path.read_text()), {r["id"]: r for _, r in read_jsonl(predictions)}


def _save_bar_chart(labels: list[str], rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.6 + 1.3 * len(labels), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    acc = [100 * r["accuracy"] for r in rows]
    err = [
        [a - 100 * r["accuracy_ci95"][0] for a, r in zip(acc, rows, strict=True)],
        [100 * r["accuracy_ci95"][1] - a for a, r in zip(acc, rows, strict=True)],
    ]
    ax.bar(labels, acc, yerr=err, capsize=4, color="tab:blue")
    for i, r in enumerate(rows):
        ax.annotate(
            r["accuracy_text"],
            (i, acc[i]),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_ylabel("accuracy (%), 95% Wilson CI")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)


def compare_runs(
    runs: list[str | Path],
    out: str | Path,
    *,
    labels: list[str] | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """Compare finished runs on the same questions; every run is paired with the first.

    Writes compare.json, compare.md (the table, also returned under "table") and
    compare.png (accuracies with 95% Wilson intervals) into `out`.
    """
    if len(runs) < 2:
        raise ValueError("--compare needs at least two run folders")
    labels = list(labels) if labels else [Path(r).resolve().name for r in runs]
    if len(labels) != len(runs) or len(set(labels)) != len(labels):
        labels = [str(r) for r in runs]
    loaded = [_load_finished_run(r) for r in runs]
    base_rows = loaded[0][1]
    ids = list(base_rows)
    for run, (_, rows) in zip(runs[1:], loaded[1:], strict=True):
        if rows.keys() != base_rows.keys():
            raise ValueError(
                f"{run} and {runs[0]} were run on different questions "
                f"({len(rows.keys() - base_rows.keys())} ids only in the first, "
                f"{len(base_rows.keys() - rows.keys())} only in the second)"
            )
        differ = [i for i in ids if rows[i]["gold"] != base_rows[i]["gold"]]
        if differ:
            raise ValueError(
                f"{run} and {runs[0]} have different gold answers, e.g. id {differ[0]!r}"
            )
    correct = [[bool(rows[i]["correct"]) for i in ids] for _, rows in loaded]
    results = []
    for n, (label, run, (_, rows)) in enumerate(zip(labels, runs, loaded, strict=True)):
        summary = summarize([rows[i] for i in ids])
        entry = {"label": label, "run": str(run)} | {
            k: summary[k]
            for k in ("accuracy", "accuracy_text", "accuracy_ci95", "correct", "total")
        }
        if n > 0:
            boot = stats.paired_bootstrap_diff(
                correct[0], correct[n], n_resamples=n_resamples, seed=seed
            )
            test = stats.mcnemar(correct[0], correct[n])
            entry["vs_first"] = {
                "diff": boot.diff,
                "diff_ci95": [boot.low, boot.high],
                "only_first_correct": test.only_a,
                "only_this_correct": test.only_b,
                "mcnemar_p_exact": test.p_exact,
                "mcnemar_p_chi2": test.p_chi2,
            }
        results.append(entry)
    table = _table(results, labels[0])
    out = Path(out)
    report = {"questions": len(ids), "baseline": labels[0], "runs": results, "table": table}
    atomic_write_json(out / "compare.json", report)
    atomic_write_text(out / "compare.md", table + "\n")
    _save_bar_chart(labels, results, out / "compare.png")
    return report


def _table(results: list[dict], baseline: str) -> str:
    lines = [
        f"| run | accuracy | 95% CI | Δ vs {baseline} (pts) | 95% bootstrap CI | McNemar p |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        low, high = (100 * x for x in r["accuracy_ci95"])
        cells = [r["label"], r["accuracy_text"], f"[{low:.1f}, {high:.1f}]"]
        if "vs_first" in r:
            v = r["vs_first"]
            d_low, d_high = (100 * x for x in v["diff_ci95"])
            cells += [
                f"{100 * v['diff']:+.1f}",
                f"[{d_low:+.1f}, {d_high:+.1f}]",
                f"{v['mcnemar_p_exact']:.3g}",
            ]
        else:
            cells += ["—", "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
