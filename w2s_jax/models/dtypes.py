"""The one dtype rule: `auto` is bfloat16 on GPU and TPU and float32 on the CPU.

XLA:CPU has no bfloat16 matmul: it converts every bf16 weight to float32 outside the
decode and training loops and keeps that copy for the whole program, so bf16 on the
CPU needs more memory than float32 and is slower. Asking for it explicitly there is
allowed, with one warning that gives the measured cost.
"""

from __future__ import annotations

import logging

import jax

from w2s_jax.models.config import ConfigError
from w2s_jax.settings import AUTO_DTYPE as AUTO
from w2s_jax.settings import DTYPES

logger = logging.getLogger(__name__)

ACCELERATOR_DTYPE = "bfloat16"
CPU_DTYPE = "float32"
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

    None stays None (the checkpoint's own dtype). `backend` defaults to JAX's.
    """
    if dtype is None:
        return None
    name = str(dtype)
    if name == AUTO:
        backend = backend or jax.default_backend()
        return CPU_DTYPE if backend == "cpu" else ACCELERATOR_DTYPE
    if name not in DTYPES:
        raise ConfigError(
            f"dtype {name!r} is not supported (supported: {AUTO}, {', '.join(DTYPES)})"
        )
    return name


def warn_if_slow(dtype: str | None, backend: str | None = None) -> None:
    """Warn once per process when a half-precision dtype is used on the CPU backend."""
    global _warned
    backend = backend or jax.default_backend()
    if _warned or backend != "cpu" or dtype not in ("bfloat16", "float16"):
        return
    _warned = True
    logger.warning(
        "%s on the CPU backend: %s. --dtype auto (float32 on the CPU) avoids it.",
        dtype,
        CPU_BF16_COST,
    )
