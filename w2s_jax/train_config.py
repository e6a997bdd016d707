"""Settings of a training run (`TrainConfig`) and of its LoRA adapters (`LoRAConfig`).

Plain dataclasses with checks and no JAX import, so `w2s train --help` stays fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

# Settings that do not change the trained weights; a resumed run may change them.
FREE_SETTINGS = ("out", "mesh", "save_every", "keep_checkpoints", "log_every", "progress")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank 0 means full fine-tuning (no adapters; every parameter trains)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.05

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"LoRA rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.targets:
            raise ValueError("LoRA needs at least one target module name")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, values: dict) -> LoRAConfig:
        return cls(**{**values, "targets": tuple(values.get("targets", ()))})


def parse_targets(text: str | Sequence[str]) -> tuple[str, ...]:
    """ "q_proj,v_proj" (or a list) -> ("q_proj", "v_proj")."""
    names = text.split(",") if isinstance(text, str) else list(text)
    return tuple(n.strip() for n in names if n.strip())


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; defaults are LightReasoner's published ones.

    batch_positions: supervised positions per optimizer step (the reference's batch
    of 16 one-position samples), split into grad_accum equal micro-batches.
    """

    samples: str
    out: str
    expert: str | None = None
    objective: str = "contrastive"
    init: str = "pretrained"
    model_config: str | None = None
    tokenizer: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.05
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    steps: int = 1000
    batch_positions: int = 16
    grad_accum: int = 2
    dtype: str = "auto"  # bfloat16 on GPU/TPU, float32 on CPU (w2s_jax.models.dtypes)
    loss_chunk_size: int = 0
    length_bucket: int = 64
    bucket_window: int = 64
    seed: int = 0
    mesh: str | None = None
    save_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        checks = [
            (self.objective in ("contrastive", "sft"), "objective must be contrastive or sft"),
            (self.init in ("pretrained", "random"), "init must be pretrained or random"),
            (
                self.init != "pretrained" or self.expert,
                "--expert is required with --init pretrained",
            ),
            (self.init != "random" or self.model_config, "--init random needs --model-config"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.learning_rate > 0, f"learning rate must be > 0, got {self.learning_rate}"),
            (0 <= self.warmup_steps < self.steps, "warmup steps must be in [0, steps)"),
            (self.max_grad_norm > 0, f"max grad norm must be > 0, got {self.max_grad_norm}"),
            (self.loss_chunk_size >= 0, "loss chunk size must be >= 0"),
            (self.length_bucket >= 1, "length bucket must be >= 1"),
            (
                self.grad_accum >= 1 and self.batch_positions % self.grad_accum == 0,
                f"batch positions ({self.batch_positions}) must be a positive multiple of "
                f"grad accumulation ({self.grad_accum})",
            ),
            (self.log_every >= 1, "log every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.lora  # noqa: B018 (validates the LoRA settings)

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(
            self.lora_rank, self.lora_alpha, tuple(self.lora_targets), self.lora_dropout
        )

    def settings(self) -> dict:
        """The JSON-able settings: `lora_targets` as a list, input paths made absolute."""
        values = {**dataclasses.asdict(self), "lora_targets": list(self.lora_targets)}
        for key in ("samples", "expert", "model_config", "tokenizer"):
            if values[key]:
                values[key] = str(Path(values[key]).absolute())
        return values
