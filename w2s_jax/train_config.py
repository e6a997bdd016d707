"""Settings of a training run (`TrainSettings`) and of its LoRA adapters (`LoRAConfig`).

Plain dataclasses with checks and no JAX import, so `w2s train --help` stays fast.
`w2s train`'s flags are generated from `TrainSettings` (`w2s_jax.settings`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from w2s_jax.settings import (
    allow_unused_weights_setting,
    at_least,
    attention_setting,
    check,
    comma_list,
    compute_dtype_setting,
    free_fields,
    layer_stack_setting,
    number_in,
    param_dtype_setting,
    record,
    remat_setting,
    setting,
)


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


def _selection_share(spec: str) -> float | None:
    """top=P% -> P / 100 (in (0, 1]); None if `spec` is not of that form."""
    text = spec.strip()
    if not (text.startswith("top=") and text.endswith("%")):
        return None
    try:
        share = float(text[4:-1]) / 100.0
    except ValueError:
        return None
    return share if 0.0 < share <= 1.0 else None


def _known_objective(name):
    from w2s_jax.objectives import objective_names

    known = objective_names()
    return None if name in known else f"must be one of {', '.join(known)}"


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Every setting of a training run; defaults are LightReasoner's published ones.

    batch_positions: supervised positions per optimizer step (the reference's batch
    of 16 one-position samples), split into grad_accum equal micro-batches.
    """

    samples: str | None = setting(
        None, "A `w2s sample` --out folder.", metavar="DIR", required=True
    )
    out: str | None = setting(
        None, "Output folder (resumable).", metavar="DIR", required=True, free=True
    )
    expert: str | None = setting(
        None, "HF model folder to fine-tune (--init pretrained).", metavar="DIR"
    )
    objective: str = setting(
        "contrastive",
        "Training objective (w2s_jax.objectives): contrastive = soft CE on the selected "
        "positions' sparse targets; sft = next-token CE on every completion token "
        "(prompt masked); salt = SALT: (1-w)CE + w KD from a small --teacher for "
        "--kd-steps steps, then CE.",
        check=_known_objective,
    )
    init: str = setting(
        "pretrained",
        "random: train from scratch with --model-config (use --lora-rank 0).",
        choices=("pretrained", "random"),
    )
    model_config: str | None = setting(None, "HF config.json for --init random.", metavar="FILE")
    tokenizer: str | None = setting(
        None, "Tokenizer folder recorded for export (default --expert).", metavar="DIR"
    )
    teacher: str | None = setting(
        None,
        "HF folder of the frozen teacher (--objective salt: the small LM); it must share "
        "the student's tokenizer.",
        metavar="DIR",
    )
    kd_steps: int = setting(0, "SALT: steps of the KD phase (n_KD).", check=at_least(0))
    kd_weight: float = setting(
        0.5, "SALT: KD weight w in (1-w)CE + w KD.", check=number_in(0.0, 1.0)
    )
    kd_temperature: float = setting(
        1.0,
        "SALT: temperature of both distributions in KD.",
        check=number_in(0.0, 1e6, open_low=True),
    )
    kd_direction: str = setting(
        "forward",
        "SALT: KD divergence: forward KL(teacher||student), reverse KL, or Jensen-Shannon.",
        choices=("forward", "reverse", "js"),
    )
    kd_transition: str = setting(
        "step",
        "SALT: w stays until --kd-steps (step) or decays linearly to 0 by then (linear).",
        choices=("step", "linear"),
    )
    kd_data_selection: str | None = setting(
        None,
        "SALT_DS: top=P%% draws the KD phase from the P%% of records with the highest "
        "--kd-scores score.",
        metavar="top=P%",
        check=lambda v: None if _selection_share(v) else "must be top=P% with 0 < P <= 100",
    )
    kd_scores: str | None = setting(
        None, "SALT_DS: a `w2s score` --out folder (or its scores.jsonl).", metavar="PATH"
    )
    anchor_kl: float = setting(
        0.0,
        "KL anchor weight W (contrastive, sft): add W x KL to the base (the model with its "
        "LoRA adapters off) at the supervised positions; 0 = none.",
        check=number_in(0.0, math.inf),
    )
    anchor_direction: str = setting(
        "reverse",
        "KL anchor's direction: reverse KL(trained||base) or forward KL(base||trained).",
        choices=("reverse", "forward"),
    )
    eval_data: str | None = setting(
        None,
        "Validation questions (JSONL with gold answers) scored during training: greedy "
        "accuracy of the expert with the step's adapters; the best step goes to OUT/best.",
        metavar="FILE",
    )
    eval_every: int = setting(
        0, "Score --eval-data every N steps and at the last (0: never).", check=at_least(0)
    )
    eval_max_new_tokens: int = setting(
        256, "Validation: tokens generated per answer.", check=at_least(1)
    )
    eval_batch_size: int = setting(
        16, "Validation: questions per batch.", check=at_least(1), free=True
    )
    eval_system_prompt: str | None = setting(
        None, "Validation: the system turn (default: `w2s eval`'s)."
    )
    eval_prompt_style: str = setting(
        "chat", "Validation: chat template or plain text.", choices=("chat", "plain")
    )
    lora_rank: int = setting(8, "LoRA rank; 0 = full fine-tuning.")  # checked by LoRAConfig
    lora_alpha: float = setting(16.0, "LoRA alpha (scale alpha/rank).")
    lora_targets: tuple[str, ...] = setting(
        ("q_proj", "v_proj"), "Comma-separated names of the linear layers to adapt."
    )
    lora_dropout: float = setting(0.05, "Dropout on the LoRA input.")  # checked by LoRAConfig
    learning_rate: float = setting(
        5e-5,
        "Peak learning rate (AdamW), decayed linearly to 0.",
        flags=("--lr", "--learning-rate"),
        check=lambda v: None if 0 < v < math.inf else "must be a finite number > 0",
    )
    warmup_steps: int = setting(0, "Linear warm-up steps.", check=at_least(0))
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    adam_b1: float = setting(0.9, "AdamW beta1.")
    adam_b2: float = setting(0.999, "AdamW beta2.")
    adam_eps: float = setting(1e-8, "AdamW epsilon.")
    max_grad_norm: float = setting(
        1.0, "Global-norm clipping.", check=lambda v: None if v > 0 else "must be > 0"
    )
    steps: int = setting(1000, "Optimizer steps.", check=at_least(1))
    batch_positions: int = setting(
        16,
        "Supervised positions per optimizer step (the reference's batch size).",
        check=at_least(1),
    )
    grad_accum: int = setting(2, "Micro-batches per step (gradient accumulation).")
    dtype: str = compute_dtype_setting(" LoRA adapters and their optimizer state stay float32.")
    param_dtype: str | None = param_dtype_setting(
        "float32 master weights and AdamW state for full fine-tuning (--lora-rank 0) in "
        "half precision, else the compute dtype"
    )
    layer_stack: str = layer_stack_setting()
    remat: str = remat_setting()
    attention: str = attention_setting()
    loss_chunk_size: int = setting(
        0,
        "Project positions onto the vocabulary this many at a time (0: all at once).",
        check=at_least(0),
    )
    length_bucket: int = setting(
        64, "Pad sequence lengths to a multiple of this (fewer compilations).", check=at_least(1)
    )
    bucket_window: int = setting(
        64, "Trajectories sorted by length within windows of this many.", check=at_least(1)
    )
    seed: int = setting(0, "Seed of adapter initialisation, dropout and data order.")
    mesh: str | None = setting(
        None, 'Device mesh, e.g. "data=2,fsdp=4"; default all on data.', free=True
    )
    save_every: int = setting(100, "Checkpoint every N steps.", check=at_least(1), free=True)
    keep_checkpoints: int = setting(3, "Keep the last K.", check=at_least(1), free=True)
    log_every: int = setting(10, "Metrics every N steps.", check=at_least(1), free=True)
    progress: bool = setting(True, "No progress bar.", flags=("--no-progress",), free=True)

    allow_unused_weights: bool = allow_unused_weights_setting()

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", comma_list(self.lora_targets))
        check(self)
        rules = [
            (
                self.init != "pretrained" or self.expert,
                "--expert is required with --init pretrained",
            ),
            (self.init != "random" or self.model_config, "--init random needs --model-config"),
            (
                bool(self.kd_data_selection) == bool(self.kd_scores),
                "--kd-data-selection and --kd-scores go together",
            ),
            (self.warmup_steps < self.steps, "warmup steps must be in [0, steps)"),
            (
                not self.anchor_kl or self.objective in ("contrastive", "sft"),
                "--anchor-kl applies to the contrastive and sft objectives",
            ),
            (
                bool(self.eval_every) == bool(self.eval_data),
                "--eval-data and --eval-every N (N >= 1) go together",
            ),
            (
                not self.eval_every or (self.expert and self.lora_rank),
                "--eval-every scores the --expert with the step's LoRA adapters: it needs "
                "--expert and --lora-rank >= 1",
            ),
            (
                self.grad_accum >= 1 and self.batch_positions % self.grad_accum == 0,
                f"batch positions ({self.batch_positions}) must be a positive multiple of "
                f"grad accumulation ({self.grad_accum})",
            ),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(message)
        self.lora  # noqa: B018 (validates the LoRA settings)

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_targets, self.lora_dropout)

    @property
    def full_finetuning(self) -> bool:
        """Whether every parameter trains (--lora-rank 0): float32 master weights by default."""
        return self.lora_rank == 0

    @property
    def kd_selection_share(self) -> float | None:
        """The share of records the KD phase draws from (`--kd-data-selection`), or None."""
        return _selection_share(self.kd_data_selection) if self.kd_data_selection else None

    def settings(self) -> dict:
        """The JSON-able settings: `lora_targets` as a list, input paths made absolute; the
        anchor only when it is on (runs recorded before it existed read the same)."""
        values = record(self)
        for key in ("samples", "expert", "model_config", "tokenizer", "teacher", "kd_scores"):
            if values[key]:
                values[key] = str(Path(values[key]).absolute())
        if not self.anchor_kl:
            del values["anchor_kl"], values["anchor_direction"]
        if not self.eval_every:  # runs recorded before validation existed read the same
            for key in [k for k in values if k.startswith("eval_")]:
                del values[key]
        elif values["eval_data"]:
            values["eval_data"] = str(Path(values["eval_data"]).absolute())
        return values


# Settings that do not change the trained weights; a resumed run may change them.
FREE_SETTINGS = free_fields(TrainSettings)
