"""Which way to treat amateur mass without an expert counterpart: `renormalize` or `residual`?

With ONE tokenizer shared by a real pair (the shipped toy-world expert and amateur), the
exact KL and targets are known. Pretend X% of the vocabulary has no counterpart (the
amateur's ids unmapped, the expert's ids unmatched) and compare what each mode of
`divergence.cross_kl_and_target` selects and targets against the exact values:

- `random`: X% of the ordinary ids drawn at random (5 seeds);
- `longest`: the X% of ordinary ids with the longest byte strings (the merges one BPE
  vocabulary has and another lacks: whole numbers, words with their space).

Per position of the expert's greedy rollouts (validation questions, the toy world's chat
prompt): selection agreement at β (the share of positions where "KL > β" is decided the
same way; precision and recall of the mode's selection), the KL's mean absolute error,
the total variation between the mode's target and the exact one at positions both
select, the share of positions left without a target, and the mapped amateur mass.

    .venv/bin/python benchmarks/cross_vocab_modes.py   # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "w2s_jax" / "assets" / "toy_world"


def rollout_logits(questions: int, new_tokens: int):
    """Expert greedy rollouts and both models' logits behind every rollout token."""
    import jax.numpy as jnp

    from w2s_jax.data.arithmetic import generate_split
    from w2s_jax.data.toy_tokenizer import SYSTEM_PROMPT
    from w2s_jax.generate import generate, left_pad, prefill
    from w2s_jax.models import load_pretrained, load_tokenizer
    from w2s_jax.prompts import prompt_ids, stop_ids
    from w2s_jax.sampling import teacher_forced_inputs

    tok = load_tokenizer(TOY / "expert")
    vocab = len(tok)
    expert = load_pretrained(TOY / "expert", dtype="float32")
    amateur = load_pretrained(TOY / "amateur", dtype="float32")
    problems = generate_split("validation", questions)
    prompts = [
        prompt_ids(tok, p.question, style="chat", system_prompt=SYSTEM_PROMPT) for p in problems
    ]
    eos = stop_ids(tok, TOY / "expert")
    result = generate(
        expert, prompts, max_new_tokens=new_tokens, eos_ids=eos, pad_id=tok.pad_token_id
    )
    completion, lengths = result.tokens.astype(np.int32), result.lengths.astype(np.int32)
    prompt_bp, mask_bp = left_pad(prompts, tok.pad_token_id)
    ids, mask, valid = teacher_forced_inputs(prompt_bp, mask_bp, completion, lengths)
    logits = []
    for model in (expert, amateur):
        hidden = prefill(model, jnp.asarray(ids), jnp.asarray(mask))[0]
        head, layout = model.lm_head_matrix()
        spec = "btd,dv->btv" if layout == "dv" else "btd,vd->btv"
        z = jnp.einsum(spec, hidden[:, prompt_bp.shape[1] - 1 :], head)[..., :vocab]
        logits.append(np.asarray(z, np.float32)[valid])
    return tok, logits[0], logits[1]


def holes(tok, share: float, scenario: str, seed: int) -> np.ndarray:
    """Ordinary ids pretended to have no counterpart."""
    from w2s_jax.vocab_map import token_bytes

    spelled = token_bytes(tok)
    ordinary = np.array([i for i, b in enumerate(spelled) if b is not None])
    count = round(share * len(ordinary))
    if scenario == "random":
        return np.random.default_rng(seed).choice(ordinary, count, replace=False)
    lengths = np.array([len(spelled[i]) for i in ordinary])
    return ordinary[np.argsort(-lengths, kind="stable")[:count]]


def sparse(ids, weights):
    out = {}
    for i, w in zip(ids.tolist(), weights.tolist(), strict=True):
        out[i] = out.get(i, 0.0) + w
    return out


def compare(exact, approx, beta):
    """Selection agreement, precision, recall, KL error, target TV, no-target share."""
    kl0, ids0, w0 = exact
    kl, ids, w, stats = approx
    valid = np.asarray(stats["has_target"])
    sel0, sel = kl0 > beta, (kl > beta) & valid
    both = np.flatnonzero(sel0 & sel)
    tv = [
        0.5
        * sum(
            abs(a.get(k, 0.0) - b.get(k, 0.0))
            for a, b in [(sparse(ids0[p], w0[p]), sparse(ids[p], w[p]))]
            for k in set(a) | set(b)
        )
        for p in both
    ]
    return {
        "agree": float((sel0 == sel).mean()),
        "precision": float(sel[sel0].sum() / max(sel.sum(), 1)),
        "recall": float(sel[sel0].sum() / max(sel0.sum(), 1)),
        "kl_mae": float(np.abs(kl - kl0).mean()),
        "tv": float(np.mean(tv)) if tv else float("nan"),
        "no_target": float(1 - valid.mean()),
        "mapped_mass": float(np.asarray(stats["mapped_mass"]).mean()),
    }


