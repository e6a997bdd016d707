"""Building blocks shared by the decoder's modules: RMSNorm and the projection factory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from w2s_jax.models.config import ModelConfig


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, scaled in the input dtype (as HF); the scale is
    stored in `dtype` (the parameter dtype) and cast to the input's."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


def linear(config: ModelConfig, rngs: nnx.Rngs, d_in: int, d_out: int, bias: bool):
    """An `nnx.Linear` [in, out] computing in `config.dtype`, stored in its weights dtype."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.weights_dtype),
        kernel_init=nnx.initializers.normal(config.initializer_range),
        rngs=rngs,
    )
