"""Fine-tune the expert on `w2s sample` targets with LoRA (packed, sharded, resumable).

Writes into --out: train_config.json, checkpoints/<step>/ (adapters or all
parameters, optimizer state, data position), metrics.jsonl, tensorboard/,
loss_curve.png and summary.json. Re-running on the same --out resumes from the
latest checkpoint; SIGTERM saves a checkpoint and exits (status 143).
Defaults are LightReasoner's published ones.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from w2s_jax.settings import add_arguments as add_settings
    from w2s_jax.train_config import TrainSettings

    add_settings(parser, TrainSettings)


def run(args: argparse.Namespace) -> int:
    from w2s_jax import sharding
    from w2s_jax.settings import from_namespace
    from w2s_jax.train import train
    from w2s_jax.train_config import TrainSettings

    settings = from_namespace(TrainSettings, args)
    sharding.maybe_initialize_distributed()
    summary = train(settings)
    final = summary["final"] or {}
    shown = [f"loss {final.get('loss', float('nan')):.4f}"]
    if "kd" in final:  # salt
        shown.append(f"CE {final['ce']:.4f}, KD {final['kd']:.4f} (weight {final['kd_weight']:g})")
    else:
        shown.append(f"KL {final.get('kl', float('nan')):.4f}")
        shown.append(f"agreement {final.get('agreement', 0):.1%}")
        if "anchor_kl" in final:
            shown.append(f"KL to the base {final['anchor_kl']:.4f}")
    print(f"step {summary['steps']}: {', '.join(shown)} -> {summary['checkpoint']}")
    if summary["stopped"]:
        print(f"stopped early; re-run the same command to resume from step {summary['steps']}")
        return 143
    return 0
