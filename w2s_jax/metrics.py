"""Training metrics: a JSONL log, TensorBoard event files and a loss-curve PNG.

`MetricsLog(out_dir, resume_step=s)` keeps the records of steps <= s from an
earlier run (a resumed run continues the same curve), rewrites OUT/metrics.jsonl
atomically at every write, and mirrors each scalar to TensorBoard
(OUT/tensorboard, via tensorboardX; events of steps > s are purged on resume).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import jax

from w2s_jax.files import atomic_save_figure, atomic_write_jsonl

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only (per run) metric records keyed by step."""

    def __init__(self, out_dir: str | Path, *, resume_step: int = 0, tensorboard: bool = True):
        from tensorboardX import SummaryWriter

        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        self.records = [r for r in self._read() if r["step"] <= resume_step]
        self._tb = None
        if tensorboard:
            with self._naming_errors():
                self._tb = SummaryWriter(
                    str(self.out_dir / "tensorboard"), purge_step=resume_step + 1
                )

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Record `metrics` at `step` (JSONL rewritten atomically, TensorBoard appended)."""
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.records.append(record)
        atomic_write_jsonl(self.path, self.records)
        if self._tb is not None:
            with self._naming_errors():
                for key, value in metrics.items():
                    self._tb.add_scalar(f"train/{key}", float(value), int(step))
                self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            with self._naming_errors():
                self._tb.close()

    @contextlib.contextmanager
    def _naming_errors(self):
        """An OSError of the TensorBoard writer (a full disk, say) names its folder."""
        try:
            yield
        except OSError as exc:
            folder = self.out_dir / "tensorboard"
            raise OSError(exc.errno, f"cannot write {folder}/: {exc.strerror or exc}") from exc

    def plot(self, path: str | Path, keys: tuple[str, ...] = ("loss", "kl")) -> None:
        """Write a PNG of `keys` against step (atomically); nothing before the first record."""
        if not self.records:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for key in keys:
            points = [
                (r["step"], r[key]) for r in self.records if key in r and math.isfinite(r[key])
            ]
            if points:
                ax.plot(
                    *zip(*points, strict=True), label=key, marker="." if len(points) < 50 else ""
                )
        ax.set_xlabel("step")
        ax.set_ylabel("nats per supervised position")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_save_figure(fig, path)
        plt.close(fig)


class StepMeter:
    """Averages step metrics between log steps and measures positions/s and tokens/s.

    The steps not logged yet travel in each checkpoint (`pending`), so a resumed run logs
    the same averages as an uninterrupted one."""

    def __init__(self, pending: list[dict] = ()):
        self.reset()
        self.metrics = [dict(m) for m in pending]

    def reset(self):
        self.metrics, self.tokens, self.positions = [], 0, 0
        self.tick = time.perf_counter()

    def add(self, metrics, *, tokens: int, positions: int):
        self.metrics.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        self.tokens += tokens
        self.positions += positions

    def values(self, lr: float) -> dict[str, float]:
        elapsed = time.perf_counter() - self.tick
        values = {k: math.fsum(m[k] for m in self.metrics) / len(self.metrics)
                  for k in self.metrics[0]}  # fmt: skip
        values.update(
            lr=lr, positions_per_s=self.positions / elapsed, tokens_per_s=self.tokens / elapsed
        )
        self.reset()
        return values
