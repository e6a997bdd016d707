"""The one dtype rule: `auto` is bfloat16 on GPU and TPU and float32 on the CPU.

XLA:CPU has no bfloat16 matmul: it converts every bf16 weight to float32 outside the
decode and training loops and keeps that copy for the whole program, so bf16 on the
CPU needs more memory than float32 and is slower. Asking for it explicitly there is
allowed, with one warning that gives the measured cost.

Parameters may be stored in another dtype than they compute in (`param_dtype`; each layer
casts its weights to the compute dtype, so gradients reach the stored ones). Full
fine-tuning in half precision keeps float32 master weights, and so float32 optimizer
state, by default: a bfloat16 weight moves only in steps of 2^-8 to 2^-7 of its size,
so an AdamW update smaller than half a step would round away.
"""

from __future__ import annotations

import dataclasses
import logging

import jax

from w2s_jax.models.config import ConfigError
from w2s_jax.settings import AUTO_DTYPE as AUTO
from w2s_jax.settings import DTYPES

logger = logging.getLogger(__name__)

ACCELERATOR_DTYPE = "bfloat16"
CPU_DTYPE = "float32"
MASTER_DTYPE = "float32"  # the weights full fine-tuning updates when it computes in half precision
HALF_DTYPES = ("bfloat16", "float16")
# Measured with benchmarks/real_scale.py at the Qwen2.5-Math-1.5B shape on XLA:CPU
# (see BENCHMARKS.md, "Real-size checkpoints").
CPU_BF16_COST = (
    "XLA:CPU keeps a float32 copy of every bfloat16 weight for the whole program "
    "(at the 1.5B shape: 5.8 GiB of temporaries to decode instead of 0.01 GiB, 11.4 GiB "
    "for a LoRA step instead of 1.1 GiB, whose peak RSS is 15.7 GiB instead of 8.2 GiB) "
    "and runs slower (a decode step 797 ms instead of 612 ms, a LoRA step 41 s instead of 22 s)"
)
_warned = False


def resolve_dtype(dtype: str | None, backend: str | None = None) -> str | None:
    """`auto` -> bfloat16 on gpu/tpu, float32 on cpu; other names are checked and kept.

    A dtype object (`jnp.float32`, `np.float32`, `np.dtype("bfloat16")`) stands for its
    name. None stays None (the checkpoint's own dtype). `backend` defaults to JAX's.
    """
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else _dtype_name(dtype)
    if name == AUTO:
        backend = backend or jax.default_backend()
        return CPU_DTYPE if backend == "cpu" else ACCELERATOR_DTYPE
    if name not in DTYPES:
        raise ConfigError(
            f"dtype {name!r} is not supported (supported: {AUTO}, {', '.join(DTYPES)})"
        )
    return name


def _dtype_name(dtype) -> str:
    """The name of a dtype object (`jnp.bfloat16` included), or its str when it is none."""
    import numpy as np

    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def default_param_dtype(dtype: str, *, master_weights: bool = False) -> str:
    """The storage dtype beside the resolved compute `dtype` when none is asked for: float32
    master weights when `master_weights` (every parameter trains) in half precision, else
    `dtype`."""
    return MASTER_DTYPE if master_weights and dtype in HALF_DTYPES else dtype


def resolve_param_dtype(
    param_dtype: str | None, dtype: str, *, master_weights: bool = False
) -> str | None:
    """`param_dtype` (checked as by `resolve_dtype`) for a run's record: None when it is the
    default (`default_param_dtype`), so equal runs record equal settings, and a run recorded
    before param_dtype existed (stored as computed, or trained as now) reads the same."""
    name = resolve_dtype(param_dtype)
    return None if name == default_param_dtype(dtype, master_weights=master_weights) else name


def resolve_dtypes(settings, *, master_weights: bool = False):
    """A stage's `settings` with `dtype` resolved and `param_dtype` resolved beside it."""
    dtype = resolve_dtype(settings.dtype)
    param_dtype = resolve_param_dtype(settings.param_dtype, dtype, master_weights=master_weights)
    return dataclasses.replace(settings, dtype=dtype, param_dtype=param_dtype)


def warn_if_slow(dtype: str | None, backend: str | None = None) -> None:
    """Warn once per process when a half-precision dtype is used on the CPU backend."""
    global _warned
    backend = backend or jax.default_backend()
    if _warned or backend != "cpu" or dtype not in HALF_DTYPES:
        return
    _warned = True
    logger.warning(
        "%s on the CPU backend: %s. --dtype auto (float32 on the CPU) avoids it.",
        dtype,
        CPU_BF16_COST,
    )
