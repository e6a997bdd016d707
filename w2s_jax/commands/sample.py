"""LightReasoner sampling: expert rollouts scored against the amateur into contrastive targets.

Writes into --out: manifest.json (settings and fingerprints), samples/*.jsonl
(one record per question), summary.json and kl_histogram.png. Re-running on the
same --out resumes (finished questions are skipped); different settings are refused.
"""

from __future__ import annotations

import argparse

from w2s_jax.settings import add_arguments as add_settings
from w2s_jax.settings import from_namespace
from w2s_jax.stages.sample_settings import SampleSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, SampleSettings)


def run(args: argparse.Namespace) -> int:
    from w2s_jax.stages.sample import sample

    sample(from_namespace(SampleSettings, args))
    return 0
