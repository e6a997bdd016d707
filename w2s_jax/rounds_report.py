"""The report of a rounds run (`w2s lightreasoner`): per round the expert and the amateur,
what sampling selected, the training loss, and the eval accuracy with its Wilson 95% CI and
the paired-bootstrap 95% CIs of its difference to the base and to the round before;
rounds.json, summary.md (a table) and rounds.png (accuracy per round, the base as a line)."""

from __future__ import annotations

import json
from pathlib import Path

from w2s_jax import stats
from w2s_jax.demo_report import correct_by_id
from w2s_jax.files import atomic_save_figure, atomic_write_json, atomic_write_text


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _accuracy(correct: list[bool]) -> dict:
    k, n = sum(correct), len(correct)
    low, high = stats.wilson_interval(k, n)
    return {"accuracy": k / n, "correct": k, "total": n, "accuracy_ci95": [low, high]}


def _difference(before: list[bool], after: list[bool]) -> dict:
    """accuracy(after) − accuracy(before) on the same questions, paired."""
    boot = stats.paired_bootstrap_diff(before, after)
    test = stats.mcnemar(before, after)
    return {"diff": boot.diff, "diff_ci95": [boot.low, boot.high], "mcnemar_p": test.p_exact}


def build_report(settings, out: Path, experts: list[Path]) -> dict:
    """rounds.json's content from the finished folders of rounds 1..settings.rounds."""
    from w2s_jax.stages.rounds import shown

    base_by_id = correct_by_id(out / "eval-base")
    ids = list(base_by_id)
    base = [base_by_id[i] for i in ids]
    rows, previous = [], base
    for round_ in range(1, settings.rounds + 1):
        folder = out / f"round-{round_}"
        by_id = correct_by_id(folder / "eval")
        if sorted(by_id) != sorted(ids):
            raise ValueError(f"{folder / 'eval'} scored other questions than {out / 'eval-base'}")
        correct = [by_id[i] for i in ids]
        sampled = _read(folder / "samples" / "summary.json")
        trained = folder / "train" / "summary.json"
        final = _read(trained)["final"] if sampled["selected"] and trained.is_file() else None
        rows.append(
            {
                "round": round_,
                **{k: v for k, v in _read(folder / "round.json").items() if k != "round"},
                "model": shown(experts[round_], out),
                "samples": {
                    "questions": sampled["questions"],
                    "positions": sampled["positions"],
                    "selected": sampled["selected"],
                    "selected_share": sampled["selected_fraction"],
                    "kl_mean": sampled["kl_mean"],
                },
                "train": None
                if final is None
                else {"steps": final["step"], "loss": final["loss"], "kl": final["kl"]},
                "eval": _accuracy(correct),
                "vs_base": _difference(base, correct),
                "vs_previous": _difference(previous, correct),
            }
        )
        previous = correct
    return {
        "settings": settings.settings(),
        "rounds": settings.rounds,
        "amateur_rule": settings.amateur_rule,
        "eval_questions": len(ids),
        "base": {"model": shown(experts[0], out), "eval": _accuracy(base)},
        "per_round": rows,
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _ci(pair) -> str:
    return f"[{100 * pair[0]:+.1f}, {100 * pair[1]:+.1f}]"


def summary_markdown(report: dict) -> str:
    """A readable table: one row for the base, one per round."""
    base = report["base"]["eval"]
    lines = [
        f"# LightReasoner rounds: amateur rule `{report['amateur_rule']}`",
        "",
        f"{report['eval_questions']} held-out questions, greedy; 95% CIs (accuracy: Wilson; "
        "differences: paired bootstrap over questions; p: exact McNemar).",
        "",
        "| round | expert | amateur | selected / positions | train loss | accuracy | "
        "Δ vs base | Δ vs previous |",
        "|---|---|---|---|---|---|---|---|",
        f"| base | {report['base']['model']} | | | | {_pct(base['accuracy'])}% "
        f"({base['correct']}/{base['total']}) {_ci(base['accuracy_ci95']).replace('+', '')} "
        "| | |",
    ]
    for row in report["per_round"]:
        acc, s = row["eval"], row["samples"]
        loss = f"{row['train']['loss']:.4f}" if row["train"] else "not trained"
        diffs = [
            f"{100 * d['diff']:+.1f} {_ci(d['diff_ci95'])} p={d['mcnemar_p']:.2g}"
            for d in (row["vs_base"], row["vs_previous"])
        ]
        lines.append(
            f"| {row['round']} | {row['expert']} | {row['amateur']} | {s['selected']} / "
            f"{s['positions']} ({100 * s['selected_share']:.1f}%) | {loss} | "
            f"{_pct(acc['accuracy'])}% ({acc['correct']}/{acc['total']}) "
            f"{_ci(acc['accuracy_ci95']).replace('+', '')} | {diffs[0]} | {diffs[1]} |"
        )
    lines += [
        "",
        "Round r trains E_r against its amateur and scores its export E_{r+1} (the accuracy "
        "column); Δ vs previous compares E_{r+1} with E_r.",
    ]
    return "\n".join(lines) + "\n"


def save_rounds_plot(report: dict, path: Path) -> None:
    """Accuracy of E_{r+1} per round with Wilson 95% bars; the base with its band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["per_round"]
    base = report["base"]["eval"]
    x = [row["round"] for row in rows]
    y = [100 * row["eval"]["accuracy"] for row in rows]
    low = [v - 100 * row["eval"]["accuracy_ci95"][0] for v, row in zip(y, rows, strict=True)]
    high = [100 * row["eval"]["accuracy_ci95"][1] - v for v, row in zip(y, rows, strict=True)]
    fig = Figure(figsize=(2.4 + 0.8 * len(rows), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axhspan(100 * base["accuracy_ci95"][0], 100 * base["accuracy_ci95"][1], color="0.9")
    label = f"base expert E_1: {100 * base['accuracy']:.1f} (95% CI)"
    ax.axhline(100 * base["accuracy"], color="0.4", ls="--", label=label)
    ax.errorbar(
        x,
        y,
        yerr=[low, high],
        fmt="o-",
        capsize=4,
        color="tab:blue",
        label="after round r (Wilson 95% CI)",
    )
    for xi, yi in zip(x, y, strict=True):
        ax.annotate(f"{yi:.1f}", (xi, yi), textcoords="offset points", xytext=(8, 4), fontsize=8)
    ax.set_xticks(x)
    ax.set_xlabel("round")
    ax.set_ylabel(f"accuracy of E_(r+1), % of {report['eval_questions']}")
    ax.set_title(f"LightReasoner rounds, amateur rule: {report['amateur_rule']}")
    ax.legend(loc="best", fontsize=8)
    ax.margins(x=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)


def write_report(report: dict, out: Path) -> None:
    """rounds.json, summary.md and rounds.png, each atomically."""
    atomic_write_json(out / "rounds.json", report)
    atomic_write_text(out / "summary.md", summary_markdown(report))
    save_rounds_plot(report, out / "rounds.png")
