"""What kind of arithmetic does a model get wrong? Classify every equation it wrote.

Reads the predictions.jsonl of `w2s eval` runs on toy-world problems. Each equation
"a+b=c" / "a-b=c" / "a*b=c" / "a/b=c" in an output is *right*, a *slip* (an addition
or subtraction that needed a carry or borrow, answered as if it had been forgotten:
`arithmetic.column_slip`), or *other*. Also counts, per output, what its first wrong
equation was: the errors the contrastive target has to fix.

    .venv/bin/python experiments/toy_world/classify_errors.py OUT/eval/*/predictions.jsonl
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from w2s_jax.data.arithmetic import column_slip  # noqa: E402
from w2s_jax.files import read_jsonl  # noqa: E402

EQUATION = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")
EXACT = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def classify(a: int, sign: str, b: int, c: int) -> tuple[bool, str]:
    """(whether the step carries or borrows, "right" | "slip" | "other")."""
    if sign == "/":
        return False, "right" if b and a == b * c else "other"
    exact = EXACT[sign](a, b)
    carries = sign in "+-" and column_slip(a, b, sign) != exact  # differs iff a carry happens
    if c == exact:
        return carries, "right"
    return carries, "slip" if carries and c == column_slip(a, b, sign) else "other"


def count(path: Path) -> Counter:
    counts = Counter()
    for _, row in read_jsonl(path):
        counts["outputs"] += 1
        counts["correct"] += bool(row["correct"])
        first = None
        for a, sign, b, c in EQUATION.findall(row["output"]):
            carries, kind = classify(int(a), sign, int(b), int(c))
            counts[f"{'carry' if carries else 'plain'} {kind}"] += 1
            first = first or (kind if kind != "right" else None)
        counts[f"first error {first or 'none'}"] += 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.predictions:
        c = count(path)
        carry = c["carry right"] + c["carry slip"] + c["carry other"]
        print(
            f"{path}: {c['correct']}/{c['outputs']} right; carry/borrow equations {carry}: "
            f"{c['carry right']} right, {c['carry slip']} slips, {c['carry other']} other; "
            f"other equations {c['plain right'] + c['plain other']}: {c['plain other']} wrong; "
            f"first errors: {c['first error slip']} slips, {c['first error other']} other"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
