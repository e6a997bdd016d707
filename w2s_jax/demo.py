"""`w2s demo`: LightReasoner end to end, with baselines and ablations, in a toy or real-LM world.

For each seed, on unlabeled train questions of the toy world:

1. sample: one greedy rollout of the shipped expert per question, scored against
   the shipped amateur at every position (`w2s sample --no-select`: KL and the
   contrastive target everywhere);
2. data for each arm, from those same rollouts:
   - lightreasoner: positions with KL > β, contrastive targets (what `w2s sample`
     writes by default; selection does not change the targets);
   - no_select: every position, contrastive targets (ablation);
   - no_contrast: positions with KL > β, one-hot on the expert's own token (ablation,
     what `w2s sample --no-contrast` writes);
   - sft: rejection-sampled SFT, the rollouts whose final answer is right (this arm
     alone reads the ground truth), every completion token supervised;
3. train: LoRA on the expert with the same steps and positions per step for every arm;
4. export: merge into a Hugging Face folder;
5. eval: greedy accuracy on the same held-out test problems (the base expert once), and
   the base expert with contrastive decoding against the amateur (inference only: the
   same contrast at decode time instead of in the weights; once for all seeds).

The world (`--world`, see `w2s_jax.demo_worlds`) decides the models and the problems.

Stages run in this process through their Python APIs, so compiled functions are
reused. Every stage writes into `--out` and is skipped when its output is there,
so a re-run resumes. report.json, report.md and report.png are written atomically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from w2s_jax.demo_data import derive_arm_records, weak_sft_records, write_arm_data
from w2s_jax.demo_report import (
    INFERENCE_ARMS,
    arm_rows,
    correct_by_id,
    format_table,
    report_markdown,
    save_bar_chart,
)
from w2s_jax.demo_settings import DemoSettings
from w2s_jax.demo_worlds import Models, prepare_models, system_prompt, write_problems
from w2s_jax.files import atomic_write_json, atomic_write_text, read_jsonl
from w2s_jax.run_folder import claim
from w2s_jax.stages.sample_settings import SampleSettings


def _check_settings(out: Path, config: DemoSettings) -> None:
    has_results = (out / "eval").is_dir() or any(out.glob("seed-*"))
    claim(out / "demo_config.json", config.settings(), what="a demo run", has_results=has_results)


class _Timer:
    """Stage wall times of one seed folder, kept in times.json across resumed runs."""

    def __init__(self, path: Path):
        self.path = path
        self.times = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, key: str, seconds: float) -> None:
        self.times[key] = seconds
        atomic_write_json(self.path, self.times)


# --------------------------------------------------------------------- stages


def _sample(config: DemoSettings, expert: Path, amateur: Path, questions: Path, out: Path):
    """The sampling stage with --no-select on `questions` into `out` (every position scored)."""
    from w2s_jax.stages.sample import sample

    sample(
        SampleSettings(
            expert=str(expert),
            amateur=str(amateur),
            data=str(questions),
            out=str(out),
            system_prompt=system_prompt(config.world),
            alpha=config.alpha,
            beta=config.beta,
            top_k=config.top_k,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            dtype="float32",
            layer_stack=config.layer_stack,
            select=False,
        )
    )


def _train_export(
    config: DemoSettings, expert: Path, arm: str, data: Path, seed_dir: Path, seed: int, timer
):
    from w2s_jax.stages.finetune import export_once
    from w2s_jax.train import train
    from w2s_jax.train_config import TrainSettings

    run, model = seed_dir / "train" / arm, seed_dir / "model" / arm
    summary = run / "summary.json"
    if not (summary.is_file() and json.loads(summary.read_text())["steps"] == config.steps):
        start = time.perf_counter()
        train(
            TrainSettings(
                samples=str(data),
                out=str(run),
                expert=str(expert),
                # sft: next-token CE on every completion token; the records' one-hot targets
                # at every position are the same loss, so one objective serves all arms.
                objective="contrastive",
                lora_rank=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_targets=config.lora_targets,
                learning_rate=config.learning_rate,
                steps=config.steps,
                batch_positions=config.batch_positions,
                grad_accum=1,
                dtype="float32",
                layer_stack=config.layer_stack,
                remat=config.remat,
                loss_chunk_size=config.loss_chunk_size,
                length_bucket=config.length_bucket,
                seed=seed,
                save_every=config.steps,
                log_every=max(1, config.steps // 10),
                progress=config.progress,
            )
        )
        timer.record(f"train/{arm}", time.perf_counter() - start)
    if not (model / "config.json").is_file():
        start = time.perf_counter()
        export_once(run, model, expert)
        timer.record(f"export/{arm}", time.perf_counter() - start)
    return model


def _evaluate(config: DemoSettings, model: Path, data: Path, out: Path, **decoding) -> dict:
    from w2s_jax.stages.finetune import evaluate_once

    return evaluate_once(
        out,
        model=str(model),
        data=str(data),
        system_prompt=system_prompt(config.world),
        max_new_tokens=config.eval_max_new_tokens or config.max_new_tokens,
        dtype="float32",
        layer_stack=config.layer_stack,
        batch_size=config.batch_size,
        progress=config.progress,
        **decoding,
    )


def _run_seed(config: DemoSettings, models: Models, seed: int, out: Path, eval_sets, log) -> dict:
    """Every stage of one seed; returns {arm: {"eval": dir, "data": stats}} and times
    (with a held-out phrasing set, also "eval_held_out")."""
    from w2s_jax.models import load_tokenizer
    from w2s_jax.sample_store import read_manifest, read_samples

    seed_dir = out / f"seed-{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    timer = _Timer(seed_dir / "times.json")
    questions = seed_dir / "questions.jsonl"
    if not questions.is_file():  # unlabeled for every arm but sft; a new draw per seed
        write_problems(
            config.world,
            models.expert,
            questions,
            "train",
            config.questions,
            seed=1000 + seed,
            scale=config.scale,
        )
    golds = {r["id"]: r["answer"].rsplit("####", 1)[1].strip() for _, r in read_jsonl(questions)}
    sampled = _sampled(config, models, seed_dir, timer, log)
    records = list(read_samples(sampled))
    manifest = read_manifest(sampled)
    tokenizer = load_tokenizer(models.expert)
    arms, trained = {}, [arm for arm in config.arms[1:] if arm not in INFERENCE_ARMS]
    arms_started = time.perf_counter()
    for index, arm in enumerate(trained):
        log(
            f"[seed {seed}] {arm} ({index + 1}/{len(trained)}): train, export, eval; "
            + _elapsed_and_eta(arms_started, index, len(trained))
        )
        data = seed_dir / "data" / arm
        if not (data / "data_stats.json").is_file():
            arm_manifest = manifest | {
                "settings": manifest["settings"] | {"select": arm != "no_select"},
                "demo_arm": arm,
            }
            if arm == "weak_sft":
                solutions = _amateur_solutions(config, models, questions, seed_dir, timer)
                derived = weak_sft_records(records, solutions, tokenizer)
            elif arm == "lightreasoner_cross":  # rollouts scored by the other amateur
                cross = read_samples(_sampled(config, models, seed_dir, timer, log, cross=True))
                derived = derive_arm_records(
                    list(cross), "lightreasoner", config.beta, golds, tokenizer
                )
            else:
                derived = derive_arm_records(records, arm, config.beta, golds, tokenizer)
            write_arm_data(data, arm_manifest, derived)
        arms[arm] = _arm(config, models, arm, data, seed_dir, seed, eval_sets, timer, log)
    return {"arms": arms, "times": timer.times}


def _sampled(config, models: Models, seed_dir: Path, timer, log, *, cross: bool = False) -> Path:
    """The seed's every-position samples (once): against the world's amateur in `samples`,
    or with `cross` against the amateur of another tokenizer in `samples-cross`."""
    amateur, name, folder = (
        (models.cross_amateur, "sample-cross", "samples-cross")
        if cross
        else (models.amateur, "sample", "samples")
    )
    sampled = seed_dir / folder
    if not (sampled / "summary.json").is_file():
        start = time.perf_counter()
        _sample(config, models.expert, amateur, seed_dir / "questions.jsonl", sampled)
        timer.record(name, time.perf_counter() - start)
    seconds = timer.times.get(name, 0)
    log(f"[{seed_dir.name}] sampled {config.questions} questions vs {amateur} ({seconds:.0f} s)")
    return sampled


def _amateur_solutions(config, models: Models, questions: Path, seed_dir: Path, timer):
    """The amateur's greedy solutions to the seed's questions (a `w2s eval` run, whose
    grades are kept for the record only): the weak_sft arm's data."""
    out = seed_dir / "amateur-solutions"
    if not (out / "summary.json").is_file():
        start = time.perf_counter()
        _evaluate(config, models.amateur, questions, out)
        timer.record("amateur_solutions", time.perf_counter() - start)
    return [row for _, row in read_jsonl(out / "predictions.jsonl")]


