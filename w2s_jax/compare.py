"""Comparison of finished eval runs on the same questions (`w2s eval --compare`).

Accuracies with Wilson intervals, paired differences against the first run with a
bootstrap CI and McNemar's test, a Markdown table and a bar chart. Sampled runs (N
answers per question) enter with their mean accuracy over samples (interval clustered
by question) and maj@N; a pair with a sampled run is compared on the per-question share
of correct samples (paired bootstrap over questions; McNemar needs one answer each).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from w2s_jax import stats
from w2s_jax.evaluate import rows_by_question, summarize
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


def _load_finished_run(run: str | Path) -> tuple[dict, dict[str, list[dict]]]:
    """(summary, rows by question id: one row, or a sampled run's N in sample order)."""
    run = Path(run)
    summary_path, predictions = run / "summary.json", run / "predictions.jsonl"
    if not (summary_path.is_file() and predictions.is_file()):
        raise FileNotFoundError(
            f"{run} is not a finished eval run (needs summary.json and predictions.jsonl); "
            "run or resume `w2s eval` into it first"
        )
    grouped = rows_by_question([r for _, r in read_jsonl(predictions)])
    return json.loads(summary_path.read_text()), {rows[0]["id"]: rows for rows in grouped}


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
    ax.set_ylabel("accuracy (%), 95% CI")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)


def compare(settings: CompareSettings) -> dict:
    """Compare finished runs on the same questions; every run is paired with the first.

    Writes compare.json, compare.md (the table, also returned under "table") and
    compare.png (accuracies with 95% intervals) into `settings.out`.
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
        differ = [i for i in ids if rows[i][0]["gold"] != base_rows[i][0]["gold"]]
        if differ:
            raise ValueError(
                f"{run} and {runs[0]} have different gold answers, e.g. id {differ[0]!r}"
            )
    results = [
        _entry(label, run, [rows[i] for i in ids], loaded[0][1], ids, settings)
        for label, run, (_, rows) in zip(labels, runs, loaded, strict=True)
    ]
    results[0].pop("vs_first")
    table = _table(results, labels[0])
    out = Path(out)
    report = {"questions": len(ids), "baseline": labels[0], "runs": results, "table": table}
    atomic_write_json(out / "compare.json", report)
    atomic_write_text(out / "compare.md", table + "\n")
    _save_bar_chart(labels, results, out / "compare.png")
    return report


def _entry(label, run, groups: list[list[dict]], base: dict, ids: list, settings) -> dict:
    """One run's accuracy (and maj@N if sampled) and its paired difference to the base."""
    summary = summarize([row for rows in groups for row in rows])
    keys = ("accuracy", "accuracy_text", "accuracy_ci95", "correct", "total", "maj_at_n_text")
    entry = {"label": label, "run": str(run), "samples": len(groups[0])}
    entry |= {k: summary[k] for k in keys if k in summary}
    base_groups = [base[i] for i in ids]
    if len(groups[0]) == len(base_groups[0]) == 1:
        correct_a = [bool(rows[0]["correct"]) for rows in base_groups]
        correct_b = [bool(rows[0]["correct"]) for rows in groups]
        boot = stats.paired_bootstrap_diff(
            correct_a, correct_b, n_resamples=settings.bootstrap_resamples, seed=settings.seed
        )
        test = stats.mcnemar(correct_a, correct_b)
        mcnemar = {
            "only_first_correct": test.only_a,
            "only_this_correct": test.only_b,
            "mcnemar_p_exact": test.p_exact,
            "mcnemar_p_chi2": test.p_chi2,
        }
    else:
        share = lambda group: [sum(r["correct"] for r in rows) / len(rows) for rows in group]  # noqa: E731
        boot = stats.paired_bootstrap_mean_diff(
            share(base_groups),
            share(groups),
            n_resamples=settings.bootstrap_resamples,
            seed=settings.seed,
        )
        mcnemar = {"mcnemar_p_exact": None}
    entry["vs_first"] = {"diff": boot.diff, "diff_ci95": [boot.low, boot.high]} | mcnemar
    return entry


def _table(results: list[dict], baseline: str) -> str:
    """The Markdown table; with a sampled run, a maj@N column (accuracy: over all samples)."""
    sampled = any(r["samples"] > 1 for r in results)
    header = f"| run | accuracy | 95% CI | Δ vs {baseline} (pts) | 95% bootstrap CI | McNemar p |"
    lines = [header + (" maj@N |" if sampled else ""), "|---" * (6 + sampled) + "|"]
    for r in results:
        low, high = (100 * x for x in r["accuracy_ci95"])
        cells = [r["label"], r["accuracy_text"], f"[{low:.1f}, {high:.1f}]"]
        if "vs_first" in r:
            v = r["vs_first"]
            d_low, d_high = (100 * x for x in v["diff_ci95"])
            p = v["mcnemar_p_exact"]
            cells += [
                f"{100 * v['diff']:+.1f}",
                f"[{d_low:+.1f}, {d_high:+.1f}]",
                "—" if p is None else f"{p:.3g}",
            ]
        else:
            cells += ["—", "—", "—"]
        if sampled:
            cells.append(f"{r['maj_at_n_text']} (N={r['samples']})" if r["samples"] > 1 else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
