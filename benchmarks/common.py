"""Helpers shared by the benchmark scripts: median timing, machine description, matmul peak.

The scripts run as `python benchmarks/NAME.py` (from any directory), which puts this
folder first on sys.path, so they import these with `from common import ...`.
JAX and torch are imported inside the functions that use them.
"""

from __future__ import annotations

import os
import platform
import statistics
import time


def median_seconds(fn, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of `reps` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_description() -> str:
    """CPU model, core count, OS and JAX version, backend and devices, in one line."""
    import jax

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; "
        f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s), "
        f"{jax.devices()[0].device_kind})"
    )


def matmul_peak(n: int = 2048, reps: int = 5, *, backend: str = "jax") -> float:
    """Measured FLOP/s of an n x n float32 matmul (median of `reps` after one warm-up).

    `backend` is "jax" (jitted, XLA) or "torch" (eager, torch's current thread count).
    """
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        matmul = jax.jit(lambda x, y: x @ y)
        seconds = median_seconds(lambda: matmul(a, a).block_until_ready(), reps)
    elif backend == "torch":
        import torch

        b = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
        seconds = median_seconds(lambda: b @ b, reps)
    else:
        raise ValueError(f"backend must be 'jax' or 'torch', got {backend!r}")
    return 2 * n**3 / seconds
