"""`w2s demo`: LightReasoner end to end on the toy reasoning world, with baselines and ablations.

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
5. eval: greedy accuracy on the same held-out test problems (the base expert once).

Stages run in this process through their Python APIs, so compiled functions are
reused. Every stage writes into `--out` and is skipped when its output is there,
so a re-run resumes. report.json, report.md and report.png are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from w2s_jax.demo_report import (
    ARMS,
    arm_rows,
    correct_by_id,
    format_table,
    report_markdown,
    save_bar_chart,
)
from w2s_jax.files import atomic_write_json, atomic_write_text, read_jsonl
from w2s_jax.run_folder import claim
from w2s_jax.settings import (
    at_least,
    check,
    comma_list,
    default_of,
    free_fields,
    number_in,
    record,
    setting,
)
from w2s_jax.stages.sample_settings import SampleSettings

ASSETS = Path(__file__).resolve().parent / "assets" / "toy_world"
SPLITS = ("test", "validation")


def _known_arms(arms) -> str | None:
    if arms and set(arms) <= set(ARMS) and arms[0] == "base":
        return None
    return f"must start with base and be among {', '.join(ARMS)}"


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Every setting of a demo run (defaults: the tuned ones, within 10 minutes on 2 cores)."""

    out: str = setting("demo_out", "Output folder (resumable).", metavar="DIR", free=True)
    seeds: int = setting(1, "Repeat with N seeds; reports mean ± sd.", check=at_least(1), free=True)
    questions: int = setting(1024, "Unlabeled train questions per seed.", check=at_least(1))
    eval_questions: int = setting(1000, "Held-out problems scored.", check=at_least(1))
    split: str = setting(
        "test",
        "Held-out split scored: test (reported runs) or validation (tuning).",
        choices=SPLITS,
    )
    alpha: float = setting(
        default_of(SampleSettings, "alpha"),
        "Plausibility ratio α.",
        check=number_in(0, 1, open_low=True),
    )
    beta: float = setting(0.2, "KL threshold β of step selection.", check=number_in(0, math.inf))
    top_k: int = setting(
        default_of(SampleSettings, "top_k"),
        "Most tokens per contrastive target.",
        check=at_least(1),
    )
    max_new_tokens: int = setting(96, "Rollout/eval length.", check=at_least(1))
    lora_rank: int = setting(8, "LoRA rank of every trained arm.", check=at_least(1))
    lora_alpha: float = setting(16.0, "LoRA alpha of every trained arm.")
    learning_rate: float = setting(
        5e-4, "Peak learning rate of every trained arm.", flags=("--lr", "--learning-rate")
    )
    steps: int = setting(100, "Optimizer steps of every trained arm.", check=at_least(1))
    batch_positions: int = setting(64, "Positions per step.", check=at_least(1))
    batch_size: int = setting(64, "Questions per sampling/eval batch.", check=at_least(1))
    lora_targets: tuple[str, ...] = setting(
        ("q_proj", "v_proj"), "Comma-separated layers LoRA adapts."
    )
    arms: tuple[str, ...] = setting(
        ARMS, "Comma-separated arms to run (base first).", check=_known_arms
    )
    length_bucket: int = setting(192, "Training length padding.", check=at_least(1))
    expert: str | None = setting(
        None, "Expert HF folder (default: the shipped toy expert).", metavar="DIR"
    )
    amateur: str | None = setting(
        None, "Amateur HF folder (default: the shipped toy amateur).", metavar="DIR"
    )
    progress: bool = setting(
        False, "Progress bars of training and evaluation.", flags=("--progress",), free=True
    )

    def __post_init__(self):
        object.__setattr__(self, "arms", comma_list(self.arms))
        object.__setattr__(self, "lora_targets", comma_list(self.lora_targets))
        check(self)

    @property
    def expert_dir(self) -> Path:
        return Path(self.expert) if self.expert else ASSETS / "expert"

    @property
    def amateur_dir(self) -> Path:
        return Path(self.amateur) if self.amateur else ASSETS / "amateur"

    def settings(self) -> dict:
        """The recorded settings (the free ones left out)."""
        free = free_fields(DemoSettings)
        return {k: v for k, v in record(self).items() if k not in free}


