"""Do LightReasoner's targets correct the expert, or mislead it? Measured on its own rollouts.

Reads a `w2s sample` output over labelled questions (a `w2s demo` seed folder has
both: `questions.jsonl` and `samples/`; labels are used here only to judge the
targets). For each rollout, positions before the first token that leaves the
reference solution are ones the expert gets right; the first divergence is its
first error. For each amateur and each (α, β), at the selected positions (KL > β):

- error positions: how much target mass the right token gets, against the expert's
  own share of the plausible set, and how often it becomes the target's top token
  (the contrast *corrects* the expert there);
- right positions: how often the target's top token is not the expert's (right)
  token (the contrast *misleads* it there).

Amateurs: model folders, or `layers:N`, the expert cut to its first N layers (an
early-exit amateur in the spirit of DoLa, saved under --work).

    .venv/bin/python experiments/toy_world/diagnose_targets.py --run demo_out/seed-0 \\
        --amateur w2s_jax/assets/toy_world/amateur --amateur layers:2 --out diagnosis.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from w2s_jax.data.sft_records import sft_record  # noqa: E402
from w2s_jax.files import atomic_write_json, read_jsonl  # noqa: E402
from w2s_jax.models import load_pretrained, load_tokenizer  # noqa: E402
from w2s_jax.models.weaken import truncate_layers  # noqa: E402
from w2s_jax.sample_store import read_samples  # noqa: E402

SHIPPED = REPO / "w2s_jax" / "assets" / "toy_world"


def early_exit_amateur(expert: Path, layers: int, work: Path) -> Path:
    """The expert cut to its first `layers` decoder layers (same norm and head), as a folder."""
    folder = work / f"{expert.name}-first-{layers}-layers"
    if not (folder / "config.json").is_file():
        truncate_layers(expert, folder, layers)
    return folder


def log_probs(model, rows: list[list[int]]) -> np.ndarray:
    """Float32 log-softmax [N, T, V] of right-padded rows (padding never reaches real tokens)."""
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    forward = nnx.jit(lambda m, x, a: jax.nn.log_softmax(m(x, a).astype(jnp.float32), axis=-1))
    return np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))


def rollouts(run: Path, tokenizer) -> list[dict]:
    """Each rollout with its reference completion ids and first divergence (None: none)."""
    questions = {r["id"]: r for _, r in read_jsonl(run / "questions.jsonl")}
    out = []
    for record in read_samples(run / "samples"):
        q = questions[record["id"]]
        gold = sft_record(tokenizer, q["id"], q["question"], q["answer"])["completion_ids"]
        pairs = zip(record["completion_ids"], gold, strict=False)
        first = next((t for t, (a, b) in enumerate(pairs) if a != b), None)
        out.append({**record, "gold": gold, "first_error": first})
    return out


def diagnose(rows: list[dict], expert_lp: np.ndarray, amateur_lp: np.ndarray, alpha, beta):
    """The counts described in the module docstring for one amateur and one (α, β)."""
    stats = dict(errors=0, selected_errors=0, corrected=0, right_positions=0, selected_right=0)
    stats["misled"] = 0
    expert_share, target_share = [], []
    for i, row in enumerate(rows):
        start = len(row["prompt_ids"]) - 1  # logits at start + t predict completion[t]
        n = len(row["completion_ids"])
        le = expert_lp[i, start : start + n]
        la = amateur_lp[i, start : start + n]
        pe = np.exp(le)
        kl = np.sum(pe * (le - la), axis=-1)
        plausible = pe >= alpha * pe.max(axis=-1, keepdims=True)
        score = np.where(plausible, le - la, -np.inf)
        target = np.exp(score - score.max(axis=-1, keepdims=True))
        target /= target.sum(axis=-1, keepdims=True)
        end = n if row["first_error"] is None else row["first_error"]
        own = np.asarray(row["completion_ids"][:end])
        selected = kl[:end] > beta
        stats["right_positions"] += end
        stats["selected_right"] += int(selected.sum())
        stats["misled"] += int((selected & (target[:end].argmax(-1) != own)).sum())
        t = row["first_error"]
        if t is None:
            continue
        stats["errors"] += 1
        if kl[t] <= beta:
            continue
        right = row["gold"][t]
        stats["selected_errors"] += 1
        stats["corrected"] += int(target[t].argmax() == right)
        share = pe[t, right] / pe[t][plausible[t]].sum() if plausible[t, right] else 0.0
        expert_share.append(float(share))
        target_share.append(float(target[t, right]))
    stats["expert_share_of_right_token"] = float(np.mean(expert_share or [0.0]))
    stats["target_share_of_right_token"] = float(np.mean(target_share or [0.0]))
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="folder with questions.jsonl and samples/")
    parser.add_argument("--expert", default=str(SHIPPED / "expert"))
    parser.add_argument("--amateur", action="append", required=True)
    parser.add_argument("--alpha", type=float, action="append")
    parser.add_argument("--beta", type=float, action="append")
    parser.add_argument("--work", default="runs/diagnose_targets")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    alphas, betas = args.alpha or [0.2], args.beta or [0.2, 0.4]
    expert = Path(args.expert)
    tokenizer = load_tokenizer(expert)
    rows = rollouts(Path(args.run), tokenizer)
    sequences = [r["prompt_ids"] + r["completion_ids"] for r in rows]
    expert_lp = log_probs(load_pretrained(expert, dtype="float32"), sequences)
    results = []
    for name in args.amateur:
        if name.startswith("layers:"):
            folder = early_exit_amateur(expert, int(name.split(":", 1)[1]), Path(args.work))
        else:
            folder = Path(name)
        amateur_lp = log_probs(load_pretrained(folder, dtype="float32"), sequences)
        for alpha in alphas:
            for beta in betas:
                stats = diagnose(rows, expert_lp, amateur_lp, alpha, beta)
                results.append({"amateur": name, "alpha": alpha, "beta": beta, **stats})
                print(
                    f"{name} α={alpha:g} β={beta:g}: first errors {stats['errors']} "
                    f"(selected {stats['selected_errors']}): right token's share "
                    f"{stats['expert_share_of_right_token']:.3f} (expert) -> "
                    f"{stats['target_share_of_right_token']:.3f} (target), target top = right "
                    f"at {stats['corrected']}; right positions {stats['right_positions']} "
                    f"(selected {stats['selected_right']}), target top != expert's at "
                    f"{stats['misled']}",
                    flush=True,
                )
    if args.out:
        atomic_write_json(args.out, {"run": args.run, "expert": args.expert, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
