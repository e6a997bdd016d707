"""The toy demo with two amateurs, same seeds and test set: the shipped amateur (the
expert's tokenizer) and the 384-token BPE amateur (its own, smaller vocabulary; built by
experiments/toy_world/build.py from experiments/toy_world/cross_tokenizer.json).

    .venv/bin/python experiments/toy_world/cross_tokenizer.py --out runs/toy_cross_demo \
        [--seeds 1] [--split test] [--arms base,lightreasoner,no_contrast] \
        [--amateur NAME=DIR ...] [--only NAME] [-- DEMO ARGS]

Each demo is one `w2s demo --world toy` under /usr/bin/time -v (wall time, peak RSS),
resumable. Contrastive decoding needs one tokenizer, so it is not among the arms. Writes
OUT/comparison.json and OUT/comparison.md: per amateur and arm the accuracy with its 95%
CI, the difference to the base expert with its paired bootstrap CI, the supervised tokens;
per amateur, from each seed's samples/summary.json, the positions, the aligned share and
the mapped amateur mass (cross-tokenizer only), and the share of positions selected at β.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "w2s_jax" / "assets" / "toy_world"
AMATEURS = {  # folder name under OUT: (label, amateur folder)
    "same": ("same tokenizer (shipped amateur)", ASSETS / "amateur"),
    "bpe384": ("384-token BPE (own tokenizer)", ASSETS / "amateur-bpe384"),
}
TIME_FIELDS = {
    "wall_s": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)",
    "peak_rss_kb": r"Maximum resident set size \(kbytes\): (\d+)",
}


def run_demo(amateur: Path, out: Path, args, extra: list[str]) -> dict:
    """`w2s demo` with `amateur` into `out` under /usr/bin/time -v; its wall time and RSS."""
    command = [
        "/usr/bin/time", "-v", sys.executable, "-m", "w2s_jax.cli", "demo", "--world", "toy",
        "--amateur", str(amateur), "--out", str(out), "--seeds", str(args.seeds),
        "--split", args.split, "--arms", args.arms, *extra,
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if not ((out / "report.json").is_file() and (out / "time.txt").is_file()):
        with open(out / "time.txt", "w") as stderr:  # a finished run keeps its first timing
            subprocess.run(command, check=True, cwd=REPO, stderr=stderr)
    text = (out / "time.txt").read_text()
    found = {k: re.search(p, text) for k, p in TIME_FIELDS.items()}
    clock = [float(x) for x in found["wall_s"].group(1).split(":")]
    wall = sum(v * 60**i for i, v in enumerate(reversed(clock)))
    return {"wall_s": wall, "peak_rss_mb": int(found["peak_rss_kb"].group(1)) / 1024}


def sample_figures(out: Path, seeds: int, report: dict) -> list[dict]:
    """Per seed: the samples' summary figures and the share of positions LightReasoner
    selected (its supervised tokens over the positions, and over the aligned ones)."""
    rows = {r["arm"]: r for r in report["arms"]}
    figures = []
    for seed in range(seeds):
        summary = json.loads((out / f"seed-{seed}" / "samples" / "summary.json").read_text())
        selected = rows["lightreasoner"]["per_seed"][seed]["supervised_tokens"]
        entry = {"seed": seed, "positions": summary["positions"], "selected": selected}
        cross = summary.get("cross_tokenizer")  # absent for a same-tokenizer amateur
        if cross is not None:
            entry["cross_tokenizer"] = cross
        aligned = cross["aligned_positions"] if cross else summary["positions"]
        entry["selected_share"] = selected / summary["positions"]
        entry["selected_share_of_aligned"] = selected / aligned if aligned else None
        entry["targets"] = target_counts(out, seed)
        figures.append(entry)
    return figures


def target_counts(out: Path, seed: int) -> dict:
    """At the positions LightReasoner selects (KL > β), up to the rollout's first error
    (its first token off the reference solution): does the contrastive target's top token
    turn a wrong expert token into the right one (corrected), or a right one into another
    (misled)? Positions after the first error have no reference and are only counted."""
    from w2s_jax.data.arithmetic import generate_split
    from w2s_jax.demo_worlds import toy_task
    from w2s_jax.models import load_tokenizer
    from w2s_jax.prompts import end_of_turn_id
    from w2s_jax.sample_store import read_samples

    expert = ASSETS / "expert"
    tokenizer, settings = load_tokenizer(expert), json.loads((out / "demo_config.json").read_text())
    # the demo's unlabeled questions (seed 1000 + seed), with their worked solutions
    task = toy_task(expert)
    problems = generate_split("train", settings["questions"], seed=1000 + seed, config=task)
    references = {p.id: p.answer for p in problems}
    end, beta = end_of_turn_id(tokenizer), settings["beta"]
    counts = dict.fromkeys(("corrected", "misled", "right_kept", "wrong_kept", "after_error"), 0)
    for record in read_samples(out / f"seed-{seed}" / "samples"):
        reference = [*tokenizer(references[record["id"]])["input_ids"], end]
        ids = record["completion_ids"]
        first = next((t for t, i in enumerate(ids) if t >= len(reference) or i != reference[t]),
                     len(ids))  # fmt: skip
        for j, t in enumerate(record["positions"]):
            if record["kl"][t] is None or record["kl"][t] <= beta:
                continue
            if t > first:
                counts["after_error"] += 1
                continue
            weights = record["target_weights"][j]
            top = record["target_ids"][j][max(range(len(weights)), key=weights.__getitem__)]
            if ids[t] == reference[t]:
                counts["right_kept" if top == reference[t] else "misled"] += 1
            else:
                counts["corrected" if top == reference[t] else "wrong_kept"] += 1
    return counts


def markdown(comparison: dict) -> str:
    lines = [
        "| amateur | arm | accuracy | 95% CI | Δ vs base (pts) | 95% CI | supervised tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in comparison.items():
        for row in result["report"]["arms"]:
            low, high = (100 * x for x in row["accuracy_ci95"])
            diff = row.get("diff_mean")
            delta = f"{100 * diff:+.1f}" if diff is not None else "—"
            ci = "—"
            if diff is not None:
                ci = "[{:+.1f}, {:+.1f}]".format(*(100 * x for x in row["diff_ci95"]))
            lines.append(
                f"| {name} | {row['arm']} | {100 * row['accuracy_mean']:.1f}% | [{low:.1f}, "
                f"{high:.1f}] | {delta} | {ci} | {row['supervised_tokens_mean']:,.0f} |"
            )
    lines.append("")
    for name, result in comparison.items():
        time = result["time"]
        lines.append(f"{name}: wall {time['wall_s']:.0f} s, peak RSS {time['peak_rss_mb']:.0f} MB")
        for figures in result["samples"]:
            lines.append(f"  seed {figures['seed']}: " + json.dumps(figures))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--split", default="test", choices=("test", "validation"))
    parser.add_argument("--arms", default="base,lightreasoner,no_contrast")
    parser.add_argument("--only", action="append", help="Run this amateur's demo only.")
    parser.add_argument(
        "--amateur", action="append", default=[], metavar="NAME=DIR",
        help="One more amateur folder to compare (e.g. an unshipped one, as a diagnostic).",
    )  # fmt: skip
    parser.add_argument("extra", nargs="*", help="More `w2s demo` arguments (after --).")
    args = parser.parse_args(argv)
    from w2s_jax.files import atomic_write_json, atomic_write_text

    pairs = (a.split("=", 1) for a in args.amateur)
    amateurs = AMATEURS | {key: (key, Path(folder).resolve()) for key, folder in pairs}
    if unknown := set(args.only or ()) - set(amateurs):
        parser.error(f"--only {sorted(unknown)}: not among {sorted(amateurs)}")
    comparison = {}
    for key in args.only or amateurs:
        name, amateur = amateurs[key]
        out = args.out.resolve() / key
        time = run_demo(amateur, out, args, args.extra)
        report = json.loads((out / "report.json").read_text())
        samples = sample_figures(out, args.seeds, report)
        comparison[name] = {"amateur": str(amateur), "time": time, "report": report}
        comparison[name]["samples"] = samples
    atomic_write_json(args.out / "comparison.json", comparison)
    atomic_write_text(args.out / "comparison.md", markdown(comparison))
    print(markdown(comparison))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
