"""`w2s weak-to-strong-gen`: weak-to-strong generalization for reasoning (generative).

For each seed, on labelled train questions (worked solutions ending "#### N") and one
test split:

1. split: two disjoint seeded halves of the train questions (`split.json`);
2. weak: LoRA SFT of the weak model on half 1's ground-truth worked solutions, exported;
3. weak solutions: the weak model's greedy solution to every half-2 question, or k
   sampled ones and the majority answer (`weak-solutions/`, a `w2s eval` run); with
   `--filter agreement` a question is kept when at least `--min-agreement` of its k
   samples give the majority answer, with `--filter logprob` when the solution's mean
   token log-prob under the weak model (`w2s score`) is at least `--min-logprob`;
   `weak_targets.jsonl` holds every question's solution, scores and whether it is kept;
4. strong: LoRA SFT of the strong model on the kept weak solutions (w2s) and on half 2's
   ground truth (ceiling), the same steps;
5. eval: weak, strong base, w2s and ceiling greedily on the test split (`w2s eval`).

PGR = (acc_w2s − acc_weak) / (acc_ceiling − acc_weak) with a bootstrap CI over test
items (`w2s_jax.w2s_metrics`). Every sub-stage is skipped when its output exists; the
inputs are checked before the run folder is claimed. report.json/.md/.png go to --out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from w2s_jax.files import DataError, atomic_write_json, atomic_write_jsonl, read_jsonl
from w2s_jax.stages.w2s_gen_settings import GenerativeW2SSettings
from w2s_jax.stages.w2s_settings import TOY_WORLD
from w2s_jax.w2s_metrics import split_halves

RUN_FILE = "w2s_gen_config.json"
LABELS = {
    "weak": "weak (SFT on half 1's ground truth)",
    "ceiling": "strong ceiling (SFT on half 2's ground truth)",
    "w2s-sft": "strong on the weak solutions (w2s)",
    "strong-base": "strong base (no SFT)",
}


# --------------------------------------------------------------------- data


def solution_and_gold(answer: str) -> tuple[str, str]:
    """(worked solution, gold) of an answer ending "#### N"; a solution without a \\boxed{}
    answer gets "The answer is \\boxed{N}." appended (what `w2s eval`'s prompt asks for)."""
    from w2s_jax.grading import last_boxed

    solution, gold = (part.strip() for part in answer.rsplit("####", 1))
    if last_boxed(solution) is None:
        solution = f"{solution}\nThe answer is \\boxed{{{gold}}}.".lstrip()
    return solution, gold


def _read_questions(path: str) -> list[dict]:
    """{id, question, answer} records of a JSONL file; DataError naming the line."""
    records, seen = [], set()
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise DataError(f"{where}: needs string fields question and answer")
        if "####" not in row["answer"] or not row["answer"].rsplit("####", 1)[1].strip():
            raise DataError(f'{where}: answer must be a worked solution ending "#### N"')
        if row.get("id") is None or str(row["id"]) in seen:
            raise DataError(f"{where}: missing or repeated id")
        seen.add(str(row["id"]))
        records.append({"id": str(row["id"]), "question": row["question"], "answer": row["answer"]})
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_questions(settings: GenerativeW2SSettings) -> tuple[list[dict], list[dict]]:
    """(train records, test records): the files given, or the toy world's problems."""
    from w2s_jax.data.arithmetic import generate_split
    from w2s_jax.demo_worlds import toy_task

    if settings.data:
        train, test = _read_questions(settings.data), _read_questions(settings.test_data)
        shared = {r["id"] for r in train} & {r["id"] for r in test}
        if shared:
            raise DataError(f"{settings.test_data}: ids also in --data, e.g. {min(shared)!r}")
        if len(train) < 4:
            raise DataError(f"{settings.data}: at least 4 records are needed for two halves")
        return train, test
    task = toy_task(TOY_WORLD / "expert")
    return tuple(
        [p.record() for p in generate_split(split, n, seed=0, config=task)]
        for split, n in (
            ("train", settings.train_questions),
            (settings.toy_eval_split, settings.test_questions),
        )
    )


def sft_rows(tokenizer, examples, settings: GenerativeW2SSettings) -> list[dict]:
    """`w2s train --objective sft` records of (id, question, solution) examples: the
    prompt `w2s eval` uses, then the solution's ids and the end-of-turn id."""
    from w2s_jax.prompts import end_of_turn_id, prompt_ids

    end = end_of_turn_id(tokenizer)
    style, system = settings.prompt_style, settings.prompt
    return [
        {
            "id": id_,
            "prompt_ids": prompt_ids(tokenizer, question, style=style, system_prompt=system),
            "completion_ids": [*tokenizer(solution, add_special_tokens=False)["input_ids"], end],
        }
        for id_, question, solution in examples
    ]


def _write_sft_data(folder: Path, tokenizer, examples, settings) -> Path:
    path = folder / "samples" / "part-000000.jsonl"
    if not path.is_file():
        atomic_write_jsonl(path, sft_rows(tokenizer, examples, settings))
    return folder


# --------------------------------------------------------------------- weak targets


def weak_targets(groups: list[list[dict]], *, same=None) -> list[dict]:
    """Per question (its `w2s eval` rows in sample order): the chosen solution (the first of
    the majority answer's group; the only one when greedy; cut before a "####" line, as
    the ground truth is) and its agreement, the share of samples giving that answer (0
    when no sample gives an answer)."""
    from w2s_jax.eval_sampled import majority_vote
    from w2s_jax.grading import SYMBOLIC_TIMEOUT_S, same_answer

    same = same or (lambda a, b: same_answer(a, b, timeout=SYMBOLIC_TIMEOUT_S))
    targets = []
    for rows in groups:
        answers = [r["answer"] for r in rows]
        chosen = majority_vote(answers, same=same)
        pick = rows[chosen if chosen is not None else 0]
        votes = (
            0 if chosen is None else sum(a is not None and same(a, pick["answer"]) for a in answers)
        )
        targets.append(
            {
                "id": pick["id"],
                "solution": pick["output"].split("####", 1)[0].rstrip(),
                "output": pick["output"],
                "answer": pick["answer"],
                "correct": bool(pick["correct"]) and chosen is not None,
                "agreement": votes / len(rows),
            }
        )
    return targets


def filter_targets(
    targets: list[dict], kind: str, *, min_agreement: float = 0.0, min_logprob: float = 0.0
) -> tuple[list[dict], dict]:
    """(targets with `kept` set, counts): a solution without an answer is never kept;
    `kind` agreement / logprob keeps those at or above the threshold, none all others."""
    out, counts = [], {"questions": len(targets), "no_answer": 0, "below_threshold": 0}
    for target in targets:
        if target["answer"] is None:
            counts["no_answer"] += 1
            kept = False
        elif kind == "agreement":
            kept = target["agreement"] >= min_agreement
        elif kind == "logprob":
            kept = target["logprob"] >= min_logprob
        else:
            kept = True
        counts["below_threshold"] += target["answer"] is not None and not kept
        out.append(target | {"kept": kept})
    counts["kept"] = sum(t["kept"] for t in out)
    counts["kept_correct"] = sum(t["kept"] and t["correct"] for t in out)
    return out, counts


# --------------------------------------------------------------------- one run


@dataclasses.dataclass
class _Run:
    """What every stage of one invocation shares."""

    settings: GenerativeW2SSettings
    out: Path
    train: dict  # id -> record
    test_file: Path
    tokenizers: dict  # "weak" / "strong" -> tokenizer
    log: object


def _evaluate(run: _Run, model: Path, data: Path, out: Path, *, samples=1, seed=0) -> dict:
    """A `w2s eval` run (greedy, or `samples` draws per question), skipped when done."""
    from w2s_jax.stages.finetune import evaluate_once

    s = run.settings
    return evaluate_once(
        out,
        model=str(model),
        data=str(data),
        prompt_style=s.prompt_style,
        system_prompt=s.prompt,
        max_new_tokens=s.max_new_tokens,
        samples=samples,
        temperature=s.temperature if samples > 1 else None,
        seed=seed,
        dtype=s.dtype,
        batch_size=s.batch_size,
        progress=s.progress,
    )


def _sft_model(run: _Run, base: Path, data: Path, seed_dir: Path, name: str, seed: int) -> Path:
    """`base` after LoRA SFT on `data`, merged into seed_dir/model/<name> (each skipped
    when done); the training time goes to train/<name>/timing.json."""
    from w2s_jax.stages.finetune import export_once
    from w2s_jax.train import train
    from w2s_jax.train_config import TrainSettings

    s, folder, model = run.settings, seed_dir / "train" / name, seed_dir / "model" / name
    if not (folder / "timing.json").is_file():
        started = time.perf_counter()
        options = ("lora_rank", "lora_alpha", "lora_targets", "learning_rate", "steps")
        options += ("batch_positions", "length_bucket", "progress")
        train(
            TrainSettings(
                samples=str(data),
                out=str(folder),
                expert=str(base),
                objective="sft",
                grad_accum=1,
                dtype=s.dtype,
                seed=seed,
                save_every=s.steps,
                log_every=max(1, s.steps // 10),
                **{k: getattr(s, k) for k in options},
            )
        )
        elapsed = time.perf_counter() - started
        atomic_write_json(folder / "timing.json", {"seconds": elapsed, "steps": s.steps})
    return export_once(folder, model, base)


def _logprobs(run: _Run, weak_model: Path, seed_dir: Path, targets: list[dict]) -> dict:
    """{id: mean token log-prob} of the chosen solutions as the weak model wrote them (not
    cut before "####"), with an end-of-turn token: −mean_loss of a `w2s score` run."""
    from w2s_jax.data.kd_selection import score_files
    from w2s_jax.stages.score import ScoreSettings, score

    examples = [
        (t["id"], run.train[t["id"]]["question"], t["output"])
        for t in targets
        if t["answer"] is not None
    ]
    if not examples:
        return {}
    data = _write_sft_data(
        seed_dir / "data" / "weak-chosen", run.tokenizers["weak"], examples, run.settings
    )
    out = seed_dir / "weak-scores"
    if not (out / "summary.json").is_file():
        s = run.settings
        score(
            ScoreSettings(
                model=str(weak_model),
                data=str(data),
                out=str(out),
                dtype=s.dtype,
                progress=s.progress,
            )
        )
    return {r["id"]: -r["mean_loss"] for f in score_files(out) for _, r in read_jsonl(f)}


def _weak_side(run: _Run, seed_dir: Path, seed: int, half1, half2) -> tuple[Path, list[dict]]:
    """The weak model (SFT on half 1) and its targets for half 2 (`weak_targets.jsonl`)."""
    from w2s_jax.evaluate import rows_by_question

    s, path = run.settings, seed_dir / "weak_targets.jsonl"
    truth = [
        (i, run.train[i]["question"], solution_and_gold(run.train[i]["answer"])[0]) for i in half1
    ]
    data = _write_sft_data(seed_dir / "data" / "weak", run.tokenizers["weak"], truth, s)
    run.log(f"[seed {seed}] weak: LoRA SFT on half 1 ({len(half1)} solutions)")
    weak = _sft_model(run, s.weak_dir, data, seed_dir, "weak", seed)
    if not path.is_file():
        questions = seed_dir / "half2.jsonl"
        if not questions.is_file():
            atomic_write_jsonl(questions, (run.train[i] for i in half2))
        run.log(f"[seed {seed}] weak solutions for half 2 ({len(half2)} x {s.samples})")
        _evaluate(run, weak, questions, seed_dir / "weak-solutions", samples=s.samples, seed=seed)
        rows = [r for _, r in read_jsonl(seed_dir / "weak-solutions" / "predictions.jsonl")]
        targets = weak_targets(rows_by_question(rows))
        if s.filter == "logprob":
            logprobs = _logprobs(run, weak, seed_dir, targets)
            targets = [t | {"logprob": logprobs.get(t["id"])} for t in targets]
        targets, _ = filter_targets(
            targets, s.filter, min_agreement=s.min_agreement, min_logprob=s.min_logprob
        )
        atomic_write_jsonl(path, targets)
    return weak, [r for _, r in read_jsonl(path)]


def _scored(run: _Run, folder: Path, model: Path | None, seconds=None) -> dict:
    """Per-test-item correctness of `model` (evaluated into `folder` when not yet there)."""
    if model is not None:
        _evaluate(run, model, run.test_file, folder)
    rows = [r for _, r in read_jsonl(folder / "predictions.jsonl")]
    return {"correct": [bool(r["correct"]) for r in rows], "train": seconds}


def _run_seed(run: _Run, seed: int, base_eval: Path) -> dict:
    """Every sub-stage of one seed; returns {"models": {name: scores}, "targets": counts}."""
    s, seed_dir = run.settings, run.out / f"seed-{seed}"
    split = seed_dir / "split.json"
    if not split.is_file():
        half1, half2 = split_halves(sorted(run.train), seed)
        atomic_write_json(split, {"seed": seed, "half1": half1, "half2": half2}, indent=None)
    halves = json.loads(split.read_text())
    half1, half2 = halves["half1"], halves["half2"]
    weak, targets = _weak_side(run, seed_dir, seed, half1, half2)
    _, counts = filter_targets(
        targets, s.filter, min_agreement=s.min_agreement, min_logprob=s.min_logprob
    )
    run.log(f"[seed {seed}] weak solutions kept: {counts}")
    question = {i: run.train[i]["question"] for i in half2}
    arms = {
        "w2s-sft": [(t["id"], question[t["id"]], t["solution"]) for t in targets if t["kept"]],
        "ceiling": [(i, question[i], solution_and_gold(run.train[i]["answer"])[0]) for i in half2],
    }
    models = {
        "weak": _scored(run, seed_dir / "eval" / "weak", weak, _timing(seed_dir, "weak")),
        "strong-base": _scored(run, base_eval, None),
    }
    for name, examples in arms.items():
        if not examples:
            run.log(f"[seed {seed}] {name}: no solution kept, the strong base is scored")
            models[name] = models["strong-base"]
            continue
        data = _write_sft_data(seed_dir / "data" / name, run.tokenizers["strong"], examples, s)
        run.log(f"[seed {seed}] {name}: LoRA SFT of the strong model on {len(examples)}")
        model = _sft_model(run, s.strong_dir, data, seed_dir, name, seed)
        models[name] = _scored(run, seed_dir / "eval" / name, model, _timing(seed_dir, name))
        run.log(f"[seed {seed}] {name}: test accuracy {_accuracy(models[name]):.1%}")
    return {"models": models, "targets": counts}


def _timing(seed_dir: Path, name: str) -> dict:
    return json.loads((seed_dir / "train" / name / "timing.json").read_text())


def _accuracy(scores: dict) -> float:
    return sum(scores["correct"]) / len(scores["correct"])


# --------------------------------------------------------------------- report


def build_report(settings: GenerativeW2SSettings, seeds: list[dict], **sizes) -> dict:
    """Accuracies (Wilson CIs), PGR of w2s with its bootstrap CI, the kept weak solutions'
    counts and accuracy (`w2s_report`'s rows and table)."""
    import numpy as np

    from w2s_jax.w2s_report import format_table, model_row

    rows = [model_row(name, seeds) | {"label": label} for name, label in LABELS.items()]
    counts = [s["targets"] for s in seeds]
    right = [c["kept_correct"] / c["kept"] if c["kept"] else 0.0 for c in counts]
    report = {
        "settings": settings.settings(),
        "weak": str(settings.weak_dir),
        "strong": str(settings.strong_dir),
        "seeds": len(seeds),
        **sizes,
        "weak_targets": counts,
        "weak_label_accuracy": {
            "per_seed": right,
            "mean": float(np.mean(right)),
            "std": float(np.std(right, ddof=1)) if len(right) > 1 else 0.0,
        },
        "models": rows,
    }
    report["table"] = format_table(report)
    return report


def report_markdown(report: dict) -> str:
    s = report["settings"]
    kept = ", ".join(f"{c['kept']}/{c['questions']}" for c in report["weak_targets"])
    how = (
        "greedy"
        if s["samples"] == 1
        else f"majority of {s['samples']} samples (T {s['temperature']})"
    )
    return (
        "# w2s weak-to-strong-gen\n\n"
        f"weak {report['weak']}, strong {report['strong']}; {report['train_items']} train "
        f"questions in two halves per seed, {report['test_items']} test questions; "
        f"{report['seeds']} seed(s); LoRA SFT {s['steps']} steps x {s['batch_positions']} "
        f"tokens, lr {s['learning_rate']}; weak solutions: {how}, filter {s['filter']} "
        f"(min agreement {s['min_agreement']}, min log-prob {s['min_logprob']}); kept per "
        f"seed: {kept}.\n\n{report['table']}\n\n"
        '"weak labels": the kept weak solutions whose final answer is right. PGR = '
        "(acc_w2s − acc_weak) / (acc_ceiling − acc_weak) on the same test items, its CI "
        f"resamples test items. Wall time {report['wall_time_s']:.0f} s (this invocation).\n"
    )


# --------------------------------------------------------------------- the stage


def _check_model(folder: Path, example: dict, settings) -> object:
    """The model folder's tokenizer, after formatting one training record with it."""
    from w2s_jax.models import load_tokenizer

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    tokenizer = load_tokenizer(folder)
    try:
        sft_rows(tokenizer, [(example["id"], example["question"], "1")], settings)
    except ValueError as exc:
        raise ValueError(f"{folder}: {exc}") from None
    return tokenizer


def _digest(records: list[dict]) -> str:
    text = json.dumps(records, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def weak_to_strong_gen(settings: GenerativeW2SSettings, *, log=print) -> dict:
    """Run (or resume) a generative weak-to-strong experiment into `settings.out`."""
    from w2s_jax.files import atomic_write_text
    from w2s_jax.fingerprint import weights_fingerprint
    from w2s_jax.run_folder import claim
    from w2s_jax.w2s_report import save_chart

    started = time.perf_counter()
    out = Path(settings.out)
    train, test = load_questions(settings)
    folders = {"weak": settings.weak_dir, "strong": settings.strong_dir}
    tokenizers = {role: _check_model(f, train[0], settings) for role, f in folders.items()}
    document = {
        "settings": settings.settings(),
        "train_digest": _digest(train),
        "test_digest": _digest(test),
        **{f"{role}_weights": weights_fingerprint(f) for role, f in folders.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    has_results = (out / "eval").is_dir() or any(out.glob("seed-*"))
    claim(out / RUN_FILE, document, what="a generative weak-to-strong run", has_results=has_results)
    test_file = Path(settings.test_data) if settings.data else out / "test.jsonl"
    if not test_file.is_file():
        atomic_write_jsonl(test_file, test)
    run = _Run(settings, out, {r["id"]: r for r in train}, test_file, tokenizers, log)
    base_eval = out / "eval" / "strong-base"
    _evaluate(run, settings.strong_dir, test_file, base_eval)
    seeds = [_run_seed(run, seed, base_eval) for seed in range(settings.seeds)]
    report = build_report(settings, seeds, train_items=len(train), test_items=len(test))
    report["wall_time_s"] = time.perf_counter() - started
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    save_chart(report, out / "report.png")
    return report