def _arm(
    config, models: Models, arm: str, data: Path, seed_dir: Path, seed: int, eval_sets, timer, log
) -> dict:
    """Train, export and score one arm (on every eval set); its report entry."""
    data_stats = json.loads((data / "data_stats.json").read_text())
    entry = {"data": data_stats}
    if data_stats["supervised_tokens"] == 0:
        entry["note"] = "no supervised position: nothing to train, the base expert is scored"
        log(f"[seed {seed}] {arm}: {entry['note']}")
        return entry
    model = _train_export(config, models.expert, arm, data, seed_dir, seed, timer)
    scored = []
    for key, (folder, eval_data) in eval_sets.items():
        eval_dir = seed_dir / folder / arm
        start = time.perf_counter()
        if not (eval_dir / "summary.json").is_file():
            _evaluate(config, model, eval_data, eval_dir)
            timer.record(f"{folder}/{arm}", time.perf_counter() - start)
        entry[key] = str(eval_dir)
        scored.append(json.loads((eval_dir / "summary.json").read_text())["accuracy_text"])
    log(
        f"[seed {seed}] {arm}: {data_stats['supervised_tokens']} supervised tokens from "
        f"{data_stats['problems_used']} problems -> {' / held-out phrasing '.join(scored)}"
    )
    return entry


