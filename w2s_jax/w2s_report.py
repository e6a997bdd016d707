"""The weak-to-strong report: accuracies with Wilson CIs, PGR per loss with bootstrap CIs,
the weak labels' accuracy; pooled over seeds; Markdown table and chart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from w2s_jax import stats
from w2s_jax.files import atomic_save_figure, atomic_write_json, atomic_write_text
from w2s_jax.w2s_metrics import pgr_bootstrap


def _label(name: str) -> str:
    if name == "weak":
        return "weak (ground truth, half 1)"
    if name == "ceiling":
        return "strong ceiling (ground truth, half 2)"
    return f"strong on weak labels, {name.removeprefix('w2s-')}"


def _spread(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _pgr_fields(weak: list, w2s: list, ceiling: list) -> dict:
    result = pgr_bootstrap(weak, w2s, ceiling)
    return {"pgr": result.value, "pgr_ci95": [result.low, result.high]}


def model_row(name: str, seeds: list[dict]) -> dict:
    """Per-seed and pooled statistics of one classifier (PGR for the w2s ones)."""
    per_seed, pooled = [], {"weak": [], "ceiling": [], name: []}
    for seed, result in enumerate(seeds):
        models = result["models"]
        correct = models[name]["correct"]
        k, n = int(sum(correct)), len(correct)
        train = models[name].get("train") or {}
        row = {
            "seed": seed,
            "accuracy": k / n,
            "correct": k,
            "total": n,
            "accuracy_ci95": list(stats.wilson_interval(k, n)),
            "train_s": train.get("seconds", 0.0),
            "steps": train.get("steps", 0),
        }
        if name.startswith("w2s-"):
            row |= _pgr_fields(models["weak"]["correct"], correct, models["ceiling"]["correct"])
        per_seed.append(row)
        for key in pooled:
            pooled[key] += models[key]["correct"]
    all_correct = pooled[name]
    summary = {
        "name": name,
        "label": _label(name),
        "per_seed": per_seed,
        "accuracy_mean": float(np.mean([r["accuracy"] for r in per_seed])),
        "accuracy_std": _spread([r["accuracy"] for r in per_seed]),
        "accuracy_ci95": list(stats.wilson_interval(int(sum(all_correct)), len(all_correct))),
        "train_s_mean": float(np.mean([r["train_s"] for r in per_seed])),
    }
    if name.startswith("w2s-"):
        defined = [r["pgr"] for r in per_seed if r["pgr"] is not None]
        pooled_pgr = _pgr_fields(pooled["weak"], all_correct, pooled["ceiling"])
        summary |= {
            "pgr_mean": float(np.mean(defined)) if defined else None,
            "pgr_std": _spread(defined) if defined else None,
            "pgr_pooled": pooled_pgr["pgr"],
            "pgr_ci95": pooled_pgr["pgr_ci95"],
        }
    return summary


def build_report(settings, seeds: list[dict], *, test_items: int, train_items: int) -> dict:
    """The report of a run (settings: its WeakToStrongSettings; seeds: per-seed results)."""
    names = ["weak", "ceiling", *(f"w2s-{loss}" for loss in settings.losses)]
    label_acc = [s["weak_label_accuracy"] for s in seeds]
    report = {
        "settings": settings.settings(),
        "weak": str(settings.weak_dir),
        "strong": str(settings.strong_dir),
        "seeds": len(seeds),
        "train_items": train_items,
        "test_items": test_items,
        "weak_label_accuracy": {
            "per_seed": label_acc,
            "mean": float(np.mean(label_acc)),
            "std": _spread(label_acc),
        },
        "models": [model_row(name, seeds) for name in names],
    }
    report["table"] = format_table(report)
    return report


def _pm(mean: float | None, std: float | None, seeds: int, scale=100.0, fmt=".1f") -> str:
    if mean is None:
        return "undefined"
    text = f"{scale * mean:{fmt}}"
    return text + (f" ± {scale * std:{fmt}}" if seeds > 1 else "")


def format_table(report: dict) -> str:
    """The Markdown result table."""
    n = report["seeds"]
    spread = f" (mean ± sd, {n} seeds)" if n > 1 else ""
    lines = [
        f"| model | test accuracy{spread} | 95% CI | PGR{spread} | PGR 95% bootstrap CI "
        "| train s |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["models"]:
        acc = _pm(row["accuracy_mean"], row["accuracy_std"], n) + "%"
        if n == 1:
            only = row["per_seed"][0]
            acc += f" ({only['correct']}/{only['total']})"
        low, high = (100 * x for x in row["accuracy_ci95"])
        cells = [row["label"], acc, f"[{low:.1f}, {high:.1f}]"]
        if "pgr_mean" in row:
            ci = row["pgr_ci95"]
            ci_text = "undefined" if ci[0] is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"
            cells += [_pm(row["pgr_mean"], row["pgr_std"], n, scale=1.0, fmt=".2f"), ci_text]
        else:
            cells += ["—", "—"]
        cells.append(f"{row['train_s_mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    labels = report["weak_label_accuracy"]
    lines.append("")
    lines.append(f"weak labels on half 2: {_pm(labels['mean'], labels['std'], n)}% right")
    return "\n".join(lines)


def save_chart(report: dict, path: Path) -> None:
    """Two panels, one row per model: test accuracy with its interval, PGR with its CI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["models"]
    y = np.arange(len(rows))[::-1]
    mean = np.array([100 * r["accuracy_mean"] for r in rows])
    if report["seeds"] > 1:
        low = high = np.array([100 * r["accuracy_std"] for r in rows])
        what = f"mean ± sd over {report['seeds']} seeds"
    else:
        low = mean - np.array([100 * r["accuracy_ci95"][0] for r in rows])
        high = np.array([100 * r["accuracy_ci95"][1] for r in rows]) - mean
        what = "95% Wilson CI"
    fig = Figure(figsize=(9.0, 1.5 + 0.55 * len(rows)))
    FigureCanvasAgg(fig)
    ax_acc, ax_pgr = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": (3, 2)})
    colors = ["tab:gray", "tab:green"] + ["tab:blue"] * (len(rows) - 2)
    for i in range(len(rows)):
        ax_acc.errorbar(
            mean[i], y[i], xerr=[[low[i]], [high[i]]], fmt="o", color=colors[i], capsize=3, ms=7
        )
        ax_acc.text(mean[i] + high[i] + 0.4, y[i], f"{mean[i]:.1f}", va="center", fontsize=8)
    left, right = max(0.0, (mean - low).min() - 2.0), (mean + high).max() + 5.0
    ax_acc.set_xlim(left, right)  # room for the labels, beyond 100 if need be
    ax_acc.set_xticks([t for t in ax_acc.get_xticks() if left <= t <= 100])
    for i, style in ((0, "--"), (1, ":")):  # weak and ceiling as reference lines
        ax_acc.axvline(mean[i], color=colors[i], linestyle=style, linewidth=0.8)
    ax_acc.grid(axis="x", color="0.9")
    ax_acc.set_yticks(y, [r["label"] for r in rows], fontsize=8)
    ax_acc.set_xlabel(f"test accuracy (%), {what}", fontsize=8)
    _pgr_panel(ax_pgr, rows, y)
    fig.suptitle(
        f"weak-to-strong: {report['test_items']} test items, {report['seeds']} seed(s)",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def _pgr_panel(ax, rows: list[dict], y) -> None:
    """PGR (pooled over seeds) with its 95% bootstrap CI; 0 = weak, 1 = ceiling."""
    for x in (0.0, 1.0):
        ax.axvline(x, color="0.6", linewidth=0.8)
    edges = [0.0, 1.0]
    for i, row in enumerate(rows):
        value, ci = row.get("pgr_pooled"), row.get("pgr_ci95", [None, None])
        if value is None or ci[0] is None:
            text = "—" if "pgr_ci95" not in row else "undefined"
            ax.text(0.5, y[i], text, ha="center", va="center", fontsize=8)
            continue
        ax.errorbar(
            value, y[i], xerr=[[value - ci[0]], [ci[1] - value]], fmt="o", color="k", capsize=3
        )
        ax.text(ci[1] + 0.03, y[i], f"{value:.2f}", va="center", fontsize=8)
        edges += ci
    ax.set_xlim(min(edges) - 0.1, max(edges) + 0.25)
    ax.set_xlabel("PGR (0 = weak, 1 = ceiling), 95% bootstrap CI", fontsize=8)


def report_markdown(report: dict) -> str:
    s = report["settings"]
    return (
        "# w2s weak-to-strong\n\n"
        f"weak {report['weak']}, strong {report['strong']}; {report['train_items']} training "
        f"items split into two halves per seed, {report['test_items']} test items; "
        f"{report['seeds']} seed(s); weak trains {s['weak_mode']} (lr {s['weak_learning_rate']}), "
        f"strong {s['mode']} (lr {s['learning_rate']}); {s['epochs']} epochs, batch "
        f"{s['batch_size']}; logconf aux_coef {s['aux_coef']}, warm-up "
        f"{s['warmup']} over {s['warmup_frac']}.\n\n"
        f"{report['table']}\n\n"
        "PGR = (acc_w2s − acc_weak) / (acc_ceiling − acc_weak) on the same test items; its CI "
        "resamples test items (pooled over seeds); accuracy CIs are Wilson intervals of the "
        f"pooled counts. Wall time {report['wall_time_s']:.0f} s (this invocation).\n"
    )


def write_report(report: dict, out: Path) -> None:
    """report.json, report.md and report.png into `out`, atomically."""
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    save_chart(report, out / "report.png")
