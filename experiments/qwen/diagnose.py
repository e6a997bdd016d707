"""What the Qwen world's contrastive targets say, and whom the trained arms correct or mislead.

The expert's rollouts are free chat-model text, not a worked solution in a fixed style, so
the token-level "first error" of the toy and real-LM diagnoses has no reference here. This
reads a `w2s demo --world qwen` run folder and measures instead:

- on the seed's every-position samples: the share of rollout tokens the amateur could be
  aligned to (another tokenizer), the share of positions with KL > beta, and at those
  positions how often the target's top token differs from the token the expert wrote,
  split by whether the rollout's final answer is right;
- at the selected positions where the target's top token differs from the expert's, what
  kind of token the expert wrote: a number (where arithmetic goes right or wrong), LaTeX
  or markup, a word, or whitespace and punctuation;
- on the test problems, per arm and phrasing: problems the arm corrects (base wrong, arm
  right) and misleads (base right, arm wrong), with McNemar's exact p.

    .venv/bin/python experiments/qwen/diagnose.py --run runs/qwen-cpu \\
        --out experiments/qwen/diagnosis-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from w2s_jax.files import atomic_write_json, read_jsonl  # noqa: E402
from w2s_jax.grading import extract_answer, is_equiv  # noqa: E402
from w2s_jax.models import load_tokenizer  # noqa: E402
from w2s_jax.sample_store import read_manifest, read_samples  # noqa: E402


def target_statistics(seed_dir: Path, beta: float, tokenizer) -> dict:
    """Alignment, selection and top-token disagreement on the seed's samples."""
    golds = {
        r["id"]: r["answer"].rsplit("####", 1)[1].strip()
        for _, r in read_jsonl(seed_dir / "questions.jsonl")
    }
    groups = {"right": _Counts(), "wrong": _Counts()}
    kinds: dict[str, int] = {}
    examples: dict[str, list] = {}
    for record in read_samples(seed_dir / "samples"):
        text = tokenizer.decode(record["completion_ids"], skip_special_tokens=True)
        right = is_equiv(extract_answer(text), golds[record["id"]])
        groups["right" if right else "wrong"].add(record, beta)
        for wrote, target in _differing(record, beta):
            kind = _kind(tokenizer.decode([wrote]))
            kinds[kind] = kinds.get(kind, 0) + 1
            shown = examples.setdefault(kind, [])
            if len(shown) < 8:
                shown.append([tokenizer.decode([wrote]), tokenizer.decode([target])])
    total = _Counts.total(groups.values())
    manifest = read_manifest(seed_dir / "samples")
    return {
        "beta": beta,
        "all": total.summary(),
        "rollouts_right": groups["right"].summary(),
        "rollouts_wrong": groups["wrong"].summary(),
        "differing_top_token_by_kind": kinds,
        "differing_examples_wrote_vs_target": examples,
        "cross_tokenizer": manifest.get("cross_tokenizer"),
    }


def _differing(record: dict, beta: float):
    """(token the expert wrote, the target's top token) at selected positions where they
    differ."""
    kl = record["kl"]
    for j, t in enumerate(record["positions"]):
        top = record["target_ids"][j][0]
        if kl[t] > beta and top != record["completion_ids"][t]:
            yield record["completion_ids"][t], top


def _kind(text: str) -> str:
    stripped = text.strip()
    if any(c.isdigit() for c in stripped):
        return "number"
    if any(c in "\\$[]{}()*#" for c in stripped):
        return "latex_or_markup"
    if any(c.isalpha() for c in stripped):
        return "word"
    return "space_or_punctuation"


class _Counts:
    def __init__(self):
        self.rollouts = self.tokens = self.scored = self.selected = self.differs = 0
        self.kl: list[float] = []

    def add(self, record: dict, beta: float) -> None:
        kl = np.asarray(record["kl"], np.float64)
        self.rollouts += 1
        self.tokens += len(record["completion_ids"])
        for j, t in enumerate(record["positions"]):
            self.scored += 1
            self.kl.append(float(kl[t]))
            if kl[t] > beta:
                self.selected += 1
                self.differs += record["target_ids"][j][0] != record["completion_ids"][t]

    @staticmethod
    def total(parts) -> _Counts:
        total = _Counts()
        for part in parts:
            for name in ("rollouts", "tokens", "scored", "selected", "differs"):
                setattr(total, name, getattr(total, name) + getattr(part, name))
            total.kl += part.kl
        return total

    def summary(self) -> dict:
        share = lambda a, b: a / b if b else None  # noqa: E731
        return {
            "rollouts": self.rollouts,
            "rollout_tokens": self.tokens,
            "positions_scored": self.scored,
            "aligned_share": share(self.scored, self.tokens),
            "positions_selected": self.selected,
            "selected_share": share(self.selected, self.scored),
            "kl_median": float(np.median(self.kl)) if self.kl else None,
            "top_token_differs": self.differs,
            "top_token_differs_share": share(self.differs, self.selected),
        }


def corrected_and_misled(run: Path, arms: list[str]) -> dict:
    """{phrasing: {arm: counts}} against the base expert on the same problems."""
    result = {}
    for folder in ("eval", "eval-held-out"):
        base_dir = run / folder / "base"
        if not base_dir.is_dir():
            continue
        base = _correct(base_dir)
        rows = {}
        for arm in arms:
            arm_dir = run / folder / arm
            if not arm_dir.is_dir():
                arm_dir = run / "seed-0" / folder / arm
            if not (arm_dir / "predictions.jsonl").is_file():
                continue
            scored = _correct(arm_dir)
            corrected = sum(not base[i] and scored[i] for i in base)
            misled = sum(base[i] and not scored[i] for i in base)
            rows[arm] = {
                "problems": len(base),
                "base_right": sum(base.values()),
                "arm_right": sum(scored.values()),
                "corrected": corrected,
                "misled": misled,
                "mcnemar_p": _mcnemar(corrected, misled),
            }
        result[folder] = rows
    return result


def _correct(eval_dir: Path) -> dict[str, bool]:
    return {r["id"]: bool(r["correct"]) for _, r in read_jsonl(eval_dir / "predictions.jsonl")}


def _mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p: a binomial test of min(b, c) among b + c at 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a `w2s demo --world qwen` --out folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    run = Path(args.run)
    settings = json.loads((run / "demo_config.json").read_text())
    seed_dir = run / f"seed-{args.seed}"
    tokenizer = load_tokenizer(read_manifest(seed_dir / "samples")["expert"])
    result = {
        "run": str(run),
        "expert": settings["expert"],
        "amateur": settings["amateur"],
        "targets": target_statistics(seed_dir, settings["beta"], tokenizer),
        "problems": corrected_and_misled(run, [a for a in settings["arms"] if a != "base"]),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
