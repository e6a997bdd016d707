"""Benchmark w2s_jax.divergence: per-token KL speed, and the memory of naive vs fused paths.

Part "speed": ``token_kl`` (jitted) against the published formula in PyTorch eager
(softmax, +1e-12, ``F.kl_div``) and a numpy float32 log-softmax, on the same float32
logits, with the achieved read bandwidth against a plain memory copy of the same bytes.

Part "memory": KL + contrastive target + contrastive loss (forward and backward) from
hidden states, three ways: naive (materialized [B, T, V] logits), chunked (materialized
logits, divergences computed chunk by chunk) and fused (logits formed block by block
from hidden states and the LM head, recomputed in the backward pass). Reports XLA's
compiled temporary memory at full size (compile only) and, at a smaller size that runs
quickly, the process peak RSS (each path in its own process), median time and values.

    .venv/bin/python benchmarks/divergence.py            # both parts, ~4 minutes on 2 cores
    .venv/bin/python benchmarks/divergence.py --part speed --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from common import machine_description, median_seconds

SPEED_SHAPES = [(16, 128, 32000), (4, 256, 151936)]
ALPHA, BETA, K = 0.2, 0.4, 16
D_EXPERT, D_AMATEUR, VOCAB = 1536, 896, 151936  # Qwen2.5-Math-1.5B / Qwen2.5-0.5B


# --- part 1: token_kl speed -------------------------------------------------------------


def published_kl_torch(p, q):
    """The reference's formula, batched: KL of softmaxes with 1e-12 added to both."""
    import torch.nn.functional as F

    pe = F.softmax(p, dim=-1) + 1e-12
    pa = F.softmax(q, dim=-1) + 1e-12
    return F.kl_div(pa.log(), pe, reduction="none").sum(-1)


def kl_numpy(p, q):
    def log_softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    logp, logq = log_softmax(p), log_softmax(q)
    return (np.exp(logp) * (logp - logq)).sum(axis=-1)


def max_errors(ours, published, p, q, rows: int = 64) -> str:
    """Max |error| of ours and of the published formula against float64, on a few rows."""
    flat = (p.reshape(-1, p.shape[-1])[:rows], q.reshape(-1, q.shape[-1])[:rows])
    exact = kl_numpy(*(x.astype(np.float64) for x in flat))
    ours_err = np.abs(ours.reshape(-1)[:rows] - exact).max()
    published_err = np.abs(published.reshape(-1)[:rows] - exact).max()
    return (
        f"max |error| vs float64 on {rows} rows: ours {ours_err:.1e}, published {published_err:.1e}"
    )


