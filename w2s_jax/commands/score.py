"""Score training sequences with a small model for SALT's data selection (SALT_DS).

    w2s score --model SMALL --data SAMPLES --out DIR [--top-k 10]

Writes OUT/shards/*.jsonl (per record: id, salt_ds = median loss over the positions
whose true token is in the model's top-k, mean_loss, topk_hit_rate, positions),
score_config.json and summary.json; re-running on the same --out resumes. Train
with `w2s train --objective salt --kd-scores OUT --kd-data-selection top=P%`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from w2s_jax.settings import add_arguments as add_settings
    from w2s_jax.stages.score import ScoreSettings

    add_settings(parser, ScoreSettings)


def run(args: argparse.Namespace) -> int:
    from w2s_jax.settings import from_namespace
    from w2s_jax.stages.score import ScoreSettings, score

    summary = score(from_namespace(ScoreSettings, args))
    mean = summary["mean_salt_ds"]
    print(
        f"{summary['records']} records scored ({summary['records_with_score']} with a top-k "
        f"hit): mean salt_ds {mean if mean is None else f'{mean:.4f}'}, mean loss "
        f"{summary['mean_loss']:.4f}, top-k hit rate {summary['mean_topk_hit_rate']:.1%} "
        f"-> {args.out}"
    )
    return 0
