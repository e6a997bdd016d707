"""Contrastive decoding's cost: tokens/s of `Contrastive` (expert + lockstep amateur) against
plain greedy decoding of the expert alone, on the same prompts in one run.

Two pairs:
1. the shipped toy world (`w2s_jax/assets/toy_world`: expert and amateur, 1.0M
   parameters each, vocabulary 475) on its test problems, chat-formatted as `w2s eval`
   does; rows stop at their end token, so tokens/s counts the tokens each side produced;
2. random Qwen2-shaped weights at a wider vocabulary (expert 64M as in
   benchmarks/generate.py, amateur 20M, vocabulary 32768), where no row stops early.

Greedy and contrastive tokens are compared too: on the toy world the share of rows whose
answer changed, and a check that β = 0 reproduces greedy exactly.

    .venv/bin/python benchmarks/contrastive_decoding.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import machine_description, median_seconds

import w2s_jax

TOY = Path(w2s_jax.__file__).parent / "assets" / "toy_world"
# (hidden, layers, heads, kv heads, intermediate) at vocabulary 32768
RANDOM = {"expert": (640, 10, 10, 2, 1728), "amateur": (256, 4, 4, 2, 704)}


def toy_prompts(n: int):
    """(expert, amateur, prompt ids, eos ids): the toy world's first n test problems."""
    from w2s_jax.data.arithmetic import generate_split
    from w2s_jax.data.toy_tokenizer import SYSTEM_PROMPT
    from w2s_jax.models import load_pretrained, load_tokenizer
    from w2s_jax.prompts import prompt_ids, stop_ids

    tokenizer = load_tokenizer(TOY / "expert")
    models = [load_pretrained(TOY / name, dtype="float32") for name in ("expert", "amateur")]
    for model in models:
        model.restrict_vocab(len(tokenizer))
    prompts = [
        prompt_ids(tokenizer, p.question, style="chat", system_prompt=SYSTEM_PROMPT)
        for p in generate_split("test", n)
    ]
    eos = stop_ids(tokenizer, str(TOY / "expert"), models[0].config.eos_token_ids, ())
    return *models, prompts, eos


def random_pair(batch: int, prompt_len: int):
    """(expert, amateur, prompt ids, eos ids) with random weights sharing a vocabulary."""
    from w2s_jax.models import ModelConfig, init_random

    def model(shape, seed):
        hidden, layers, heads, kv, inter = shape
        config = ModelConfig.from_hf_json(
            {
                "model_type": "qwen2",
                "vocab_size": 32768,
                "hidden_size": hidden,
                "intermediate_size": inter,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "tie_word_embeddings": True,
                "max_position_embeddings": 4096,
            }
        )
        return init_random(config, seed=seed, dtype="float32")

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 32768, prompt_len).tolist() for _ in range(batch)]
    return model(RANDOM["expert"], 0), model(RANDOM["amateur"], 1), prompts, [2]


def measure(label, expert, amateur, prompts, eos, max_new, reps) -> dict:
    """Median tokens/s of greedy and contrastive decoding of the same prompts."""
    from w2s_jax.decoding import Contrastive
    from w2s_jax.generate import generate

    kwargs = dict(max_new_tokens=max_new, eos_ids=eos)
    runs = {
        "greedy": lambda: generate(expert, prompts, **kwargs),
        "contrastive": lambda: generate(
            expert, prompts, mode=Contrastive(), amateur=amateur, **kwargs
        ),
    }
    out = {}
    for name, run in runs.items():
        result = run()
        seconds = median_seconds(run, reps)
        tokens = int(result.lengths.sum())
        out[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
        out[name]["result"] = result
    g, c = out["greedy"], out["contrastive"]
    print(
        f"{label}: greedy {g['tokens_per_s']:.1f} tokens/s ({g['tokens']} tokens, "
        f"{g['seconds']:.3f} s); contrastive {c['tokens_per_s']:.1f} tokens/s ({c['tokens']} "
        f"tokens, {c['seconds']:.3f} s); contrastive/greedy throughput "
        f"{c['tokens_per_s'] / g['tokens_per_s']:.2f}x"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    from w2s_jax.decoding import Contrastive
    from w2s_jax.generate import generate

    print(machine_description())
    expert, amateur, prompts, eos = toy_prompts(args.batch)
    toy = measure("toy world", expert, amateur, prompts, eos, args.max_new_tokens, args.reps)
    greedy, cd = toy["greedy"]["result"], toy["contrastive"]["result"]
    changed = np.mean([(a != b).any() for a, b in zip(greedy.tokens, cd.tokens, strict=True)])
    beta0 = generate(
        expert,
        prompts,
        max_new_tokens=args.max_new_tokens,
        eos_ids=eos,
        mode=Contrastive(beta=0.0),
        amateur=amateur,
    )
    print(
        f"toy world: {100 * changed:.0f}% of rows decode differently under contrastive "
        f"decoding; beta=0 equals greedy: {np.array_equal(beta0.tokens, greedy.tokens)}"
    )
    expert, amateur, prompts, eos = random_pair(args.batch, 100)
    measure("random 64M/20M, vocab 32768", expert, amateur, prompts, eos, 128, args.reps)


if __name__ == "__main__":
    main()
