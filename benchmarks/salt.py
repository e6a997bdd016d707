"""The `salt` objective's cost: step time against `sft`, and peak memory fused vs materialized.

1. Step time (run here, random weights): the jitted training step (`make_train_step`,
   full fine-tuning, AdamW) of a Qwen2-shaped student on the same batches with
   `sft` (CE only), `salt` in its KD phase (ω > 0: the teacher's forward pass and
   the fused distillation kernel in the same step) and `salt` after it (ω = 0: the
   teacher is skipped by `lax.cond`). The extra cost of the KD phase is compared
   with the FLOP estimate teacher forward / student step = 2·N_t / (6·N_s) (N: weights
   touched per token, the vocabulary projection included).
2. Peak memory (compile only, abstract shapes, nothing runs): XLA's temporary bytes
   of the whole `salt` step with the fused kernel (`loss_chunk_size` positions of
   logits at a time) against the same step written with materialized logits
   (both models' [P, V] logits, then `token_kl` and the CE on them), at Qwen2.5-1.5B /
   Qwen2.5-0.5B shapes, and the `sft` step for reference.

    .venv/bin/python benchmarks/salt.py    # ~3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import functools

from common import machine_description

# (hidden, layers, heads, kv heads, intermediate, vocab)
TIMING = {"student": (512, 8, 8, 2, 1408, 8192), "teacher": (256, 4, 4, 2, 704, 8192)}
MEMORY = {"student": (1536, 28, 12, 2, 8960, 151936), "teacher": (896, 24, 14, 2, 4864, 151936)}


def config(shape):
    from w2s_jax.models import ModelConfig

    hidden, layers, heads, kv, inter, vocab = shape
    return ModelConfig.from_hf_json(
        {
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        }
    )


def weights_per_token(shape) -> int:
    """Weights a token's forward pass multiplies by: every matrix + the LM head."""
    hidden, layers, heads, kv, inter, vocab = shape
    head_dim = hidden // heads
    attention = hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden
    return layers * (attention + 3 * hidden * inter) + hidden * vocab


def materialized_salt_loss(model, micro, ctx, *, schedule):
    """SALT written without fused kernels: [P, V] logits of both models, then the math."""
    import jax
    import jax.numpy as jnp

    from w2s_jax.divergence import contrastive_loss, token_kl

    def logits(m):
        hidden = m.hidden_states(micro["input_ids"], micro["attention_mask"])
        return m.logits(jnp.take(hidden.reshape(-1, hidden.shape[-1]), micro["flat_index"], 0))

    zs, zt = logits(model), jax.lax.stop_gradient(logits(ctx.teacher))
    mask = jnp.ones(zs.shape[:1], bool)
    ce = contrastive_loss(zs, micro["target_ids"], micro["target_weights"], mask)
    kd = jnp.mean(token_kl(zt / schedule.temperature, zs / schedule.temperature))
    omega = schedule.omega(ctx.step)
    return (1 - omega) * ce + omega * kd, {}


def build_step(name, shapes, *, chunk, abstract, kd_steps=10**6):
    """(jitted step, state, rest) of objective `name` (sft, salt, salt-materialized);
    salt's KD phase lasts `kd_steps` steps (0: over from the start, ω = 0)."""
    import jax
    import optax
    from flax import nnx

    from w2s_jax.models import CausalLM, init_random
    from w2s_jax.objectives import Objective, get_objective
    from w2s_jax.objectives.salt import KDSchedule, salt_objective
    from w2s_jax.train import make_train_step

    def model(shape, seed):
        if abstract:
            return nnx.eval_shape(lambda: CausalLM(config(shape), rngs=nnx.Rngs(0)))
        return init_random(config(shape), seed=seed, dtype="float32")

    schedule = KDSchedule(steps=kd_steps)
    objective = {"sft": get_objective("sft"), "salt": salt_objective(schedule)}.get(name)
    if name == "salt-materialized":
        loss = functools.partial(materialized_salt_loss, schedule=schedule)
        objective = Objective(name, None, loss, lambda *_: {}, needs_teacher=True)
    graphdef, params, rest = nnx.split(model(shapes["student"], 0), nnx.Param, ...)
    teacher_graphdef = None
    if objective.needs_teacher:
        teacher_graphdef, teacher_state = nnx.split(model(shapes["teacher"], 1))
        rest = (rest, teacher_state)
    tx = optax.adamw(1e-4)
    opt_state = jax.eval_shape(tx.init, params) if abstract else tx.init(params)
    step = make_train_step(
        graphdef, tx, objective=objective, loss_chunk_size=chunk, teacher_graphdef=teacher_graphdef
    )
    return jax.jit(step, donate_argnums=(0,)), (params, opt_state), rest


