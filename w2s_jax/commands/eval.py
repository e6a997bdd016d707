"""Grade a model on math word problems (batched, resumable), or compare finished runs.

Evaluate:  w2s eval --model DIR [--lora CKPT] --data FILE.jsonl --out DIR
Sampled:   w2s eval ... --samples N --temperature T [--top-p P] [--seed S]  (pass@k, maj@N)
Contrastive decoding: w2s eval ... --decoding contrastive --amateur DIR [--cd-alpha A]
           [--cd-beta B] [--cd-amateur-temperature T] [--cd-form weighted|difference]
Fast engine (optional): w2s eval ... --engine openai --endpoint http://localhost:8000/v1
           [--engine-model NAME]  (an OpenAI-compatible server serving --model, e.g. vLLM)
Compare:   w2s eval --compare RUN_A RUN_B [...] --out DIR

An evaluation writes OUT/predictions.jsonl (one row per question: id, question,
output, answer, gold, correct) and OUT/summary.json; re-running on the same
--out resumes. A comparison pairs every run with the first on the same
questions: accuracy differences with a paired bootstrap 95% CI, McNemar's
p-value, a table (compare.md) and a bar chart (compare.png).
"""

from __future__ import annotations

import argparse

from w2s_jax.settings import add_arguments as add_settings
from w2s_jax.settings import from_namespace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from w2s_jax.compare import CompareSettings
    from w2s_jax.evaluate import EvalSettings

    add_settings(parser, EvalSettings)
    add_settings(parser, CompareSettings, skip=("out", "seed"))  # --seed is shared


def _compare(args: argparse.Namespace) -> int:
    from w2s_jax.compare import CompareSettings, compare

    if args.model or args.data:
        raise ValueError("--compare takes finished runs; drop --model/--data")
    report = compare(from_namespace(CompareSettings, args))
    print(report["table"])
    print(f"\n{report['questions']} questions; written to {args.out}/compare.{{json,md,png}}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from w2s_jax import sharding
    from w2s_jax.evaluate import EvalSettings, run_eval

    if not (args.model and args.data):
        raise ValueError("w2s eval needs --model and --data (or --compare RUN ...)")
    sharding.maybe_initialize_distributed()  # the processes of a launch run as one
    summary = run_eval(from_namespace(EvalSettings, args))
    no_answer = 100 * summary["no_answer_share"]
    print(
        f"accuracy {summary['accuracy_text']}; no answer in {no_answer:.1f}%; "
        f"mean output {summary['mean_output_tokens']:.1f} tokens; written to {args.out}"
    )
    if "pass_at_k" in summary:
        n, (low, high) = summary["samples"], summary["accuracy_ci95"]
        print(
            f"{n} samples per question: mean accuracy {100 * summary['accuracy']:.1f}% "
            f"(95% CI clustered by question [{100 * low:.1f}, {100 * high:.1f}]); "
            f"pass@1 {100 * summary['pass_at_k']['1']:.1f}%, "
            f"pass@{n} {100 * summary['pass_at_k'][str(n)]:.1f}%, "
            f"maj@{n} {summary['maj_at_n_text']}"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    if not args.out:
        raise ValueError("--out is required")
    return _compare(args) if args.runs else _evaluate(args)
