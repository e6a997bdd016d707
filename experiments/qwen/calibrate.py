"""Difficulty of the Qwen world's word problems, chosen on validation only.

For each candidate task (steps, digits, operations), greedy accuracy of a model on the
validation split's problems in the seen phrasing, with the demo's prompt and length.
The Qwen world needs a task where the base 1.5B expert sits between 30% and 70%.
Each (task, model) evaluation is a `w2s eval` run under OUT, so a re-run resumes.

    python experiments/qwen/calibrate.py --model qwen2.5-coder-1.5b-instruct \
        --tasks hard3 --questions 40 --max-new-tokens 320 --out runs/qwen-calibration
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from w2s_jax.data.arithmetic import TaskConfig
from w2s_jax.data.word_problems import word_problem_records
from w2s_jax.files import atomic_write_json, atomic_write_jsonl
from w2s_jax.models.gguf_sources import SOURCES, import_source
from w2s_jax.stages.finetune import evaluate_once

# Candidates, easiest first: the real-LM world's task, then more steps, larger numbers
# and every operation (times tables, sharing out, buying and selling).
CANDIDATES = {
    "real-lm": TaskConfig(
        min_steps=2, max_steps=3, digits=1, max_value=20, operations=("add", "sub")
    ),
    "easy": TaskConfig(
        min_steps=2, max_steps=3, digits=2, operand_digits=1, operations=("add", "sub")
    ),
    "addsub3": TaskConfig(
        min_steps=3, max_steps=4, digits=2, operand_digits=1, operations=("add", "sub")
    ),
    "addsub4": TaskConfig(
        min_steps=4, max_steps=5, digits=2, operand_digits=1, operations=("add", "sub")
    ),
    "addsub3-3d": TaskConfig(
        min_steps=3, max_steps=4, digits=3, operand_digits=2, operations=("add", "sub")
    ),
    "mid": TaskConfig(min_steps=2, max_steps=3, digits=2, operand_digits=1),
    "hard2": TaskConfig(min_steps=3, max_steps=4, digits=2, operand_digits=2),
    "hard3": TaskConfig(min_steps=3, max_steps=5, digits=3, operand_digits=2),
    "hard4": TaskConfig(min_steps=4, max_steps=6, digits=3, operand_digits=2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A named GGUF source or an HF folder.")
    parser.add_argument("--tasks", default="hard3", help="Comma-separated CANDIDATES names.")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--out", default="runs/qwen-calibration")
    args = parser.parse_args()
    out = Path(args.out)
    model = import_source(args.model) if args.model in SOURCES else Path(args.model)
    results_path = out / "calibration.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.tasks.split(","):
        data = out / f"validation-{name}.jsonl"
        records = word_problem_records(
            "validation", args.questions, seed=0, config=CANDIDATES[name], instruction=""
        )
        atomic_write_jsonl(data, records)
        start = time.perf_counter()
        summary = evaluate_once(
            out / f"{name}-{Path(args.model).name}",
            model=str(model),
            data=str(data),
            system_prompt="",
            max_new_tokens=args.max_new_tokens,
            dtype="float32",
            layer_stack="scan",
            batch_size=args.batch_size,
            progress=True,
        )
        key = f"{name}/{Path(args.model).name}"
        results[key] = {
            "task": dataclasses.asdict(CANDIDATES[name]),
            "accuracy": summary["accuracy"],
            "accuracy_text": summary["accuracy_text"],
            "max_new_tokens": args.max_new_tokens,
            "seconds": results.get(key, {}).get("seconds") or time.perf_counter() - start,
        }
        atomic_write_json(results_path, results)
        print(f"{key}: {summary['accuracy_text']}", flush=True)


if __name__ == "__main__":
    main()