def batch(rows, length, vocab, seed=0, *, abstract=False):
    """One micro-batch of full rows; every position but the last is supervised."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    positions = rows * (length - 1)
    arrays = {
        "input_ids": ((1, rows, length), np.int32),
        "attention_mask": ((1, rows, length), np.int32),
        "flat_index": ((1, positions), np.int32),
        "target_ids": ((1, positions, 1), np.int32),
        "target_weights": ((1, positions, 1), np.float32),
    }
    if abstract:
        return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in arrays.items()}
    ids = np.random.default_rng(seed).integers(0, vocab, (1, rows, length)).astype(np.int32)
    flat = np.asarray([r * length + t for r in range(rows) for t in range(length - 1)])
    return {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.ones_like(ids),
        "flat_index": jnp.asarray(flat[None], jnp.int32),
        "target_ids": jnp.asarray(ids[:, :, 1:].reshape(1, -1, 1)),
        "target_weights": jnp.ones((1, positions, 1), jnp.float32),
    }


def time_steps(rows, length, chunk, reps):
    """Median seconds per step: sft, salt (KD phase), salt with ω = 0 (after it); the
    variants' steps are interleaved so that all see the same machine load."""
    import statistics
    import time

    import jax

    data, key = batch(rows, length, TIMING["student"][-1]), jax.random.key(0)
    runs = {}
    for name, kd_steps in (("sft", 0), ("salt", 10**6), ("salt after KD", 0)):
        step, state, rest = build_step(
            name.split()[0], TIMING, chunk=chunk, abstract=False, kd_steps=kd_steps
        )
        runs[name] = [step, state, rest]
    times = {name: [] for name in runs}
    for rep in range(reps + 2):  # two warm-up rounds
        for name, run in runs.items():
            step, state, rest = run
            start = time.perf_counter()
            run[1], metrics = step(state, rest, data, key)
            jax.block_until_ready(metrics)
            if rep >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_gib(name, rows, length, chunk):
    """XLA temporary bytes (GiB) of the whole step at the MEMORY shapes, compile only."""
    import jax

    step, state, rest = build_step(name, MEMORY, chunk=chunk, abstract=True)
    data = batch(rows, length, MEMORY["student"][-1], abstract=True)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    compiled = step.lower(state, rest, data, key).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**30


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=257)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--memory-rows", type=int, default=4)
    parser.add_argument("--memory-length", type=int, default=1024)
    parser.add_argument("--memory-chunk", type=int, default=256)
    args = parser.parse_args()
    print(machine_description())
    n_s, n_t = (weights_per_token(TIMING[k]) for k in ("student", "teacher"))
    seconds = time_steps(args.rows, args.length, args.chunk, args.reps)
    tokens = args.rows * args.length
    print(f"\nstep time, {args.rows} x {args.length} tokens, chunk {args.chunk}, float32")
    print(f"weights per token: student {n_s / 1e6:.1f}M, teacher {n_t / 1e6:.1f}M")
    for name, s in seconds.items():
        ratio = s / seconds["sft"]
        print(f"  {name:14s} {s:.3f} s/step  {tokens / s:8.0f} tokens/s  {ratio:.3f}x sft")
    print(
        f"  KD-phase overhead: measured {seconds['salt'] / seconds['sft'] - 1:+.1%}, "
        f"FLOP estimate 2N_t/6N_s = {n_t / (3 * n_s):+.1%}"
    )
    print(
        f"\npeak XLA temporaries, {args.memory_rows} x {args.memory_length} tokens, "
        "Qwen2.5-1.5B student / 0.5B teacher shapes, float32, full fine-tuning"
    )
    for name, chunk in (
        ("sft", args.memory_chunk),
        ("salt", args.memory_chunk),
        ("salt-materialized", 0),
    ):
        gib = peak_gib(name, args.memory_rows, args.memory_length, chunk)
        shown = f"chunk {chunk}" if chunk else "materialized [P, V]"
        print(f"  {name:18s} {shown:20s} {gib:7.2f} GiB")


if __name__ == "__main__":
    main()
