"""Grouped-query attention with RoPE and a KV cache (the reference path for every backend)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from w2s_jax.models.config import ModelConfig
from w2s_jax.models.primitives import RMSNorm
from w2s_jax.models.primitives import linear as _linear
from w2s_jax.models.rope import apply_rope

# One layer's KV cache: keys [B, num_kv_heads, head_dim, S] and values [B, num_kv_heads, S,
# head_dim]. Heads first and keys transposed, so both attention products are plain
# [rows, d] x [d, s] and [rows, s] x [s, d] matmuls over the cache as stored (XLA:CPU decode
# ~6x faster than [B, S, K, D]; the key transpose alone ~14% of attention).
LayerCache = tuple[jax.Array, jax.Array]
_MASKED = -1e30  # finite, so fully masked (padding) rows stay NaN-free


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

    def __call__(self, x_btd, cos_btd, sin_btd, mask_bts, cache=None, cache_index=None):
        """Attend; with `cache`, write this step's keys/values at slot `cache_index` first.

        mask_bts: bool, True where query t may attend to key slot s. Returns
        (output_btd, updated cache or None).
        """
        b, t, _ = x_btd.shape
        q_bthd = self.q_proj(x_btd).reshape(b, t, self.num_heads, self.head_dim)
        k_btkd = self.k_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        v_btkd = self.v_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q_bthd, k_btkd = self.q_norm(q_bthd), self.k_norm(k_btkd)
        q_bthd = apply_rope(q_bthd, cos_btd, sin_btd)
        k_btkd = apply_rope(k_btkd, cos_btd, sin_btd)
        k_bkdt = k_btkd.transpose(0, 2, 3, 1)
        v_bktd = v_btkd.transpose(0, 2, 1, 3)
        if cache is not None:
            cache_k, cache_v = cache
            k_bkdt = jax.lax.dynamic_update_slice(
                cache_k, k_bkdt.astype(cache_k.dtype), (0, 0, 0, cache_index)
            )
            v_bktd = jax.lax.dynamic_update_slice(
                cache_v, v_bktd.astype(cache_v.dtype), (0, 0, cache_index, 0)
            )
            cache = (k_bkdt, v_bktd)
        # Queries grouped per KV head as rows r = (group, t): both products read the cache as
        # stored, with no transpose: batched [r, d] x [d, s] matmuls over many queries.
        kv, groups, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q_bkrd = q_bthd.reshape(b, t, kv, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, -1, d)
        # One query per row (decoding): multiply-and-reduce fusions that stream the cache
        # once; on XLA:CPU they beat batched [groups, d] x [d, s] matmuls (~10% of a step).
        f32 = jnp.float32
        if t == 1:
            products_bkrds = q_bkrd[..., None].astype(f32) * k_bkdt[:, :, None].astype(f32)
            scores_bkrs = products_bkrds.sum(axis=3) * (d**-0.5)
        else:
            scores_bkrs = jnp.einsum(
                "bkrd,bkds->bkrs", q_bkrd, k_bkdt, preferred_element_type=f32
            ) * (d**-0.5)
        scores_bkgts = scores_bkrs.reshape(b, kv, groups, t, -1)
        scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts, _MASKED)
        probs_bkrs = (
            jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bktd.dtype).reshape(scores_bkrs.shape)
        )
        if t == 1:
            products_bkrsd = probs_bkrs[..., None].astype(f32) * v_bktd[:, :, None].astype(f32)
            out_bkrd = products_bkrsd.sum(axis=3).astype(v_bktd.dtype)
        else:
            out_bkrd = jnp.einsum("bkrs,bksd->bkrd", probs_bkrs, v_bktd)
        out_btkgd = out_bkrd.reshape(b, kv, groups, t, d).transpose(0, 3, 1, 2, 4)
        return self.o_proj(out_btkgd.reshape(b, t, -1)), cache