def _task_config(expert_dir: Path):
    """The toy world's TaskConfig recorded next to the shipped models."""
    from w2s_jax.data.arithmetic import TaskConfig

    manifest = expert_dir.parent / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} is missing: the demo needs the toy world's manifest next to the expert "
            "(see experiments/toy_world/README.md to rebuild the shipped models)"
        )
    task = dict(json.loads(manifest.read_text())["task"])
    return TaskConfig(**{**task, "operations": tuple(task["operations"])})


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


def _sample(config: DemoSettings, questions: Path, out: Path) -> None:
    """The sampling stage with --no-select on `questions` into `out` (every position scored)."""
    from w2s_jax.data.toy_tokenizer import SYSTEM_PROMPT
    from w2s_jax.stages.sample import sample

    sample(
        SampleSettings(
            expert=str(config.expert_dir),
            amateur=str(config.amateur_dir),
            data=str(questions),
            out=str(out),
            system_prompt=SYSTEM_PROMPT,
            alpha=config.alpha,
            beta=config.beta,
            top_k=config.top_k,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            dtype="float32",
            select=False,
        )
    )


def _write_arm_data(folder: Path, manifest: dict, records: list[dict]) -> dict:
    """A samples folder (manifest + one shard) for one arm; returns its data stats."""
    from w2s_jax.files import atomic_write_jsonl

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(tmp / "manifest.json", manifest)
    atomic_write_jsonl(tmp / "samples" / "p000-00000.jsonl", records)
    data_stats = {
        "supervised_tokens": sum(len(r["positions"]) for r in records),
        "problems_used": sum(bool(r["positions"]) for r in records),
    }
    atomic_write_json(tmp / "data_stats.json", data_stats)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return data_stats


def derive_arm_records(records: list[dict], arm: str, beta: float, golds: dict, tokenizer):
    """Training records of `arm` from every-position sample records (see module doc)."""
    from w2s_jax.grading import extract_answer, is_equiv

    out = []
    for r in records:
        kl = np.asarray(r["kl"], np.float64)
        all_positions = r["positions"]
        if arm == "no_select":
            keep = list(range(len(all_positions)))
        elif arm == "sft":
            text = tokenizer.decode(r["completion_ids"], skip_special_tokens=True)
            right = is_equiv(extract_answer(text), golds[r["id"]])
            keep = list(range(len(all_positions))) if right else []
        else:
            keep = [j for j, t in enumerate(all_positions) if kl[t] > beta]
        positions = [all_positions[j] for j in keep]
        if arm == "no_contrast" or arm == "sft":
            target_ids = [[r["completion_ids"][t]] for t in positions]
            target_weights = [[1.0] for _ in positions]
        else:
            target_ids = [r["target_ids"][j] for j in keep]
            target_weights = [r["target_weights"][j] for j in keep]
        out.append(
            r | {"positions": positions, "target_ids": target_ids, "target_weights": target_weights}
        )
    return out


