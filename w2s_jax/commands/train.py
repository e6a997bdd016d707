"""Fine-tune the expert on `w2s sample` targets with LoRA (packed, sharded, resumable).

Writes into --out: train_config.json, checkpoints/<step>/ (adapters or all
parameters, optimizer state, data position), metrics.jsonl, tensorboard/,
loss_curve.png and summary.json. Re-running on the same --out resumes from the
latest checkpoint; SIGTERM saves a checkpoint and exits (status 143).
Defaults are LightReasoner's published ones.
"""

from __future__ import annotations

import argparse
import dataclasses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from w2s_jax.train_config import TrainConfig

    d = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(TrainConfig)})
    add = parser.add_argument
    add("--expert", metavar="DIR", help="HF model folder to fine-tune (--init pretrained).")
    add("--samples", required=True, metavar="DIR", help="A `w2s sample` --out folder.")
    add("--out", required=True, metavar="DIR", help="Output folder (resumable).")
    add(
        "--objective",
        choices=("contrastive", "sft"),
        default=d.objective,
        help="contrastive: soft CE on the selected positions' targets; sft: next-token CE on "
        "every completion token (prompt masked).",
    )
    add(
        "--init",
        choices=("pretrained", "random"),
        default=d.init,
        help="random: train from scratch with --model-config (use --lora-rank 0).",
    )
    add("--model-config", metavar="FILE", help="HF config.json for --init random.")
    add(
        "--tokenizer",
        metavar="DIR",
        help="Tokenizer folder recorded for export (default --expert).",
    )
    add("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank; 0 = full fine-tuning.")
    add("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha (scale alpha/rank).")
    add(
        "--lora-targets",
        default=",".join(d.lora_targets),
        help="Comma-separated names of the linear layers to adapt.",
    )
    add("--lora-dropout", type=float, default=d.lora_dropout, help="Dropout on the LoRA input.")
    add(
        "--lr",
        "--learning-rate",
        dest="learning_rate",
        type=float,
        default=d.learning_rate,
        help="Peak learning rate (AdamW), decayed linearly to 0.",
    )
    add("--warmup-steps", type=int, default=d.warmup_steps, help="Linear warm-up steps.")
    add("--weight-decay", type=float, default=d.weight_decay)
    add("--adam-b1", type=float, default=d.adam_b1)
    add("--adam-b2", type=float, default=d.adam_b2)
    add("--adam-eps", type=float, default=d.adam_eps)
    add("--max-grad-norm", type=float, default=d.max_grad_norm, help="Global-norm clipping.")
    add("--steps", type=int, default=d.steps, help="Optimizer steps.")
    add(
        "--batch-positions",
        type=int,
        default=d.batch_positions,
        help="Supervised positions per optimizer step (the reference's batch size).",
    )
    add(
        "--grad-accum",
        type=int,
        default=d.grad_accum,
        help="Micro-batches per step (gradient accumulation).",
    )
    add(
        "--dtype",
        default=d.dtype,
        help="Model compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU; the default), "
        "float32 or bfloat16. LoRA adapters and their optimizer state stay float32.",
    )
    add(
        "--loss-chunk-size",
        type=int,
        default=d.loss_chunk_size,
        help="Project positions onto the vocabulary this many at a time (0: all at once).",
    )
    add(
        "--length-bucket",
        type=int,
        default=d.length_bucket,
        help="Pad sequence lengths to a multiple of this (fewer compilations).",
    )
    add(
        "--bucket-window",
        type=int,
        default=d.bucket_window,
        help="Trajectories sorted by length within windows of this many.",
    )
    add("--seed", type=int, default=d.seed)
    add("--mesh", default=None, help='Device mesh, e.g. "data=2,fsdp=4"; default all on data.')
    add("--save-every", type=int, default=d.save_every, help="Checkpoint every N steps.")
    add("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="Keep the last K.")
    add("--log-every", type=int, default=d.log_every, help="Metrics every N steps.")
    add("--no-progress", dest="progress", action="store_false", help="No progress bar.")


def run(args: argparse.Namespace) -> int:
    from w2s_jax import sharding

    sharding.maybe_initialize_distributed()
    from w2s_jax.train import train
    from w2s_jax.train_config import TrainConfig, parse_targets

    fields = {f for f in TrainConfig.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["lora_targets"] = parse_targets(values["lora_targets"])
    try:
        summary = train(TrainConfig(**values))
    except (ValueError, FileNotFoundError) as exc:  # DataError, ConfigError, CheckpointError
        raise SystemExit(f"error: {exc}") from None
    final = summary["final"] or {}
    print(
        f"step {summary['steps']}: loss {final.get('loss', float('nan')):.4f}, "
        f"KL {final.get('kl', float('nan')):.4f}, agreement {final.get('agreement', 0):.1%} "
        f"-> {summary['checkpoint']}"
    )
    if summary["stopped"]:
        print(f"stopped early; re-run the same command to resume from step {summary['steps']}")
        return 143
    return 0