def alignment_figures(problems: int) -> None:
    """Coverage and aligned share between the toy tokenizer and retrained variants, on
    the worked solutions of validation problems (+ the end of turn), tokenizers only."""
    import tempfile

    from transformers import AutoTokenizer

    from w2s_jax.cross_scoring import TokenizerPair
    from w2s_jax.data.arithmetic import generate_split
    from w2s_jax.data.toy_tokenizer import corpus_texts, save_tokenizer, train_tokenizer
    from w2s_jax.models import load_tokenizer

    expert = load_tokenizer(TOY / "expert")
    train = generate_split("train", 2000)
    valid = generate_split("validation", problems)
    print(f"\nalignment on {problems} validation solutions (expert: the toy tokenizer)")
    print("| amateur tokenizer | expert ids mapped | question tokens mapped | aligned positions |")
    print("|---|---|---|---|")
    for name, size, split in (("512, no digit split", 512, False), ("384, digit split", 384, True)):
        with tempfile.TemporaryDirectory() as folder:
            save_tokenizer(
                train_tokenizer(corpus_texts(train), vocab_size=size, split_digits=split), folder
            )
            amateur = AutoTokenizer.from_pretrained(folder)
            pair = TokenizerPair.build(expert, amateur)
            questions = [expert(p.question, add_special_tokens=False)["input_ids"] for p in valid]
            coverage = pair.vocab_map.coverage(questions)
            aligned = total = 0
            for p in valid:
                ids = expert(p.answer, add_special_tokens=False)["input_ids"]
                columns = pair.align([*ids, expert.eos_token_id]).columns
                aligned, total = aligned + int((columns >= 0).sum()), total + len(columns)
            print(
                f"| {name} | {coverage['expert_ids']:.1%} | {coverage['token_occurrences']:.1%} "
                f"| {aligned / total:.1%} of {total} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--beta", type=float, default=0.4)
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--shares", default="0.05,0.2,0.5")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--alignment-problems", type=int, default=200)
    args = parser.parse_args()
    alignment_figures(args.alignment_problems)

    from w2s_jax import divergence

    tok, ze, za = rollout_logits(args.questions, args.new_tokens)
    exact_kl = np.asarray(divergence.token_kl(ze, za))
    ids0, w0 = divergence.contrastive_target(ze, za, args.alpha, args.top_k)
    exact = (exact_kl, np.asarray(ids0), np.asarray(w0))
    print(
        f"{ze.shape[0]} rollout positions, {len(tok)} ids, beta {args.beta}: exact selection "
        f"{(exact_kl > args.beta).mean():.1%}"
    )
    print("| unmapped | scenario | mode | selection agrees | precision | recall | KL MAE "
          "| target TV | no target | mapped mass |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for share in (float(s) for s in args.shares.split(",")):
        for scenario, seeds in (("random", args.seeds), ("longest", 1)):
            for mode in divergence.UNMAPPED_MASS_MODES:
                rows = []
                for seed in range(seeds):
                    a2e = np.arange(len(tok), dtype=np.int32)
                    a2e[holes(tok, share, scenario, seed)] = -1
                    out = divergence.cross_kl_and_target(
                        ze, za, a2e, a2e >= 0, args.alpha, args.top_k, mode=mode
                    )
                    rows.append(
                        compare(exact, [np.asarray(x) for x in out[:3]] + [out[3]], args.beta)
                    )
                m = {k: np.nanmean([r[k] for r in rows]) for k in rows[0]}
                print(
                    f"| {share:.0%} | {scenario} | {mode} | {m['agree']:.3f} | "
                    f"{m['precision']:.3f} | {m['recall']:.3f} | {m['kl_mae']:.3f} | "
                    f"{m['tv']:.3f} | {m['no_target']:.3f} | {m['mapped_mass']:.3f} |"
                )


if __name__ == "__main__":
    main()