def _train_export(config: DemoSettings, arm: str, data: Path, seed_dir: Path, seed: int, timer):
    from w2s_jax.export import ExportSettings, export
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
                expert=str(config.expert_dir),
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
        tmp = model.with_name(model.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        export(ExportSettings(lora=str(run), out=str(tmp), expert=str(config.expert_dir)))
        shutil.rmtree(model, ignore_errors=True)
        tmp.rename(model)
        timer.record(f"export/{arm}", time.perf_counter() - start)
    return model


def _evaluate(config: DemoSettings, model: Path, data: Path, out: Path) -> dict:
    from w2s_jax.data.toy_tokenizer import SYSTEM_PROMPT
    from w2s_jax.evaluate import EvalSettings, run_eval

    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    settings = EvalSettings(
        model=str(model),
        data=str(data),
        out=str(out),
        system_prompt=SYSTEM_PROMPT,
        max_new_tokens=config.max_new_tokens,
        dtype="float32",
        batch_size=config.batch_size,
        progress=config.progress,
    )
    return run_eval(settings)


def _run_seed(config: DemoSettings, seed: int, out: Path, eval_data: Path, task, log) -> dict:
    """Every stage of one seed; returns {arm: {"eval": dir, "data": stats}} and times."""
    from w2s_jax.data.arithmetic import write_split
    from w2s_jax.models import load_tokenizer
    from w2s_jax.sample_store import read_manifest, read_samples

    seed_dir = out / f"seed-{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    timer = _Timer(seed_dir / "times.json")
    questions = seed_dir / "questions.jsonl"
    if not questions.is_file():  # unlabeled for every arm but sft; a new draw per seed
        write_split(questions, "train", config.questions, seed=1000 + seed, config=task)
    golds = {r["id"]: r["answer"].rsplit("####", 1)[1].strip() for _, r in read_jsonl(questions)}
    sampled = seed_dir / "samples"
    if not (sampled / "summary.json").is_file():
        start = time.perf_counter()
        _sample(config, questions, sampled)
        timer.record("sample", time.perf_counter() - start)
    log(
        f"[seed {seed}] sampled {config.questions} questions ({timer.times.get('sample', 0):.0f} s)"
    )
    records = list(read_samples(sampled))
    manifest = read_manifest(sampled)
    tokenizer = load_tokenizer(config.expert_dir)
    arms, trained = {}, config.arms[1:]
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
            derived = derive_arm_records(records, arm, config.beta, golds, tokenizer)
            _write_arm_data(data, arm_manifest, derived)
        data_stats = json.loads((data / "data_stats.json").read_text())
        entry = {"data": data_stats}
        if data_stats["supervised_tokens"] == 0:
            entry["note"] = "no supervised position: nothing to train, the base expert is scored"
            log(f"[seed {seed}] {arm}: {entry['note']}")
            arms[arm] = entry
            continue
        model = _train_export(config, arm, data, seed_dir, seed, timer)
        start = time.perf_counter()
        eval_dir = seed_dir / "eval" / arm
        if not (eval_dir / "summary.json").is_file():
            _evaluate(config, model, eval_data, eval_dir)
            timer.record(f"eval/{arm}", time.perf_counter() - start)
        entry["eval"] = str(eval_dir)
        summary = json.loads((eval_dir / "summary.json").read_text())
        log(
            f"[seed {seed}] {arm}: {data_stats['supervised_tokens']} supervised tokens from "
            f"{data_stats['problems_used']} problems -> {summary['accuracy_text']}"
        )
        arms[arm] = entry
    return {"arms": arms, "times": timer.times}


def _elapsed_and_eta(started: float, done: int, total: int) -> str:
    """ "12 s elapsed, ETA 30 s" from the mean time of the `done` arms so far."""
    elapsed = time.perf_counter() - started
    if not done:
        return f"{elapsed:.0f} s elapsed"
    return f"{elapsed:.0f} s elapsed, ETA {elapsed / done * (total - done):.0f} s"


# --------------------------------------------------------------------- report


def run_demo(config: DemoSettings, *, log=print) -> dict:
    """Run (or resume) the demo into `config.out`; returns the report (also written there)."""
    from w2s_jax.data.arithmetic import write_split

    for role, folder in (("expert", config.expert_dir), ("amateur", config.amateur_dir)):
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{role} model folder {folder} has no config.json")
    task = _task_config(config.expert_dir)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, config)
    started = time.perf_counter()
    eval_data = out / f"{config.split}.jsonl"
    if not eval_data.is_file():
        write_split(eval_data, config.split, config.eval_questions, seed=0, config=task)
    ids = [r["id"] for _, r in read_jsonl(eval_data)]
    base_timer = _Timer(out / "times.json")
    start = time.perf_counter()
    base_summary = _evaluate(config, config.expert_dir, eval_data, out / "eval" / "base")
    if "eval/base" not in base_timer.times:
        base_timer.record("eval/base", time.perf_counter() - start)
    log(f"base expert: {base_summary['accuracy_text']} on {config.split}")
    base_by_id = correct_by_id(out / "eval" / "base")
    base_correct = [base_by_id[i] for i in ids]
    seeds = []
    for seed in range(config.seeds):
        result = _run_seed(config, seed, out, eval_data, task, log)
        result["times"] = result["times"] | base_timer.times
        seeds.append(result)
    report = {
        "settings": config.settings(),
        "seeds": config.seeds,
        "split": config.split,
        "eval_questions": len(ids),
        "expert": str(config.expert_dir),
        "amateur": str(config.amateur_dir),
        "arms": [arm_rows(arm, seeds, base_correct, ids) for arm in config.arms],
        "wall_time_s": time.perf_counter() - started,
    }
    report["table"] = format_table(report)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    save_bar_chart(report, out / "report.png")
    return report
