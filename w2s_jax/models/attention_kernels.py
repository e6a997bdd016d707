"""The attention math, one function per implementation, and the rule that picks one.

Every implementation computes softmax(q k^T / sqrt(d) masked by `mask_bts`) v with float32
scores and float32 softmax, grouped-query (query head h reads KV head h // groups). Rows of
`mask_bts` that allow no key at all (left padding) have no defined output: each
implementation returns some finite vector there, which feeds nothing downstream (its key
slot is padding too). Every other row is the same function in every implementation.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from w2s_jax.models.config import ConfigError

logger = logging.getLogger(__name__)

_MASKED = -1e30  # finite, so fully masked (padding) rows stay NaN-free

# backend -> (implementation for calls with several queries per row, why).
AUTO_ATTENTION = {
    "cpu": (
        "reference",
        "XLA:CPU has no fused attention kernel; the hand-written path was faster than xla in "
        "benchmarks/attention.py (prefill 1.2-1.3x, decode 1.5-3x, on 2 loaded cores)",
    ),
    "gpu": (
        "cudnn",
        "cuDNN flash attention never writes the [B, N, T, S] scores to memory",
    ),
    "tpu": (
        "splash",
        "the Pallas splash kernel never writes the [B, N, T, S] scores to memory",
    ),
}
# Where the chosen kernel cannot take the shapes or dtype: the same math as one XLA program.
FALLBACK = "xla"
# Decoding steps (one query per row) whatever the choice, and why.
DECODE = (
    "reference",
    "one query per row is a memory-bound pass over the cache: the reference path streams it "
    "once as stored, a fused kernel would first transpose the whole [B, K, D, S] cache",
)
_warned: set[tuple[str, str]] = set()


def choose(name: str, *, backend: str, dtype, t: int, s: int, head_dim: int) -> str:
    """The implementation that runs `name` ("auto" or an explicit one) on these shapes.

    A kernel that cannot take the shapes or dtype falls back to `FALLBACK` (with one
    warning when it was asked for explicitly); one for another backend is a ConfigError.
    """
    if t == 1:
        return DECODE[0]
    explicit = name != "auto"
    if not explicit:
        name = AUTO_ATTENTION.get(backend, (FALLBACK,))[0]
    if name in ("reference", "xla"):
        return name
    if name == "cudnn" and backend != "gpu" or name == "splash" and backend not in ("tpu", "cpu"):
        raise ConfigError(f"attention {name!r} does not run on the {backend} backend")
    misfit = (
        cudnn_misfit(dtype, t, s, head_dim)
        if name == "cudnn"
        else splash_misfit(t, s, head_dim, interpret=backend != "tpu")
    )
    if misfit is None:
        return name
    if explicit and (name, misfit) not in _warned:
        _warned.add((name, misfit))
        logger.warning("attention %r: %s; using %r for these calls", name, misfit, FALLBACK)
    return FALLBACK


def cudnn_misfit(dtype, t: int, s: int, head_dim: int) -> str | None:
    """Why cuDNN flash attention cannot take these (None if it can)."""
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bfloat16 or float16, not {jnp.dtype(dtype)}"
    if head_dim % 8 or head_dim > 128:
        return f"cuDNN flash attention needs head_dim <= 128 and a multiple of 8, not {head_dim}"
    if t % 2 or s % 2:
        return f"cuDNN flash attention with a mask needs even lengths, not T={t}, S={s}"
    return None


def splash_misfit(t: int, s: int, head_dim: int, *, interpret: bool) -> str | None:
    """Why the splash kernel cannot take these (None if it can)."""
    if t % 128 or s % 128:
        return f"splash attention needs lengths that are multiples of 128, not T={t}, S={s}"
    if interpret:
        return None
    if head_dim % 128:
        return f"splash attention needs head_dim a multiple of 128, not {head_dim}"
    if jax.device_count() > 1:
        # jax refuses a Mosaic kernel in a multi-device program unless it runs in a shard_map.
        return "splash attention over several devices needs a shard_map (not written yet)"
    return None


def reference_attention(q_bthd, k_bkds, v_bksd, mask_bts):
    """Attention over keys [B, K, D, S] and values [B, K, S, D] as the KV cache stores them.

    Queries grouped per KV head as rows r = (group, t): both products read the cache as
    stored, with no transpose: batched [r, d] x [d, s] matmuls over many queries.
    """
    b, t, n, d = q_bthd.shape
    kv = k_bkds.shape[1]
    groups = n // kv
    q_bkrd = q_bthd.reshape(b, t, kv, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, -1, d)
    # One query per row (decoding): multiply-and-reduce fusions that stream the cache
    # once; on XLA:CPU they beat batched [groups, d] x [d, s] matmuls (~10% of a step).
    f32, scale = jnp.float32, d**-0.5
    if t == 1:
        products_bkrds = q_bkrd[..., None].astype(f32) * k_bkds[:, :, None].astype(f32)
        scores_bkrs = products_bkrds.sum(axis=3) * scale
    else:
        scores_bkrs = jnp.einsum("bkrd,bkds->bkrs", q_bkrd, k_bkds, preferred_element_type=f32)
        scores_bkrs = scores_bkrs * scale
    scores_bkgts = scores_bkrs.reshape(b, kv, groups, t, -1)
    scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts, _MASKED)
    probs_bkrs = (
        jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bksd.dtype).reshape(scores_bkrs.shape)
    )
    if t == 1:
        products_bkrsd = probs_bkrs[..., None].astype(f32) * v_bksd[:, :, None].astype(f32)
        out_bkrd = products_bkrsd.sum(axis=3).astype(v_bksd.dtype)
    else:
        out_bkrd = jnp.einsum("bkrs,bksd->bkrd", probs_bkrs, v_bksd)
    return out_bkrd.reshape(b, kv, groups, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


def fused_attention(impl: str, q_bthd, k_bskd, v_bskd, mask_bts):
    """Attention by `impl` ("xla", "cudnn" or "splash") on keys and values [B, S, K, D]."""
    if impl == "splash":
        return splash_attention(q_bthd, k_bskd, v_bskd, mask_bts)
    return _dot_product_attention(impl, q_bthd, k_bskd, v_bskd, mask_bts)


def _dot_product_attention(impl: str, q_bthd, k_bskd, v_bskd, mask_bts):
    """`jax.nn.dot_product_attention` ("xla" or "cudnn"), the mask broadcast over heads."""
    return jax.nn.dot_product_attention(
        q_bthd, k_bskd, v_bskd, mask=mask_bts[:, None], implementation=impl
    )


def splash_attention(q_bthd, k_bskd, v_bskd, mask_bts):
    """The Pallas splash kernel where `mask_bts` is causal (bottom-right) & key padding,
    else the `FALLBACK` implementation: decided at run time, never a changed result.

    The mask becomes a static causal mask plus segment ids: keys some query may see are
    segment 1, the rest 0; a query row that may see a key is segment 1, an empty row 0
    (it then sees padding keys only, its own slot included, so its softmax stays finite).
    Off TPU the kernel runs in Pallas interpret mode (slow; for tests).
    """
    q_seg_bt, kv_seg_bs = mask_bts.any(axis=2), mask_bts.any(axis=1)
    args = (q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs)
    return jax.lax.cond(
        _splash_mask_matches(mask_bts, q_seg_bt, kv_seg_bs),
        functools.partial(_splash, interpret=jax.default_backend() != "tpu"),
        lambda q, k, v, *_: _dot_product_attention(FALLBACK, q, k, v, mask_bts),
        *args,
    )


def _splash_mask_matches(mask_bts, q_seg_bt, kv_seg_bs):
    """Whether causal & equal segment ids is `mask_bts` on every row that sees a key,
    and every empty row's own key slot is padding (segment 0)."""
    t, s = mask_bts.shape[1:]
    causal_ts = jnp.tril(jnp.ones((t, s), bool), k=s - t)
    same_bts = kv_seg_bs[:, None, :] == q_seg_bt[:, :, None]
    rows_match = jnp.where(q_seg_bt[:, :, None], (causal_ts & same_bts) == mask_bts, True)
    own_slot_padding = jnp.where(q_seg_bt, True, ~kv_seg_bs[:, s - t :])
    return rows_match.all() & own_slot_padding.all()


def _splash(q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs, *, interpret: bool):
    """The splash kernel, one batch row at a time (vmap), in the [B, T, N, D] layout."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, d = q_bthd.shape
    kernel = _splash_kernel(n, t, k_bskd.shape[1], interpret)
    q_bntd = (q_bthd * jnp.asarray(d**-0.5, q_bthd.dtype)).transpose(0, 2, 1, 3)
    segments = sk.SegmentIds(q_seg_bt.astype(jnp.int32), kv_seg_bs.astype(jnp.int32))
    out_bntd = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(
        q_bntd, k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3), segments
    )
    return out_bntd.transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, t: int, s: int, interpret: bool):
    """The splash kernel for `heads` query heads over a bottom-right causal [t, s] mask."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((t, s), offset=s - t) for _ in range(heads)])
    with jax.ensure_compile_time_eval():  # concrete block tables, even when first built under jit
        return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
