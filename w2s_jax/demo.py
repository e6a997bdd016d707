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

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from w2s_jax import stats
from w2s_jax.files import atomic_save_figure, atomic_write_json, atomic_write_text, read_jsonl
from w2s_jax.run_folder import claim

ASSETS = Path(__file__).resolve().parent / "assets" / "toy_world"
ARMS = ("base", "lightreasoner", "sft", "no_select", "no_contrast")
LABELS = {
    "base": "base expert",
    "lightreasoner": "+ LightReasoner",
    "sft": "+ rejection-sampled SFT",
    "no_select": "LightReasoner, no step selection",
    "no_contrast": "LightReasoner, no contrast",
}
SPLITS = ("test", "validation")
# Settings that do not change the results; a resumed run may change them.
FREE_SETTINGS = ("out", "seeds", "progress")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Every setting of a demo run (defaults: the tuned ones, within 10 minutes on 2 cores)."""

    out: str = "demo_out"
    seeds: int = 1
    questions: int = 1024
    eval_questions: int = 1000
    split: str = "test"
    alpha: float = 0.2
    beta: float = 0.2
    top_k: int = 16
    max_new_tokens: int = 96
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 5e-4
    steps: int = 100
    batch_positions: int = 64
    batch_size: int = 64
    lora_targets: str = "q_proj,v_proj"
    length_bucket: int = 192
    arms: tuple[str, ...] = ARMS
    expert: str | None = None
    amateur: str | None = None
    progress: bool = False

    def __post_init__(self):
        checks = [
            (self.seeds >= 1, f"seeds must be >= 1, got {self.seeds}"),
            (self.questions >= 1, f"questions must be >= 1, got {self.questions}"),
            (self.eval_questions >= 1, f"eval questions must be >= 1, got {self.eval_questions}"),
            (self.split in SPLITS, f"split must be one of {SPLITS}, got {self.split!r}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (
                bool(self.arms) and set(self.arms) <= set(ARMS) and self.arms[0] == "base",
                f"arms must start with base and be among {ARMS}, got {self.arms}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def expert_dir(self) -> Path:
        return Path(self.expert) if self.expert else ASSETS / "expert"

    @property
    def amateur_dir(self) -> Path:
        return Path(self.amateur) if self.amateur else ASSETS / "amateur"

    def settings(self) -> dict:
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in FREE_SETTINGS}
        return values | {"arms": list(self.arms)}


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


def _check_settings(out: Path, config: DemoConfig) -> None:
    claim(out / "demo_config.json", config.settings(), ignore=FREE_SETTINGS, what="a demo run")


class _Timer:
    """Stage wall times of one seed folder, kept in times.json across resumed runs."""

    def __init__(self, path: Path):
        self.path = path
        self.times = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, key: str, seconds: float) -> None:
        self.times[key] = seconds
        atomic_write_json(self.path, self.times)


# --------------------------------------------------------------------- stages


def _sample(config: DemoConfig, questions: Path, out: Path) -> None:
    """`w2s sample --no-select` on `questions` into `out` (every position scored)."""
    from w2s_jax.commands import sample as command
    from w2s_jax.data.toy_tokenizer import SYSTEM_PROMPT

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(
        ["--expert", str(config.expert_dir), "--amateur", str(config.amateur_dir)]
        + ["--data", str(questions), "--out", str(out), "--system-prompt", SYSTEM_PROMPT]
        + ["--alpha", str(config.alpha), "--beta", str(config.beta), "--top-k", str(config.top_k)]
        + ["--max-new-tokens", str(config.max_new_tokens), "--batch-size", str(config.batch_size)]
        + ["--no-select"]
    )
    if command.run(args):
        raise RuntimeError(f"sampling into {out} failed")


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


def _train_export(config: DemoConfig, arm: str, data: Path, seed_dir: Path, seed: int, timer):
    from w2s_jax.export import export
    from w2s_jax.train import train
    from w2s_jax.train_config import TrainConfig

    run, model = seed_dir / "train" / arm, seed_dir / "model" / arm
    summary = run / "summary.json"
    if not (summary.is_file() and json.loads(summary.read_text())["steps"] == config.steps):
        start = time.perf_counter()
        train(
            TrainConfig(
                samples=str(data),
                out=str(run),
                expert=str(config.expert_dir),
                # sft: next-token CE on every completion token; the records' one-hot targets
                # at every position are the same loss, so one objective serves all arms.
                objective="contrastive",
                lora_rank=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_targets=tuple(config.lora_targets.split(",")),
                learning_rate=config.lr,
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
        export(str(config.expert_dir), str(run), str(tmp))
        shutil.rmtree(model, ignore_errors=True)
        tmp.rename(model)
        timer.record(f"export/{arm}", time.perf_counter() - start)
    return model


def _evaluate(config: DemoConfig, model: Path, data: Path, out: Path) -> dict:
    from w2s_jax.data.toy_tokenizer import SYSTEM_PROMPT
    from w2s_jax.evaluate import EvalSettings, run_eval

    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    settings = EvalSettings(
        model=str(model),
        data=str(data),
        system_prompt=SYSTEM_PROMPT,
        max_new_tokens=config.max_new_tokens,
        dtype="float32",
    )
    return run_eval(settings, out, batch_size=config.batch_size, progress=config.progress)


def _correct_by_id(eval_dir: Path) -> dict[str, bool]:
    return {r["id"]: bool(r["correct"]) for _, r in read_jsonl(eval_dir / "predictions.jsonl")}


def _run_seed(config: DemoConfig, seed: int, out: Path, eval_data: Path, task, log) -> dict:
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
    arms = {}
    for arm in config.arms[1:]:
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


# --------------------------------------------------------------------- report


def _arm_rows(arm: str, seeds: list[dict], base_correct: list[bool], ids: list[str]) -> dict:
    """Per-seed and pooled statistics of one arm against the base expert."""
    per_seed, pooled_arm, pooled_base = [], [], []
    for seed, result in enumerate(seeds):
        entry = result["arms"].get(arm, {}) if arm != "base" else {"eval": None}
        eval_dir = entry.get("eval")
        by_id = _correct_by_id(Path(eval_dir)) if eval_dir else None
        correct = [by_id[i] for i in ids] if by_id else list(base_correct)
        n, k = len(correct), sum(correct)
        low, high = stats.wilson_interval(k, n)
        row = {
            "seed": seed,
            "accuracy": k / n,
            "correct": k,
            "total": n,
            "accuracy_ci95": [low, high],
            "supervised_tokens": entry.get("data", {}).get("supervised_tokens", 0),
            "problems_used": entry.get("data", {}).get("problems_used", 0),
            "times": _arm_times(arm, result["times"]),
        }
        if "note" in entry:
            row["note"] = entry["note"]
        if arm != "base":
            boot = stats.paired_bootstrap_diff(base_correct, correct)
            test = stats.mcnemar(base_correct, correct)
            row |= {
                "diff": boot.diff,
                "diff_ci95": [boot.low, boot.high],
                "mcnemar_p": test.p_exact,
            }
        per_seed.append(row)
        pooled_arm += correct
        pooled_base += base_correct
    acc = np.array([r["accuracy"] for r in per_seed])
    summary = {
        "arm": arm,
        "label": LABELS[arm],
        "per_seed": per_seed,
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "accuracy_ci95": list(stats.wilson_interval(sum(pooled_arm), len(pooled_arm))),
        "supervised_tokens_mean": float(np.mean([r["supervised_tokens"] for r in per_seed])),
        "problems_used_mean": float(np.mean([r["problems_used"] for r in per_seed])),
        "times_mean": {
            stage: float(np.mean([r["times"].get(stage, 0.0) for r in per_seed]))
            for stage in ("sample", "train", "export", "eval")
        },
    }
    if arm != "base":
        boot = stats.paired_bootstrap_diff(pooled_base, pooled_arm)
        test = stats.mcnemar(pooled_base, pooled_arm)
        diffs = np.array([r["diff"] for r in per_seed])
        summary |= {
            "diff_mean": boot.diff,
            "diff_std": float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0,
            "diff_ci95": [boot.low, boot.high],
            "mcnemar_p": test.p_exact,
        }
    return summary


def _arm_times(arm: str, times: dict) -> dict:
    """Wall seconds per stage of one arm (sampling is one pass shared by the trained arms)."""
    if arm == "base":
        return {"eval": times.get("eval/base", 0.0)}
    return {
        "sample": times.get("sample", 0.0),
        "train": times.get(f"train/{arm}", 0.0),
        "export": times.get(f"export/{arm}", 0.0),
        "eval": times.get(f"eval/{arm}", 0.0),
    }


def format_table(report: dict) -> str:
    """The markdown result table of a report."""
    n_seeds = report["seeds"]
    spread = f" (mean ± sd of {n_seeds} seeds)" if n_seeds > 1 else ""
    lines = [
        f"| method | accuracy{spread} | 95% CI | Δ vs base (pts) | 95% bootstrap CI | McNemar p "
        "| supervised tokens | problems used | sample s | train s | export s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["arms"]:
        acc = 100 * row["accuracy_mean"]
        acc_text = f"{acc:.1f}" + (f" ± {100 * row['accuracy_std']:.1f}" if n_seeds > 1 else "")
        if n_seeds == 1:
            only = row["per_seed"][0]
            acc_text += f"% ({only['correct']}/{only['total']})"
        else:
            acc_text += "%"
        low, high = (100 * x for x in row["accuracy_ci95"])
        cells = [row["label"], acc_text, f"[{low:.1f}, {high:.1f}]"]
        if "diff_mean" in row:
            d = f"{100 * row['diff_mean']:+.1f}"
            if n_seeds > 1:
                d += f" ± {100 * row['diff_std']:.1f}"
            d_low, d_high = (100 * x for x in row["diff_ci95"])
            cells += [d, f"[{d_low:+.1f}, {d_high:+.1f}]", f"{row['mcnemar_p']:.3g}"]
        else:
            cells += ["—", "—", "—"]
        times = row["times_mean"]
        cells += [f"{row['supervised_tokens_mean']:,.0f}", f"{row['problems_used_mean']:,.0f}"]
        cells += [f"{times[s]:.0f}" if times[s] else "—" for s in ("sample", "train", "export")]
        cells.append(f"{times['eval']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save_bar_chart(report: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arms = report["arms"]
    fig = Figure(figsize=(8.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(arms))
    mean = [100 * a["accuracy_mean"] for a in arms]
    if report["seeds"] > 1:
        err = [100 * a["accuracy_std"] for a in arms]
        what = f"mean ± sd over {report['seeds']} seeds"
    else:
        err = [
            [m - 100 * a["accuracy_ci95"][0] for m, a in zip(mean, arms, strict=True)],
            [100 * a["accuracy_ci95"][1] - m for m, a in zip(mean, arms, strict=True)],
        ]
        what = "95% Wilson CI"
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:cyan", "tab:cyan"]
    ax.bar(x, mean, yerr=err, capsize=4, color=colors[: len(arms)])
    for i, a in enumerate(arms):
        dots = [100 * r["accuracy"] for r in a["per_seed"]]
        ax.plot([i] * len(dots), dots, "k.", markersize=4)
        ax.annotate(
            f"{mean[i]:.1f}",
            (i, mean[i]),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 3),
            textcoords="offset points",
        )
    ax.set_xticks(
        x, [a["label"].replace(", ", ",\n").replace("+ ", "+\n") for a in arms], fontsize=7
    )
    ax.set_ylabel(f"{report['split']} accuracy (%), {what}")
    ax.set_ylim(0, 100)
    ax.set_title(f"toy world: {report['eval_questions']} {report['split']} problems", fontsize=9)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------- driver


def run_demo(config: DemoConfig, *, log=print) -> dict:
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
    base_by_id = _correct_by_id(out / "eval" / "base")
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
        "arms": [_arm_rows(arm, seeds, base_correct, ids) for arm in config.arms],
        "wall_time_s": time.perf_counter() - started,
    }
    report["table"] = format_table(report)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _report_markdown(report))
    _save_bar_chart(report, out / "report.png")
    return report


def _report_markdown(report: dict) -> str:
    s = report["settings"]
    return (
        f"# w2s demo: toy reasoning world\n\n"
        f"{report['eval_questions']} {report['split']} problems, greedy; {report['seeds']} "
        f"seed(s); {s['questions']} unlabeled train questions per seed; LoRA rank "
        f"{s['lora_rank']}, lr {s['lr']}, {s['steps']} steps x {s['batch_positions']} "
        f"positions; α={s['alpha']}, β={s['beta']}.\n\n"
        f"{report['table']}\n\n"
        "Δ: paired difference to the base expert on the same problems (pooled over seeds), "
        "95% paired-bootstrap CI, exact McNemar p. Supervised tokens: positions with a "
        "training target. Sampling is one rollout pass per seed shared by all trained arms. "
        f"Total wall time {report['wall_time_s']:.0f} s (this invocation).\n"
    )
