"""Weak-to-strong generalization (Burns et al., 2023): weak labels, the three losses, PGR.

Splits the labelled data into two seeded halves; trains the weak model with a
classifier head on half 1's ground truth; writes its soft labels for half 2; trains
the strong model on them with each --losses loss, and the strong ceiling on half 2's
ground truth; scores all on one test split. Writes report.json, report.md and
report.png into --out (accuracy with 95% CIs, PGR per loss with bootstrap CIs);
re-running on the same --out resumes. Defaults: the toy world ("is this solution
step right so far?"; the shipped expert is strong, a linear probe on the shipped
amateur is the weak supervisor).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from w2s_jax.settings import add_arguments as add_settings
    from w2s_jax.stages.w2s_settings import WeakToStrongSettings

    add_settings(parser, WeakToStrongSettings)


def run(args: argparse.Namespace) -> int:
    from w2s_jax import sharding
    from w2s_jax.settings import from_namespace
    from w2s_jax.stages.w2s_settings import WeakToStrongSettings
    from w2s_jax.stages.weak_to_strong import weak_to_strong

    settings = from_namespace(WeakToStrongSettings, args)
    sharding.maybe_initialize_distributed()
    report = weak_to_strong(settings)
    print()
    print(report["table"])
    print(f"\nwall time {report['wall_time_s']:.0f} s; report.json/.md/.png in {settings.out}")
    return 0
