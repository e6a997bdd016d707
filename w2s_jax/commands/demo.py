"""Run LightReasoner end to end on the toy reasoning world and print the result table.

On unlabeled train questions: sample -> train -> export -> eval for the shipped
base expert, + LightReasoner, + rejection-sampled SFT, and the ablations without
step selection and without contrast; all scored on the same held-out test
problems. Writes report.json, report.md and report.png into --out; re-running on
the same --out resumes.
"""

from __future__ import annotations

import argparse
import dataclasses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from w2s_jax.demo import SPLITS, DemoConfig

    d = DemoConfig()
    add = parser.add_argument
    add("--out", default=d.out, metavar="DIR", help="Output folder (resumable).")
    add("--seeds", type=int, default=d.seeds, help="Repeat with N seeds; reports mean ± sd.")
    add("--questions", type=int, default=d.questions, help="Unlabeled train questions per seed.")
    add("--eval-questions", type=int, default=d.eval_questions, help="Held-out problems scored.")
    add(
        "--split",
        choices=SPLITS,
        default=d.split,
        help="Held-out split scored: test (reported runs) or validation (tuning).",
    )
    add("--alpha", type=float, default=d.alpha, help="Plausibility ratio α.")
    add("--beta", type=float, default=d.beta, help="KL threshold β of step selection.")
    add("--top-k", type=int, default=d.top_k, help="Most tokens per contrastive target.")
    add("--max-new-tokens", type=int, default=d.max_new_tokens, help="Rollout/eval length.")
    add("--lora-rank", type=int, default=d.lora_rank)
    add("--lora-alpha", type=float, default=d.lora_alpha)
    add("--lr", type=float, default=d.lr, help="Peak learning rate of every trained arm.")
    add("--steps", type=int, default=d.steps, help="Optimizer steps of every trained arm.")
    add("--batch-positions", type=int, default=d.batch_positions, help="Positions per step.")
    add("--batch-size", type=int, default=d.batch_size, help="Questions per sampling/eval batch.")
    add("--lora-targets", default=d.lora_targets, help="Comma-separated layers LoRA adapts.")
    add(
        "--arms",
        default=",".join(d.arms),
        help="Comma-separated arms to run (base first): " + ", ".join(d.arms) + ".",
    )
    add("--length-bucket", type=int, default=d.length_bucket, help="Training length padding.")
    add("--expert", metavar="DIR", help="Expert HF folder (default: the shipped toy expert).")
    add("--amateur", metavar="DIR", help="Amateur HF folder (default: the shipped toy amateur).")
    add("--progress", action="store_true", help="Progress bars of training and evaluation.")


def run(args: argparse.Namespace) -> int:
    from w2s_jax.demo import DemoConfig, run_demo

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    try:
        values = {k: v for k, v in vars(args).items() if k in fields}
        values["arms"] = tuple(a.strip() for a in values["arms"].split(",") if a.strip())
        config = DemoConfig(**values)
        report = run_demo(config)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print()
    print(report["table"])
    print(f"\nwall time {report['wall_time_s']:.0f} s; report.json/.md/.png in {args.out}")
    return 0
