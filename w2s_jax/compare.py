"""Comparison of finished eval runs on the same questions (`w2s eval --compare`).

Accuracies with Wilson intervals, paired differences against the first run with a
bootstrap CI and McNemar's test, a Markdown table and a bar chart.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from w2s_jax import stats
from w2s_jax.evaluate import summarize
from w2s_jax.files import atomic_save_figure, atomic_write_json, atomic_write_text, read_jsonl
from w2s_jax.settings import at_least, check, setting


@dataclasses.dataclass(frozen=True)
class CompareSettings:
    """Which finished runs to compare, how to name them, and the bootstrap's size."""

    runs: tuple[str, ...] = setting(
        (), "Compare finished eval runs instead.", flags=("--compare",), many=True, metavar="RUN"
    )
    out: str | None = setting(None, "Output folder.", metavar="DIR", required=True)
    labels: tuple[str, ...] | None = setting(
        None, "Names of the compared runs (default: folder names).", many=True
    )
    bootstrap_resamples: int = setting(10_000, "Paired bootstrap resamples.", check=at_least(1))
    seed: int = setting(0, "Seed of the bootstrap.")

    def __post_init__(self):
        object.__setattr__(self, "runs", tuple(str(r) for r in self.runs))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))
        check(self)


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


def compare(settings: CompareSettings) -> dict:
    """Compare finished runs on the same questions; every run is paired with the first.

    Writes compare.json, compare.md (the table, also returned under "table") and
    compare.png (accuracies with 95% Wilson intervals) into `settings.out`.
    """
    runs, labels, out = list(settings.runs), settings.labels, settings.out
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
                correct[0],
                correct[n],
                n_resamples=settings.bootstrap_resamples,
                seed=settings.seed,
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
