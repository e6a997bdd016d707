"""Run the whole method end to end on the toy reasoning world."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="Output folder.")


def run(args: argparse.Namespace) -> int:
    print(
        f"w2s demo: the end-to-end demo arrives with the toy reasoning world (issue 8); "
        f"nothing written to {args.out}."
    )
    return 0
