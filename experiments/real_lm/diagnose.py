"""Do the real-LM world's contrastive targets correct the expert, or mislead it?

The real-LM counterpart of experiments/toy_world/diagnose_targets.py (same counts, same
code): on the expert's rollouts in a `w2s sample` folder over train questions of the
demo's task, positions before the first token that leaves the worked solution are ones
the expert gets right, the first divergence is its first error; at the selected
positions (KL > β) the target corrects the first error when its top token is the right
one, and misleads a right position when its top token is not the expert's.

    .venv/bin/python experiments/real_lm/diagnose.py --run demo_out/seed-0 \\
        --expert demo_out/models/expert --amateur demo_out/models/amateur-slips \\
        --data-seed 1000 --out diagnosis.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from experiments.toy_world.diagnose_targets import diagnose, log_probs  # noqa: E402
from w2s_jax.data.arithmetic import generate_split  # noqa: E402
from w2s_jax.data.word_problems import worked_solution  # noqa: E402
from w2s_jax.demo_worlds import REAL_LM_TASK  # noqa: E402
from w2s_jax.files import atomic_write_json  # noqa: E402
from w2s_jax.models import load_pretrained, load_tokenizer  # noqa: E402
from w2s_jax.prompts import end_of_turn_id  # noqa: E402
from w2s_jax.sample_store import read_samples  # noqa: E402


def rollouts(samples: Path, tokenizer, data_seed: int) -> list[dict]:
    """Each rollout with its worked solution's ids and its first divergence (None: none);
    the problems are regenerated from the train split with `data_seed` (what
    `w2s demo` writes for seed k: 1000 + k)."""
    records = list(read_samples(samples))
    problems = generate_split("train", len(records), seed=data_seed, config=REAL_LM_TASK)
    by_id = {p.id: p for p in problems}
    end = end_of_turn_id(tokenizer)
    out = []
    for record in records:
        solution = worked_solution(by_id[record["id"]])
        gold = [*tokenizer(solution, add_special_tokens=False)["input_ids"], end]
        pairs = zip(record["completion_ids"], gold, strict=False)
        first = next((t for t, (a, b) in enumerate(pairs) if a != b), None)
        out.append({**record, "gold": gold, "first_error": first})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="folder with samples/ (a demo seed folder)")
    parser.add_argument("--expert", required=True)
    parser.add_argument("--amateur", action="append", required=True)
    parser.add_argument("--data-seed", type=int, default=1000)
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--beta", type=float, action="append")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.expert)
    rows = rollouts(Path(args.run) / "samples", tokenizer, args.data_seed)
    sequences = [r["prompt_ids"] + r["completion_ids"] for r in rows]
    expert_lp = log_probs(load_pretrained(args.expert, dtype="float32"), sequences)
    results = []
    for amateur in args.amateur:
        amateur_lp = log_probs(load_pretrained(amateur, dtype="float32"), sequences)
        for beta in args.beta or [0.2, 0.4]:
            stats = diagnose(rows, expert_lp, amateur_lp, args.alpha, beta)
            results.append({"amateur": amateur, "alpha": args.alpha, "beta": beta, **stats})
            print(amateur, f"β={beta:g}", stats, flush=True)
    if args.out:
        atomic_write_json(args.out, {"run": args.run, "expert": args.expert, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
