"""Grouped-query attention with RoPE and a KV cache; the math in `attention_kernels`.

`ModelConfig.attention` picks the implementation of calls with several queries per row
(prefill, scoring, training): "reference" (hand-written, tuned for XLA:CPU; the reference of
the tests), "xla" and "cudnn" (`jax.nn.dot_product_attention`), "splash" (the Pallas TPU
kernel), or "auto" (per backend: `attention_kernels.AUTO_ATTENTION`). Decoding steps take the
reference path whatever the choice (`attention_kernels.DECODE` says why).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from w2s_jax.models import attention_kernels as kernels
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.primitives import RMSNorm
from w2s_jax.models.primitives import linear as _linear
from w2s_jax.models.rope import apply_rope
from w2s_jax.sharding import constrain

# Logical axes of queries [B, T, N, D] and of keys and values [B, T, K, D].
QUERY_HEADS = ("batch", "length", "heads", "head_dim")
KV_HEADS = ("batch", "length", "kv_heads", "head_dim")

# One layer's KV cache: keys [B, num_kv_heads, head_dim, S] and values [B, num_kv_heads, S,
# head_dim]. Heads first and keys transposed, so both attention products are plain
# [rows, d] x [d, s] and [rows, s] x [s, d] matmuls over the cache as stored (XLA:CPU decode
# ~6x faster than [B, S, K, D]; the key transpose alone ~14% of attention).
LayerCache = tuple[jax.Array, jax.Array]


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional q/k/v/o biases and q/k RMSNorm."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = _linear(c, rngs, c.hidden_size, q_dim, c.qkv_bias)
        self.k_proj = _linear(c, rngs, c.hidden_size, kv_dim, c.qkv_bias)
        self.v_proj = _linear(c, rngs, c.hidden_size, kv_dim, c.qkv_bias)
        self.o_proj = _linear(c, rngs, q_dim, c.hidden_size, c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=jnp.dtype(c.weights_dtype))
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=jnp.dtype(c.weights_dtype))
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.qk_norm = c.qk_norm
        self.attention = c.attention

    def __call__(self, x_btd, cos_btd, sin_btd, mask_bts, cache=None, cache_index=None):
        """Attend; with `cache`, write this step's keys/values at slot `cache_index` first.

        mask_bts: bool, True where query t may attend to key slot s. Returns
        (output_btd, updated cache or None).
        """
        b, t, _ = x_btd.shape
        q_bthd, k_btkd, v_btkd = self._project(x_btd, cos_btd, sin_btd)
        impl = kernels.choose(
            self.attention,
            backend=jax.default_backend(),
            dtype=q_bthd.dtype,
            t=t,
            s=mask_bts.shape[2],
            head_dim=self.head_dim,
        )
        if cache is not None:
            cache = _write_cache(cache, k_btkd, v_btkd, cache_index)
        if impl == "reference":
            k_bkds, v_bksd = cache_layout(k_btkd, v_btkd) if cache is None else cache
            out_bthd = kernels.reference_attention(q_bthd, k_bkds, v_bksd, mask_bts)
        else:
            k_bskd, v_bskd = (k_btkd, v_btkd)  # the fused kernels read [B, S, K, D]
            if cache is not None:
                k_bskd, v_bskd = kernel_layout(cache)
            out_bthd = kernels.fused_attention(impl, q_bthd, k_bskd, v_bskd, mask_bts)
        out_bthd = constrain(out_bthd, QUERY_HEADS)
        return self.o_proj(out_bthd.reshape(b, t, -1)), cache

    def _project(self, x_btd, cos_btd, sin_btd):
        """Queries [B, T, N, D], keys and values [B, T, K, D], RoPE (and q/k norms) applied."""
        b, t, _ = x_btd.shape
        q_bthd = self.q_proj(x_btd).reshape(b, t, self.num_heads, self.head_dim)
        k_btkd = self.k_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        v_btkd = self.v_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q_bthd, k_btkd = self.q_norm(q_bthd), self.k_norm(k_btkd)
        q_bthd, k_btkd = apply_rope(q_bthd, cos_btd, sin_btd), apply_rope(k_btkd, cos_btd, sin_btd)
        return (
            constrain(q_bthd, QUERY_HEADS),
            constrain(k_btkd, KV_HEADS),
            constrain(v_btkd, KV_HEADS),
        )


def cache_layout(k_btkd, v_btkd) -> LayerCache:
    """Keys [B, K, D, T] and values [B, K, T, D], as the KV cache stores them."""
    return k_btkd.transpose(0, 2, 3, 1), v_btkd.transpose(0, 2, 1, 3)


def kernel_layout(cache: LayerCache):
    """The cache's keys and values as [B, S, K, D], the layout the fused kernels read."""
    return cache[0].transpose(0, 3, 1, 2), cache[1].transpose(0, 2, 1, 3)


def _write_cache(cache: LayerCache, k_btkd, v_btkd, cache_index) -> LayerCache:
    """`cache` with these keys/values written at slots cache_index .. cache_index + T - 1."""
    cache_k, cache_v = cache
    k_bkdt, v_bktd = cache_layout(k_btkd, v_btkd)
    return (
        jax.lax.dynamic_update_slice(cache_k, k_bkdt.astype(cache_k.dtype), (0, 0, 0, cache_index)),
        jax.lax.dynamic_update_slice(cache_v, v_bktd.astype(cache_v.dtype), (0, 0, cache_index, 0)),
    )
