"""Settings of a weak-to-strong run (`w2s weak-to-strong`), declared once (`w2s_jax.settings`).

No JAX import here, so `w2s weak-to-strong --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from w2s_jax.settings import (
    allow_unused_weights_setting,
    at_least,
    check,
    comma_list,
    compute_dtype_setting,
    free_fields,
    number_in,
    record,
    setting,
)

LOSSES = ("xent", "logconf", "product")
# Settings that shape only the strong models: a run may reuse the weak side of another
# run that differs in these (--weak-from).
STRONG_ONLY = (
    "strong",
    "mode",
    "learning_rate",
    "epochs",
    "losses",
    "aux_coef",
    "warmup_frac",
    "warmup",
    "product_alpha",
    "product_beta",
    "weak_from",
)
MODES = ("full", "lora", "head")  # w2s_jax.models.classifier.MODES
TOY_WORLD = Path(__file__).resolve().parents[1] / "assets" / "toy_world"


def _positive(value):
    return None if 0 < value < math.inf else "must be a finite number > 0"


def weak_model_setting():
    """`--weak DIR`, shared by the classifier and the generative weak-to-strong runs."""
    return setting(None, "Weak model HF folder (default: the shipped toy amateur).", metavar="DIR")


def strong_model_setting():
    """`--strong DIR`, shared by the classifier and the generative weak-to-strong runs."""
    return setting(None, "Strong model HF folder (default: the shipped toy expert).", metavar="DIR")


@dataclasses.dataclass(frozen=True)
class WeakToStrongSettings:
    """Every setting of a weak-to-strong run; defaults: the toy world within 10 minutes on
    2 CPU cores (the shipped amateur as weak, the shipped expert as strong)."""

    out: str = setting("w2s_out", "Output folder (resumable).", metavar="DIR", free=True)
    weak: str | None = weak_model_setting()
    strong: str | None = strong_model_setting()
    data: str | None = setting(
        None,
        "Labelled training JSONL: {id, label, text} or {id, label, prompt, completion} "
        "(default: the toy world's items, see --toy-unit).",
        metavar="FILE",
    )
    test_data: str | None = setting(
        None,
        "Labelled test JSONL (default with --data: --test-items records held out of it).",
        metavar="FILE",
    )
    weak_from: str | None = setting(
        None,
        "Reuse another run's (its --out) halves, weak classifier, weak labels and weak "
        "scores; every setting but the strong model's must match.",
        metavar="DIR",
    )
    num_classes: int = setting(2, "Classes of the task (labels are 0..C-1).", check=at_least(2))
    train_items: int = setting(
        4000, "Toy world: training items (split into the two halves).", check=at_least(4)
    )
    test_items: int = setting(
        1000, "Test items (toy world; or held out of --data).", check=at_least(1)
    )
    slip_rate: float = setting(
        0.5, "Toy world: share of carries forgotten in a wrong solution.", check=number_in(0, 1)
    )
    toy_eval_split: str = setting(
        "test",
        "Toy world: the split scored (test for reported runs, validation to calibrate).",
        choices=("test", "validation"),
    )
    toy_unit: str = setting(
        "step",
        "Toy world: judge a solution step cut after the digit a slip changes (text) or a "
        "whole worked solution (prompt + completion).",
        choices=("step", "solution"),
    )
    seeds: int = setting(
        1, "Repeat with seeds 0..N-1 (split, order, init).", check=at_least(1), free=True
    )
    losses: tuple[str, ...] = setting(
        LOSSES, "Comma-separated losses to train the strong student with.", choices=LOSSES
    )
    mode: str = setting(
        "full",
        "What trains in the strong model: full, lora (adapters + head) or head (linear probe).",
        choices=MODES,
    )
    weak_mode: str = setting(
        "head",
        "What trains in the weak model (same choices as --mode). The toy pair is one size "
        "with the same latent knowledge, so its weak supervisor is a linear probe.",
        choices=MODES,
    )
    weak_learning_rate: float | None = setting(
        0.1,
        "Peak learning rate of the weak model (the default suits a linear probe, the default "
        "--weak-mode; give one with another mode; null in --config: --lr).",
        check=_positive,
        parse=float,
    )
    lora_rank: int = setting(8, "LoRA rank (--mode lora).", check=at_least(1))
    lora_alpha: float = setting(16.0, "LoRA alpha (--mode lora).", check=_positive)
    lora_targets: tuple[str, ...] = setting(
        ("q_proj", "v_proj"), "Comma-separated layers LoRA adapts (--mode lora)."
    )
    epochs: int = setting(2, "Epochs over each training set.", check=at_least(1))
    weak_epochs: int | None = setting(
        6,
        "Epochs of the weak model (null in --config: --epochs).",
        check=at_least(1),
        parse=int,
    )
    batch_size: int = setting(32, "Rows per optimizer step.", check=at_least(1))
    learning_rate: float = setting(
        1e-3,
        "Peak learning rate (AdamW, linear decay).",
        flags=("--lr", "--learning-rate"),
        check=_positive,
    )
    warmup_steps: int = setting(0, "Linear learning-rate warm-up steps.", check=at_least(0))
    weight_decay: float = setting(0.0, "AdamW weight decay.", check=number_in(0, math.inf))
    max_grad_norm: float = setting(1.0, "Global-norm gradient clipping.", check=_positive)
    aux_coef: float = setting(0.5, "logconf: auxiliary coefficient.", check=number_in(0, 1))
    warmup_frac: float = setting(0.1, "logconf: warm-up share of training.", check=number_in(0, 1))
    warmup: str = setting(
        "published",
        "logconf warm-up: published (c = step_frac·aux_coef until warmup_frac, then aux_coef) "
        "or linear (a ramp to aux_coef).",
        choices=("published", "linear"),
    )
    product_alpha: float = setting(1.0, "product: exponent of the weak labels.")
    product_beta: float = setting(1.0, "product: exponent of the strong predictions.")
    prompt_style: str = setting(
        "chat", "How prompt/completion records are formatted.", choices=("chat", "plain")
    )
    system_prompt: str | None = setting(
        None, "System prompt of chat-formatted records (default: the evaluation prompt)."
    )
    max_length: int = setting(
        512, "Longest sequence (longer ones keep their end).", check=at_least(2)
    )
    length_bucket: int = setting(32, "Pad lengths to a multiple of this.", check=at_least(1))
    dtype: str = compute_dtype_setting()
    mesh: str | None = setting(None, 'Device mesh, e.g. "data=2,fsdp=4".', free=True)
    progress: bool = setting(False, "Progress bars.", flags=("--progress",), free=True)
    allow_unused_weights: bool = allow_unused_weights_setting()

    def __post_init__(self):
        object.__setattr__(self, "losses", comma_list(self.losses))
        object.__setattr__(self, "lora_targets", comma_list(self.lora_targets))
        check(self)
        if not self.losses:
            raise ValueError("--losses needs at least one loss")
        if self.test_data and not self.data:
            raise ValueError("--test-data needs --data")

    @property
    def weak_dir(self) -> Path:
        return Path(self.weak) if self.weak else TOY_WORLD / "amateur"

    @property
    def strong_dir(self) -> Path:
        return Path(self.strong) if self.strong else TOY_WORLD / "expert"

    def settings(self) -> dict:
        """The recorded settings (the free ones left out), input paths made absolute."""
        free = free_fields(WeakToStrongSettings)
        values = {k: v for k, v in record(self).items() if k not in free}
        for key in ("weak", "strong", "data", "test_data", "weak_from"):
            if values[key]:
                values[key] = str(Path(values[key]).absolute())
        return values
