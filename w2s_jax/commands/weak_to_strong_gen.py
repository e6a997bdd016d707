"""Weak-to-strong for reasoning: the strong model fine-tuned on the weak model's solutions.

Splits the train questions into two seeded halves; LoRA-SFTs the weak model on half
1's worked solutions; takes its greedy (or k-sampled, majority) solutions to half 2,
optionally kept only when confident (--filter agreement|logprob); LoRA-SFTs the strong
model on them (w2s) and on half 2's ground truth (ceiling), the same steps; scores
weak, strong base, w2s and ceiling with `w2s eval` on one test split; reports PGR
with a bootstrap CI. report.json, report.md and report.png go to --out; re-running
on the same --out resumes. Defaults: the toy world (amateur weak, expert strong).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from w2s_jax.settings import add_arguments as add_settings
    from w2s_jax.stages.w2s_gen_settings import GenerativeW2SSettings

    add_settings(parser, GenerativeW2SSettings)


def run(args: argparse.Namespace) -> int:
    from w2s_jax.settings import from_namespace
    from w2s_jax.stages.w2s_gen_settings import GenerativeW2SSettings
    from w2s_jax.stages.w2s_generative import weak_to_strong_gen

    settings = from_namespace(GenerativeW2SSettings, args)
    report = weak_to_strong_gen(settings)
    print()
    print(report["table"])
    print(f"\nwall time {report['wall_time_s']:.0f} s; report.json/.md/.png in {settings.out}")
    return 0
