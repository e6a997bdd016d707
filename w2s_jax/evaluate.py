"""The evaluation stage: batched, resumable grading of a model on math word problems.

`run_eval` decodes every question with `w2s_jax.generate.generate` (greedy by default;
sampled N times, or contrastive with an amateur: `w2s_jax.eval_decoding`) or with an
OpenAI-compatible server (`w2s_jax.eval_engine`), grades the outputs with
`w2s_jax.grading` (benchmark shapes: `w2s_jax.data.benchmarks`), and writes into the
output folder:

- `shards/part-NNNNNN.jsonl`: one file per finished batch, written atomically, so a
  killed run leaves only whole batches; a re-run skips every (id, sample) already there;
- `predictions.jsonl`: all rows in dataset order (id, question, output, answer,
  gold, correct, ...; `sample` in a sampled run), and `summary.json` (accuracy, counts,
  mean output length, share with no extractable answer, settings; pass@k and maj@N of a
  sampled run, `w2s_jax.eval_sampled`), written when the run finishes;
- `run.json`: the settings and the weights' fingerprint, checked on resume so one
  folder never mixes runs, and `prompt_example`, the prompt for the question
  "{question}" (`model_weights_hashed`, the files hashed, and `prompt_example` are not
  compared).

The settings are `EvalSettings` (`w2s_jax.eval_settings`, importable from here too);
`w2s_jax.compare` lines finished runs up against each other.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

from w2s_jax import eval_decoding, eval_engine, sharding, stats
from w2s_jax.data.benchmarks import PRESETS, is_multiple_choice, load_eval_questions
from w2s_jax.data.sources import Question
from w2s_jax.eval_sampled import summarize_samples
from w2s_jax.eval_settings import EvalSettings
from w2s_jax.files import (
    DataError,
    atomic_write_json,
    atomic_write_jsonl,
    read_jsonl,
)
from w2s_jax.grading import (
    SYMBOLIC_TIMEOUT_S,
    choice_letter,
    extract_answer,
    gold_from_gsm8k,
    grade_all,
    grade_choice,
    is_equiv,
)
from w2s_jax.prompts import PLAIN_STOP_STRINGS, encode_prompts, prompt_example, stop_ids
from w2s_jax.run_folder import claim
from w2s_jax.settings import free_fields
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


def _fingerprint(settings: EvalSettings, tokenizer) -> dict:
    from w2s_jax.checkpointing import locate_checkpoint, read_meta
    from w2s_jax.fingerprint import folder_fingerprint_record, weights_fingerprint_record

    free = free_fields(EvalSettings)
    record = {k: v for k, v in settings_record(settings).items() if k not in free}
    if settings.engine:  # recorded, not compared: a resumed run may use another server
        record |= {"endpoint": settings.endpoint, "engine_model": settings.engine_model}
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
    if settings.amateur:
        record["amateur_weights"] = weights_fingerprint_record(settings.amateur)["fingerprint"]
    return record


# Settings added with sampled and contrastive decoding, at the values that reproduce the
# runs made before them: a folder that does not record them resumes at these values.
_BEFORE_DECODING_SETTINGS = {"decoding": "greedy", "samples": 1, "temperature": 0.0, "seed": 0}


def _check_same_run(out: Path, fingerprint: dict) -> None:
    # prompt_example is for readers (it follows from the settings and the tokenizer), and
    # a folder made before it was recorded must still resume.
    ignore = ["model_weights_hashed", "prompt_example", "endpoint", "engine_model"]
    if (out / "run.json").is_file():
        recorded = json.loads((out / "run.json").read_text())
        ignore += [
            k
            for k, v in _BEFORE_DECODING_SETTINGS.items()
            if k not in recorded and fingerprint.get(k) == v
        ]
    has_results = any((out / "shards").glob("part-*.jsonl"))
    claim(
        out / "run.json",
        fingerprint,
        ignore=ignore,
        what="an eval run",
        has_results=has_results,
        write=sharding.is_leader(),
    )


def _finished_rows(out: Path, questions: list[Question]) -> tuple[dict[tuple[str, int], dict], int]:
    """Rows already written (by id and sample index) and the next free shard number;
    checks they match the questions."""
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
            rows[row["id"], row.get("sample", 0)] = row
    return rows, next_shard


def _truncate(text: str, stops: tuple[str, ...]) -> str:
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _load_model(settings: EvalSettings, mesh):
    """(model, tokenizer, config), padded vocabulary rows masked; no model with --engine.
    A LoRA checkpoint is merged into weights stored and computed in float32; otherwise its
    adapters stay separate layers, since rounding the merged weights would lose most of
    a small update."""
    from w2s_jax.models import ModelConfig, load_pretrained, load_tokenizer
    from w2s_jax.models.dtypes import warn_if_slow
    from w2s_jax.settings import model_options

    folder = Path(settings.model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    config = ModelConfig.from_hf_json(folder)  # a bad config.json is reported first
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{folder}: cannot load its tokenizer ({exc})") from exc
    if settings.engine:  # the server holds the weights
        return None, tokenizer, config
    if settings.lora:
        from w2s_jax.lora import check_adapter_base

        check_adapter_base(settings.lora, folder, force=settings.force)
    options = model_options(settings)
    model = load_pretrained(
        folder, mesh=mesh, allow_unused=settings.allow_unused_weights, **options
    )
    warn_if_slow(model.config.dtype)
    model.restrict_vocab(len(tokenizer))
    if settings.lora:
        from w2s_jax.lora import load_lora_into, merge_lora

        load_lora_into(model, settings.lora)
        if model.config.dtype == model.config.weights_dtype == "float32":
            merge_lora(model)
    return model, tokenizer, config


def summarize(rows: list[dict], *, timeout: float = SYMBOLIC_TIMEOUT_S) -> dict:
    """Accuracy (with a 95% Wilson interval), counts, mean output length, no-answer share.

    Rows with a `sample` index (a sampled run, `w2s_jax.eval_sampled`): accuracy is the
    mean over all samples, its interval clustered by question, and pass@k, maj@N follow.
    """
    total = len(rows)
    correct = sum(r["correct"] for r in rows)
    no_answer = sum(r["answer"] is None for r in rows)
    low, high = stats.wilson_interval(correct, total)
    summary = {
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
    if "sample" not in rows[0]:
        return summary
    sampled = summarize_samples(rows_by_question(rows), timeout=timeout)
    return summary | sampled | {"accuracy_ci95": sampled["mean_accuracy_ci95_clustered"]}


def rows_by_question(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped by question id (in first-seen order), each group in sample order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["id"], []).append(row)
    return [sorted(g, key=lambda r: r.get("sample", 0)) for g in groups.values()]


def _graded_rows(batch: list[tuple[Question, int]], completions: list[tuple], ctx: dict):
    """The predictions.jsonl rows of a batch from its (text, token count, hit the token
    limit) completions: outputs, extracted answers and their grades (by choice letter for
    a multiple-choice preset; symbolic checks side by side, `grading.grade_all`);
    `sample` only in a sampled run."""
    settings = ctx["settings"]
    outputs = [_truncate(text, ctx["stops"]) for text, _, _ in completions]
    answers = [extract_answer(output) for output in outputs]
    golds = [q.answer for q, _ in batch]
    if is_multiple_choice(settings.preset):
        answers = [choice_letter(answer) for answer in answers]
        verdicts = [grade_choice(a, g) for a, g in zip(answers, golds, strict=True)]
    else:
        pairs = list(zip(answers, golds, strict=True))
        verdicts = grade_all(pairs, timeout=settings.symbolic_timeout)
    sampled = eval_decoding.is_sampled(settings)
    return [
        {
            "id": q.id,
            **({"sample": j} if sampled else {}),
            "question": q.question,
            "output": output,
            "answer": answer,
            "gold": q.answer,
            "correct": verdict.correct,
            "graded_by": verdict.how,
            "num_tokens": count,
            "hit_max_new_tokens": hit,
        }
        for (q, j), output, answer, verdict, (_, count, hit) in zip(
            batch, outputs, answers, verdicts, completions, strict=True
        )
    ]


def _decode_batch(batch: list[tuple[Question, int]], ctx: dict) -> list[dict]:
    """Generate (in process or by `ctx["engine"]`) and grade one batch of (question,
    sample index) rows."""
    if ctx["engine"] is not None:
        return _graded_rows(batch, eval_engine.complete(ctx["engine"], batch, ctx), ctx)
    import jax

    from w2s_jax.generate import generate

    settings, tokenizer, eos = ctx["settings"], ctx["tokenizer"], ctx["eos"]
    sampled = eval_decoding.is_sampled(settings)
    result = generate(
        ctx["model"],
        [ctx["prompts"][q.id] for q, _ in batch],
        max_new_tokens=settings.max_new_tokens,
        eos_ids=eos,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
        mode=eval_decoding.mode_for(settings, [(q.id, j) for q, j in batch]),
        amateur=ctx["amateur"],
        rng=jax.random.key(settings.seed) if sampled else None,
    )
    result.check_finite([f"question {q.id!r}" for q, _ in batch], what=settings.model)
    decode, limit = tokenizer.decode, settings.max_new_tokens
    completions = []
    for tokens, length in zip(result.tokens, result.lengths, strict=True):
        ids = [int(t) for t in tokens[: int(length)]]
        hit = len(ids) == limit and ids[-1] not in eos
        completions.append((decode(ids, skip_special_tokens=True), len(ids), hit))
    return _graded_rows(batch, completions, ctx)


def _context(settings: EvalSettings, questions: list[Question]) -> dict:
    """Models (or engine), tokenizer, stop ids and strings of a run, its folder claimed."""
    from w2s_jax.sharding import make_mesh

    engine = eval_engine.connect(settings) if settings.engine else None  # before any write
    if engine:  # the model name it serves, recorded in run.json
        settings = dataclasses.replace(settings, engine_model=engine.model)
    mesh = make_mesh(settings.mesh) if settings.mesh else None
    model, tokenizer, config = _load_model(settings, mesh)
    amateur = eval_decoding.load_amateur(settings, tokenizer, mesh) if settings.amateur else None
    encoded = encode_prompts(
        tokenizer,
        questions,
        style=settings.prompt_style,
        system_prompt=settings.system_prompt,
        context=config.max_position_embeddings,
    )
    prompts = {q.id: ids for q, ids in zip(questions, encoded, strict=True)}
    eos = stop_ids(tokenizer, settings.model, config.eos_token_ids, settings.eos_ids)
    _check_same_run(Path(settings.out), _fingerprint(settings, tokenizer))
    stops = PLAIN_STOP_STRINGS if settings.prompt_style == "plain" else ()
    return dict(
        settings=settings,
        model=model,
        engine=engine,
        amateur=amateur,
        tokenizer=tokenizer,
        eos=eos,
        stops=stops,
        prompts=prompts,
    )


def run_eval(settings: EvalSettings) -> dict:
    """Evaluate `settings.model` on `settings.data` into `settings.out`; return the summary.

    Resumes from the shards already there, per (question, sample). Batches are fixed
    chunks of the rows sorted by prompt length (longest first), so a resumed run decodes
    the same batches as an uninterrupted one; a sampled row's draws depend on the seed,
    its question and its sample index only (`w2s_jax.eval_decoding`). Under multi-host
    JAX every process decodes the same batches and process 0 alone writes.
    """
    from tqdm import tqdm

    from w2s_jax.models.dtypes import resolve_dtypes

    if not settings.out:
        raise ValueError("--out is required")
    settings = resolve_dtypes(settings)
    out = Path(settings.out)
    questions = load_eval_questions(
        settings.data,
        preset=settings.preset,
        question_fields=settings.question_fields,
        answer_field=settings.answer_field,
        id_field=settings.id_field,
        max_questions=settings.max_questions,
    )
    ctx = _context(settings, questions)
    done, next_shard = _finished_rows(out, questions)
    sharding.barrier("eval-resume-read")  # every process has read before process 0 writes
    leader = sharding.is_leader()
    items = [(q, j) for q in questions for j in range(settings.samples)]
    pending = [(q, j) for q, j in items if (q.id, j) not in done]
    order = sorted(pending, key=lambda item: -len(ctx["prompts"][item[0].id]))  # stable
    size = settings.batch_size
    bar = tqdm(
        total=len(items),
        initial=len(items) - len(pending),
        desc="eval",
        disable=not settings.progress,
    )
    for shard, start in enumerate(range(0, len(order), size), start=next_shard):
        rows = _decode_batch(order[start : start + size], ctx)
        if leader:
            atomic_write_jsonl(out / "shards" / f"part-{shard:06d}.jsonl", rows)
        done.update(((r["id"], r.get("sample", 0)), r) for r in rows)
        bar.update(len(rows))
        bar.set_postfix(acc=f"{sum(r['correct'] for r in done.values()) / len(done):.3f}")
    bar.close()
    rows = [done[q.id, j] for q, j in items]
    summary = summarize(rows, timeout=settings.symbolic_timeout)
    summary |= {"settings": json.loads((out / "run.json").read_text())}
    if leader:
        atomic_write_jsonl(out / "predictions.jsonl", rows)
        atomic_write_json(out / "summary.json", summary)
    return summary