def _elapsed_and_eta(started: float, done: int, total: int) -> str:
    """ "12 s elapsed, ETA 30 s" from the mean time of the `done` arms so far."""
    elapsed = time.perf_counter() - started
    if not done:
        return f"{elapsed:.0f} s elapsed"
    return f"{elapsed:.0f} s elapsed, ETA {elapsed / done * (total - done):.0f} s"


# --------------------------------------------------------------------- report


def run_demo(config: DemoSettings, *, log=print) -> dict:
    """Run (or resume) the demo into `config.out`; returns the report (also written there)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, config)
    started = time.perf_counter()
    models = prepare_models(config, out, log)
    eval_sets = {"eval": ("eval", out / f"{config.split}.jsonl")}
    if config.world != "toy":
        eval_sets["eval_held_out"] = ("eval-held-out", out / f"{config.split}-held-out.jsonl")
    for key, (_, path) in eval_sets.items():
        if not path.is_file():
            phrasing = "held_out" if key == "eval_held_out" else "seen"
            write_problems(
                config.world,
                models.expert,
                path,
                config.split,
                config.eval_questions,
                seed=0,
                phrasing=phrasing,
                scale=config.scale,
            )
    base_timer = _Timer(out / "times.json")
    base = {}
    for key, (folder, path) in eval_sets.items():
        start = time.perf_counter()
        summary = _evaluate(config, models.expert, path, out / folder / "base")
        if f"{folder}/base" not in base_timer.times:
            base_timer.record(f"{folder}/base", time.perf_counter() - start)
        log(f"base expert: {summary['accuracy_text']} on {config.split} ({folder})")
        ids = [r["id"] for _, r in read_jsonl(path)]
        by_id = correct_by_id(out / folder / "base")
        base[key] = (ids, [by_id[i] for i in ids])
    inference = _inference_arms(config, models, out, eval_sets, base_timer, log)
    seeds = []
    for seed in range(config.seeds):
        result = _run_seed(config, models, seed, out, eval_sets, log)
        result["arms"] |= inference
        result["times"] = result["times"] | base_timer.times
        seeds.append(result)
    report = {
        "settings": config.settings(),
        "world": config.world,
        "seeds": config.seeds,
        "split": config.split,
        "eval_questions": len(base["eval"][0]),
        "expert": str(models.expert),
        "amateur": str(models.amateur),
        "arms": _rows(config, seeds, "eval", base),
        "wall_time_s": time.perf_counter() - started,
    }
    report["table"] = format_table(report)
    if "eval_held_out" in base:
        report["arms_held_out"] = _rows(config, seeds, "eval_held_out", base)
        report["table_held_out"] = format_table({**report, "arms": report["arms_held_out"]})
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    save_bar_chart(report, out / "report.png")
    return report


def _inference_arms(config: DemoSettings, models: Models, out: Path, eval_sets, timer, log):
    """The arms that only decode the base expert differently (contrastive decoding against
    the amateur, the method's defaults), scored once on every eval set: {arm: entry}."""
    arms = {}
    for arm in INFERENCE_ARMS:
        if arm not in config.arms:
            continue
        entry = {"note": "inference only: no training", "data": {}}
        for key, (folder, path) in eval_sets.items():
            start = time.perf_counter()
            summary = _evaluate(
                config,
                models.expert,
                path,
                out / folder / arm,
                decoding="contrastive",
                amateur=str(models.amateur),
            )
            if f"{folder}/{arm}" not in timer.times:
                timer.record(f"{folder}/{arm}", time.perf_counter() - start)
            entry[key] = str(out / folder / arm)
            log(f"{arm}: {summary['accuracy_text']} on {config.split} ({folder})")
        arms[arm] = entry
    return arms


def _rows(config: DemoSettings, seeds: list[dict], key: str, base: dict) -> list[dict]:
    """The report rows of every arm scored on eval set `key`."""
    ids, base_correct = base[key]
    scored = [
        {**result, "arms": {a: {**e, "eval": e.get(key)} for a, e in result["arms"].items()}}
        for result in seeds
    ]
    return [arm_rows(arm, scored, base_correct, ids) for arm in config.arms]
