"""Grade a model on math word problems (greedy, batched, resumable), or compare finished runs.

Evaluate:  w2s eval --model DIR [--lora CKPT] --data FILE.jsonl --out DIR
Compare:   w2s eval --compare RUN_A RUN_B [...] --out DIR

An evaluation writes OUT/predictions.jsonl (one row per question: id, question,
output, answer, gold, correct) and OUT/summary.json; re-running on the same
--out resumes. A comparison pairs every run with the first on the same
questions: accuracy differences with a paired bootstrap 95% CI, McNemar's
p-value, a table (compare.md) and a bar chart (compare.png).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from w2s_jax.evaluate import DEFAULT_SYSTEM_PROMPT, PRESETS

    parser.add_argument("--out", help="Output folder (required).")
    parser.add_argument("--model", help="Hugging Face model folder to evaluate.")
    parser.add_argument(
        "--lora", help="`w2s train` checkpoint (run folder or step folder) applied to --model."
    )
    parser.add_argument("--data", help="JSONL file of questions with gold answers.")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="gsm8k",
        help="Dataset shape: gsm8k (question, answer '... #### N'), math (problem, "
        "solution with \\boxed{}), svamp (Body + Question, Answer), asdiv (body + "
        "question, answer '9 (apples)'), plain (question, answer as is). Default gsm8k.",
    )
    parser.add_argument(
        "--question-field",
        help="Field(s) holding the question; several comma-separated fields are joined.",
    )
    parser.add_argument("--answer-field", help="Field holding the gold answer.")
    parser.add_argument("--id-field", help="Field holding the question id (default: line number).")
    parser.add_argument("--prompt-style", choices=("chat", "plain"), default="chat")
    parser.add_argument(
        "--system-prompt",
        default=DEFAULT_SYSTEM_PROMPT,
        help="System turn of the chat prompt ('' for none). Default: %(default)r.",
    )
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument(
        "--eos-id",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="Another token id to stop at (repeatable), beside the tokenizer's special "
        "end tokens and the configs' eos_token_id.",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-questions", type=int, help="Evaluate only the first N questions.")
    parser.add_argument("--mesh", help="Device mesh, e.g. 'data=8' or 'data=2,tensor=4'.")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="Compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU; the default), "
        "float32, bfloat16 or float16.",
    )
    parser.add_argument(
        "--symbolic-timeout",
        type=float,
        default=5.0,
        help="Seconds allowed per symbolic (math-verify) comparison; past it, graded wrong.",
    )
    parser.add_argument(
        "--compare", nargs="+", metavar="RUN", help="Compare finished eval runs instead."
    )
    parser.add_argument(
        "--labels", nargs="+", help="Names of the compared runs (default: folder names)."
    )
    parser.add_argument("--bootstrap-resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def _compare(args: argparse.Namespace) -> int:
    from w2s_jax.evaluate import compare_runs

    if args.model or args.data:
        raise SystemExit("error: --compare takes finished runs; drop --model/--data")
    report = compare_runs(
        args.compare,
        args.out,
        labels=args.labels,
        n_resamples=args.bootstrap_resamples,
        seed=args.seed,
    )
    print(report["table"])
    print(f"\n{report['questions']} questions; written to {args.out}/compare.{{json,md,png}}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from w2s_jax.evaluate import EvalSettings, run_eval

    if not (args.model and args.data):
        raise SystemExit("error: w2s eval needs --model and --data (or --compare RUN ...)")
    fields = args.question_field
    settings = EvalSettings(
        model=args.model,
        data=args.data,
        lora=args.lora,
        preset=args.preset,
        question_fields=tuple(f.strip() for f in fields.split(",")) if fields else None,
        answer_field=args.answer_field,
        id_field=args.id_field,
        prompt_style=args.prompt_style,
        system_prompt=args.system_prompt,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        eos_ids=tuple(args.eos_id),
    )
    summary = run_eval(
        settings,
        args.out,
        batch_size=args.batch_size,
        max_questions=args.max_questions,
        mesh=args.mesh,
        symbolic_timeout=args.symbolic_timeout,
        progress=not args.no_progress,
    )
    no_answer = 100 * summary["no_answer_share"]
    print(
        f"accuracy {summary['accuracy_text']}; no answer in {no_answer:.1f}%; "
        f"mean output {summary['mean_output_tokens']:.1f} tokens; written to {args.out}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if not args.out:
        raise SystemExit("error: --out is required")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise SystemExit("error: --max-new-tokens and --batch-size must be >= 1")
    from w2s_jax.files import DataError
    from w2s_jax.models import CheckpointError, ConfigError

    try:
        return _compare(args) if args.compare else _evaluate(args)
    except (FileNotFoundError, DataError, CheckpointError, ConfigError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
