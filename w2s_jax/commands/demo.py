"""Run LightReasoner end to end on the toy reasoning world and print the result table.

On unlabeled train questions: sample -> train -> export -> eval for the shipped
base expert, + LightReasoner, + rejection-sampled SFT, and the ablations without
step selection and without contrast; all scored on the same held-out test
problems. Writes report.json, report.md and report.png into --out; re-running on
the same --out resumes.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from w2s_jax.demo import DemoSettings
    from w2s_jax.settings import add_arguments as add_settings

    add_settings(parser, DemoSettings)


def run(args: argparse.Namespace) -> int:
    from w2s_jax.demo import DemoSettings, run_demo
    from w2s_jax.settings import from_namespace

    report = run_demo(from_namespace(DemoSettings, args))
    print()
    print(report["table"])
    print(f"\nwall time {report['wall_time_s']:.0f} s; report.json/.md/.png in {args.out}")
    return 0
