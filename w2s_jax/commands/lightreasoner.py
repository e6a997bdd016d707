"""LightReasoner in rounds: sample -> train -> export -> eval, N times; amateurs set by a rule.

Round 1 trains --expert (E_1) against --amateur; round r >= 2 trains E_r, round r-1's
export, against the amateur --amateur-rule names: fixed (--amateur again), base (E_1) or
previous (E_{r-1}). Round 1 always uses --amateur (under base or previous E_1 would be
its own amateur: KL 0, nothing selected). Every model is scored on --eval-data; writes
OUT/rounds.json, OUT/summary.md and OUT/rounds.png. Re-running the same command resumes
(finished rounds are skipped, an unfinished stage continues); --rounds may grow.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from w2s_jax.settings import add_arguments as add_settings
    from w2s_jax.stages.rounds_settings import RoundsSettings

    add_settings(parser, RoundsSettings)


def run(args: argparse.Namespace) -> int:
    from w2s_jax.rounds_report import summary_markdown
    from w2s_jax.settings import from_namespace
    from w2s_jax.stages.rounds import run_rounds
    from w2s_jax.stages.rounds_settings import RoundsSettings

    report = run_rounds(from_namespace(RoundsSettings, args))
    print()
    print(summary_markdown(report))
    return 0
