"""The demo's report: per-arm accuracies pooled over seeds, paired statistics against
the base expert, stage times, the Markdown table and the bar chart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from w2s_jax import stats
from w2s_jax.files import atomic_save_figure, read_jsonl

ARMS = (
    "base",
    "lightreasoner",
    "sft",
    "no_select",
    "no_contrast",
    "contrastive_decoding",
    "weak_sft",
    "lightreasoner_cross",
)
# Arms scored without training (the base expert decoded differently), once for all seeds.
INFERENCE_ARMS = ("contrastive_decoding",)
LABELS = {
    "base": "base expert",
    "lightreasoner": "+ LightReasoner",
    "sft": "+ rejection-sampled SFT",
    "no_select": "LightReasoner, no step selection",
    "no_contrast": "LightReasoner, no contrast",
    "contrastive_decoding": "base + contrastive decoding (inference only)",
    "weak_sft": "+ SFT on the amateur's solutions (weak-to-strong)",
    "lightreasoner_cross": "+ LightReasoner, amateur of another tokenizer (SmolLM2-135M)",
}


COLORS = {  # the ablations share their method's colour family
    "base": "tab:gray",
    "lightreasoner": "tab:blue",
    "sft": "tab:orange",
    "no_select": "tab:cyan",
    "no_contrast": "tab:cyan",
    "contrastive_decoding": "tab:purple",
    "weak_sft": "tab:green",
    "lightreasoner_cross": "tab:blue",
}
WORLD_TITLES = {
    "toy": "toy world",
    "real-lm": "real LM (SmolLM2-135M-Instruct)",
    "qwen": "Qwen2.5-Coder",
}


def world_title(report: dict) -> str:
    """The report's world; in the Qwen world, with the expert and amateur it ran."""
    world = report.get("world", "toy")
    title = WORLD_TITLES.get(world, world)
    settings = report.get("settings", {})
    if world == "qwen" and settings.get("expert") and settings.get("amateur"):
        title = f"{title}: {settings['expert']} expert, {settings['amateur']} amateur"
    return title


def correct_by_id(eval_dir: Path) -> dict[str, bool]:
    return {r["id"]: bool(r["correct"]) for _, r in read_jsonl(eval_dir / "predictions.jsonl")}


def arm_rows(arm: str, seeds: list[dict], base_correct: list[bool], ids: list[str]) -> dict:
    """Per-seed and pooled statistics of one arm against the base expert. The base and
    the inference-only arms give one result whatever the seed: their pooled statistics
    count it once (repeating it would narrow the intervals by sqrt(seeds))."""
    per_seed, pooled_arm, pooled_base = [], [], []
    for seed, result in enumerate(seeds):
        entry = result["arms"].get(arm, {}) if arm != "base" else {"eval": None}
        eval_dir = entry.get("eval")
        by_id = correct_by_id(Path(eval_dir)) if eval_dir else None
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
            "times": arm_times(arm, result["times"]),
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
    if arm == "base" or arm in INFERENCE_ARMS:  # one result repeated per seed: count it once
        pooled_arm, pooled_base = pooled_arm[: len(ids)], pooled_base[: len(ids)]
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


