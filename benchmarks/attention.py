"""Attention implementations side by side on this machine: reference vs xla (and cudnn on a GPU).

Qwen2.5-Math-1.5B's attention shape (12 query heads, 2 KV heads, head_dim 128) on
inputs as `Attention` holds them: fresh keys/values [B, T, K, D] for a prefill, the KV
cache as stored ([B, K, D, S] keys, [B, K, S, D] values) for a decoding step, which
the fused kernels must first transpose to [B, S, K, D]. Medians after a compile.

    python benchmarks/attention.py [--batch 4] [--prefill 512] [--cache 2048] [--reps 5]
"""

from __future__ import annotations

import argparse

from common import machine_description, median_seconds

HEADS, KV_HEADS, HEAD_DIM = 12, 2, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=512, help="prefill length T = S")
    parser.add_argument("--cache", type=int, default=2048, help="cache slots S of a decode step")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    import jax

    print(machine_description())
    impls = ["reference", "xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    for name, t, s in (("prefill", args.prefill, args.prefill), ("decode", 1, args.cache)):
        calls = {impl: _call(impl, args.batch, t, s, args.dtype) for impl in impls}
        seconds = {impl: median_seconds(fn, args.reps) for impl, fn in calls.items()}
        row = ", ".join(f"{impl} {1e3 * sec:.2f} ms" for impl, sec in seconds.items())
        ratio = seconds["xla"] / seconds["reference"]
        print(f"{name} B={args.batch} T={t} S={s} {args.dtype}: {row}; xla/reference {ratio:.2f}")


def _call(impl: str, b: int, t: int, s: int, dtype: str):
    """A no-argument function running one attention call of `impl` to completion."""
    import jax
    import jax.numpy as jnp

    from w2s_jax.models import attention_kernels as kernels
    from w2s_jax.models.attention import cache_layout, kernel_layout

    keys = jax.random.split(jax.random.key(0), 3)
    q_bthd = jax.random.normal(keys[0], (b, t, HEADS, HEAD_DIM), dtype)
    k_bskd = jax.random.normal(keys[1], (b, s, KV_HEADS, HEAD_DIM), dtype)
    v_bskd = jax.random.normal(keys[2], (b, s, KV_HEADS, HEAD_DIM), dtype)
    mask_bts = jnp.tril(jnp.ones((t, s), bool), k=s - t)[None].repeat(b, axis=0)
    if t == 1:  # a decoding step reads the cache as stored
        k_in, v_in = k_bskd.transpose(0, 2, 3, 1), v_bskd.transpose(0, 2, 1, 3)
    else:
        k_in, v_in = k_bskd, v_bskd

    @jax.jit
    def run(q_bthd, k_in, v_in, mask_bts):
        if impl == "reference":
            k_bkds, v_bksd = (k_in, v_in) if t == 1 else cache_layout(k_in, v_in)
            return kernels.reference_attention(q_bthd, k_bkds, v_bksd, mask_bts)
        k_bskd, v_bskd = (k_in, v_in) if t > 1 else kernel_layout((k_in, v_in))
        return kernels.fused_attention(impl, q_bthd, k_bskd, v_bskd, mask_bts)

    return lambda: run(q_bthd, k_in, v_in, mask_bts).block_until_ready()


if __name__ == "__main__":
    main()