def speed(reps: int, slow_reps: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print("\n## token_kl speed (float32 logits, medians)")
    for shape in SPEED_SHAPES:
        speed_one(shape, reps, slow_reps)


def speed_one(shape, reps: int, slow_reps: int) -> None:
    import jax
    import jax.numpy as jnp
    import torch

    from w2s_jax import divergence as dv

    token_kl = jax.jit(dv.token_kl)
    rng = np.random.default_rng(0)
    p = rng.standard_normal(shape, dtype=np.float32) * 3
    q = rng.standard_normal(shape, dtype=np.float32) * 3
    gigabytes = 2 * p.nbytes / 1e9
    jp, jq = jnp.asarray(p), jnp.asarray(q)
    tp, tq = torch.from_numpy(p), torch.from_numpy(q)
    errors = max_errors(np.asarray(token_kl(jp, jq)), published_kl_torch(tp, tq).numpy(), p, q)
    dst_p, dst_q = np.empty_like(p), np.empty_like(q)

    def copy():
        np.copyto(dst_p, p)
        np.copyto(dst_q, q)

    rows = {
        "w2s_jax token_kl (jit)": median_seconds(
            lambda: token_kl(jp, jq).block_until_ready(), reps
        ),
        "PyTorch eager, published formula": median_seconds(
            lambda: published_kl_torch(tp, tq), slow_reps
        ),
        "numpy float32 log-softmax": median_seconds(lambda: kl_numpy(p, q), slow_reps),
        "memory copy of the same bytes (numpy)": median_seconds(copy, reps),
    }
    torch_s = rows["PyTorch eager, published formula"]
    print(f"\nshape {shape}: {gigabytes:.2f} GB of logits read; {errors}")
    print(f"{'implementation':40s} {'median s':>9s} {'GB/s read':>10s} {'speed-up vs torch':>18s}")
    for name, seconds in rows.items():
        print(f"{name:40s} {seconds:9.4f} {gigabytes / seconds:10.2f} {torch_s / seconds:17.1f}x")


# --- part 2: memory of naive vs chunked vs fused ------------------------------------------


def make_paths(chunk_size: int):
    """The three implementations of the same work, as functions of (he, we, ha, wa)."""
    import jax
    import jax.numpy as jnp

    from w2s_jax import divergence as dv

    def logits(h, head):
        return jnp.matmul(h, head, preferred_element_type=jnp.float32)

    def naive(he, we, ha, wa):
        ze, za = logits(he, we), logits(ha, wa)
        kl = dv.token_kl(ze, za)
        ids, w = dv.contrastive_target(ze, za, ALPHA, K)
        selected = dv.select_steps(kl, BETA, None)
        loss, grad = jax.value_and_grad(
            lambda h: dv.contrastive_loss(logits(h, we), ids, w, selected)
        )(he)
        return kl, loss, grad

    def chunked(he, we, ha, wa):
        ze, za = logits(he, we), logits(ha, wa)
        kl = dv.token_kl_chunked(ze, za, chunk_size=chunk_size)
        ids, w = dv.contrastive_target_chunked(ze, za, ALPHA, K, chunk_size=chunk_size)
        selected = dv.select_steps(kl, BETA, None)
        loss, grad = jax.value_and_grad(
            lambda h: dv.contrastive_loss(logits(h, we), ids, w, selected)
        )(he)
        return kl, loss, grad

    def fused(he, we, ha, wa):
        kl, ids, w, _ = dv.fused_kl_and_target(he, we, ha, wa, ALPHA, K, chunk_size=chunk_size)
        selected = dv.select_steps(kl, BETA, None)
        loss, grad = jax.value_and_grad(
            lambda h: dv.fused_contrastive_loss(h, we, ids, w, selected, chunk_size=chunk_size)
        )(he)
        return kl, loss, grad

    return {"naive": naive, "chunked": chunked, "fused": fused}


def input_shapes(batch: int, length: int):
    import jax
    import jax.numpy as jnp

    bf16 = jnp.bfloat16
    return [
        jax.ShapeDtypeStruct((batch, length, D_EXPERT), bf16),
        jax.ShapeDtypeStruct((D_EXPERT, VOCAB), bf16),
        jax.ShapeDtypeStruct((batch, length, D_AMATEUR), bf16),
        jax.ShapeDtypeStruct((D_AMATEUR, VOCAB), bf16),
    ]


def compiled_temp_bytes(batch: int, length: int, chunk_size: int) -> dict[str, int]:
    import jax

    shapes = input_shapes(batch, length)
    return {
        name: jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes
        for name, fn in make_paths(chunk_size).items()
    }


def rss_kib() -> tuple[int, int]:
    """(current, peak) resident set size of this process in KiB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def worker(path: str, batch: int, length: int, chunk_size: int, reps: int, out: str) -> None:
    """Run one path in this process: peak RSS over the run, median time, values to `out`."""
    import jax
    import jax.numpy as jnp

    def normal(seed, shape, scale):
        # Row by row, so making the inputs does not set the RSS high-water mark.
        rng = np.random.default_rng(seed)
        rows = [
            jnp.asarray(rng.standard_normal(shape[1:], dtype=np.float32) * scale, jnp.bfloat16)
            for _ in range(shape[0])
        ]
        return jnp.stack(rows)

    he = normal(0, (batch, length, D_EXPERT), 1.0)
    we = normal(1, (D_EXPERT, VOCAB), 2.0 / D_EXPERT**0.5)
    ha = normal(2, (batch, length, D_AMATEUR), 1.0)
    wa = normal(3, (D_AMATEUR, VOCAB), 2.0 / D_AMATEUR**0.5)
    fn = jax.jit(make_paths(chunk_size)[path])
    compiled = fn.lower(he, we, ha, wa).compile()
    before, _ = rss_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark: measure the run, not the set-up
    kl, loss, grad = jax.block_until_ready(compiled(he, we, ha, wa))
    _, peak = rss_kib()
    seconds = median_seconds(lambda: jax.block_until_ready(compiled(he, we, ha, wa)), reps, 0)
    np.savez(out, kl=np.asarray(kl), loss=np.asarray(loss), grad=np.asarray(grad, np.float32))
    print(json.dumps({"rss_before_kib": before, "peak_kib": peak, "seconds": seconds}))


def memory(args) -> None:
    full = compiled_temp_bytes(args.batch, args.length, args.chunk_size)
    positions = args.batch * args.length
    logits_gib = positions * VOCAB * 4 / 2**30
    print(
        f"\n## KL + target + loss fwd/bwd from hidden states: D={D_EXPERT} (amateur "
        f"{D_AMATEUR}), V={VOCAB}, bf16 inputs, k={K}"
    )
    print(
        f"\nCompiled temporary memory (XLA memory_analysis), {positions} positions "
        f"[{args.batch}, {args.length}], chunk_size={args.chunk_size}; one float32 "
        f"logits array = {logits_gib:.2f} GiB"
    )
    for name, nbytes in full.items():
        print(f"  {name:8s} {nbytes / 2**30:8.2f} GiB   {nbytes / full['naive']:6.1%} of naive")

    run_positions = args.run_batch * args.run_length
    print(
        f"\nRun at {run_positions} positions [{args.run_batch}, {args.run_length}], "
        f"chunk_size={args.run_chunk_size}, each path in a fresh process "
        f"(compiled temp memory at this size in brackets)"
    )
    small = compiled_temp_bytes(args.run_batch, args.run_length, args.run_chunk_size)
    results, values = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("naive", "chunked", "fused"):
            out = os.path.join(tmp, f"{name}.npz")
            command = [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--run-batch",
                str(args.run_batch),
                "--run-length",
                str(args.run_length),
                "--run-chunk-size",
                str(args.run_chunk_size),
                "--slow-reps",
                str(args.slow_reps),
                "--out",
                out,
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            values[name] = dict(np.load(out))
    print(
        f"  {'path':8s} {'peak RSS growth':>16s} {'vs naive':>9s} {'median s':>9s} "
        f"{'vs naive':>9s} {'compiled temp':>14s}"
    )
    naive = results["naive"]
    naive_growth = naive["peak_kib"] - naive["rss_before_kib"]
    for name, r in results.items():
        growth = r["peak_kib"] - r["rss_before_kib"]
        print(
            f"  {name:8s} {growth / 2**20:12.2f} GiB {growth / naive_growth:9.1%} "
            f"{r['seconds']:9.2f} {r['seconds'] / naive['seconds']:8.2f}x "
            f"{small[name] / 2**30:10.2f} GiB"
        )
    ref = values["naive"]
    print(f"  values: loss {float(ref['loss']):.6f}, mean KL {float(ref['kl'].mean()):.4f}")
    for name in ("chunked", "fused"):
        diffs = {key: float(np.abs(values[name][key] - ref[key]).max()) for key in ref}
        print(f"  max |{name} - naive|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("speed", "memory", "all"), default="all")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (fast paths)")
    parser.add_argument("--slow-reps", type=int, default=3, help="timed repetitions (slow)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--run-batch", type=int, default=8)
    parser.add_argument("--run-length", type=int, default=64)
    parser.add_argument("--run-chunk-size", type=int, default=16)
    parser.add_argument("--worker", choices=("naive", "chunked", "fused"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(
            args.worker,
            args.run_batch,
            args.run_length,
            args.run_chunk_size,
            args.slow_reps,
            args.out,
        )
        return 0
    print(f"machine: {machine_description()}")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    if args.part in ("speed", "all"):
        speed(args.reps, args.slow_reps)
    if args.part in ("memory", "all"):
        memory(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