def arm_times(arm: str, times: dict) -> dict:
    """Wall seconds per stage of one arm (sampling is one pass shared by the trained arms;
    the weak_sft arm's is the amateur's solving the questions, lightreasoner_cross's its
    own pass against the other amateur)."""
    if arm == "base" or arm in INFERENCE_ARMS:
        return {"eval": times.get(f"eval/{arm}", 0.0)}
    sampled = {"weak_sft": "amateur_solutions", "lightreasoner_cross": "sample-cross"}.get(
        arm, "sample"
    )
    return {
        "sample": times.get(sampled, 0.0),
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


def save_bar_chart(report: dict, path: Path) -> None:
    """Two panels, one row per arm: accuracy with its interval (axis fitted to the data),
    and the paired difference to the base expert with its 95% bootstrap CI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arms = report["arms"]
    y = np.arange(len(arms))[::-1]  # first arm on top
    mean = np.array([100 * a["accuracy_mean"] for a in arms])
    if report["seeds"] > 1:
        low = high = np.array([100 * a["accuracy_std"] for a in arms])
        what = f"mean ± sd over {report['seeds']} seeds"
    else:
        low = mean - [100 * a["accuracy_ci95"][0] for a in arms]
        high = [100 * a["accuracy_ci95"][1] for a in arms] - mean
        what = "95% Wilson CI"
    fig = Figure(figsize=(9.0, 1.4 + 0.55 * len(arms)))
    FigureCanvasAgg(fig)
    ax_acc, ax_diff = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": (3, 2)})
    # Points, not bars: the axis is fitted to the data, so bar lengths would mislead.
    for i, arm in enumerate(arms):
        ax_acc.errorbar(
            mean[i],
            y[i],
            xerr=[[low[i]], [high[i]]],
            fmt="o",
            color=COLORS[arm["arm"]],
            capsize=3,
            ms=7,
        )
    ax_acc.set_xlim(max(0.0, (mean - low).min() - 2.0), min(100.0, (mean + high).max() + 3.0))
    ax_acc.grid(axis="x", color="0.9")
    for i, value in enumerate(mean):
        ax_acc.text(mean[i] + high[i] + 0.4, y[i], f"{value:.1f}", va="center", fontsize=8)
    ax_acc.set_yticks(y, [a["label"] for a in arms], fontsize=8)
    ax_acc.set_xlabel(f"{report['split']} accuracy (%), {what}", fontsize=8)
    _difference_panel(ax_diff, arms, y)
    world = world_title(report)
    fig.suptitle(f"{world}: {report['eval_questions']} {report['split']} problems", fontsize=9)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def _difference_panel(ax, arms: list[dict], y) -> None:
    """Δ accuracy vs the base expert (points) with 95% paired-bootstrap CIs; base: a dash."""
    ax.axvline(0.0, color="0.6", linewidth=0.8)
    for i, arm in enumerate(arms):
        if "diff_ci95" not in arm:
            ax.text(0.0, y[i], "—", ha="center", va="center", fontsize=9)
            continue
        diff = 100 * arm["diff_mean"]
        low, high = (100 * v for v in arm["diff_ci95"])
        ax.errorbar(diff, y[i], xerr=[[diff - low], [high - diff]], fmt="o", color="k", capsize=3)
        ax.text(high + 0.3, y[i], f"{diff:+.1f}", va="center", fontsize=8)
    ax.set_xlabel("Δ vs base (points), 95% paired bootstrap CI", fontsize=8)
    lows = [100 * a["diff_ci95"][0] for a in arms if "diff_ci95" in a] + [0.0]
    highs = [100 * a["diff_ci95"][1] for a in arms if "diff_ci95" in a] + [0.0]
    ax.set_xlim(min(lows) - 1.0, max(highs) + 2.5)


# --------------------------------------------------------------------- driver


def report_markdown(report: dict) -> str:
    s = report["settings"]
    world = world_title(report)
    held_out = (
        f"The same test problems in the held-out phrasing (templates no training question "
        f"uses):\n\n{report['table_held_out']}\n\n"
        if "table_held_out" in report
        else ""
    )
    return (
        f"# w2s demo: {world}\n\n"
        f"{report['eval_questions']} {report['split']} problems, greedy; {report['seeds']} "
        f"seed(s); {s['questions']} unlabeled train questions per seed; LoRA rank "
        f"{s['lora_rank']}, lr {s['learning_rate']}, {s['steps']} steps x {s['batch_positions']} "
        f"positions; α={s['alpha']}, β={s['beta']}.\n\n"
        f"{report['table']}\n\n"
        f"{held_out}"
        "Δ: paired difference to the base expert on the same problems (pooled over seeds), "
        "95% paired-bootstrap CI, exact McNemar p. Supervised tokens: positions with a "
        "training target. Sampling is one rollout pass per seed shared by all trained arms. "
        f"Total wall time {report['wall_time_s']:.0f} s (this invocation).\n"
    )
