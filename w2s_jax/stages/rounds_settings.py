"""Settings of a rounds run (`w2s lightreasoner`): N rounds of sample -> train -> export -> eval.

The stage defaults are shared with the stages' own settings (`default_of`), not copied.
No JAX import, so `w2s lightreasoner --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from w2s_jax.eval_settings import EvalSettings
from w2s_jax.prompts import PROMPT_STYLES
from w2s_jax.settings import (
    DTYPES,
    at_least,
    check,
    comma_list,
    compute_dtype_setting,
    default_of,
    free_fields,
    number_in,
    param_dtype_setting,
    record,
    setting,
)
from w2s_jax.stages.sample_settings import SampleSettings
from w2s_jax.train_config import TrainSettings

# fixed: --amateur every round; base: the original expert E_1 from round 2 on;
# previous: round r-1's expert E_{r-1} from round 2 on. Round 1 always uses --amateur.
AMATEUR_RULES = ("fixed", "base", "previous")
# Inputs recorded as absolute paths, so a resumed run may be started from another folder.
_PATHS = ("expert", "amateur", "data", "eval_data")


def _sample(name: str):
    return default_of(SampleSettings, name)


def _train(name: str):
    return default_of(TrainSettings, name)


@dataclasses.dataclass(frozen=True)
class RoundsSettings:
    """Every setting of a rounds run; `free` ones may change when it resumes."""

    expert: str | None = setting(
        None, "Round 1's expert E_1: a Hugging Face folder.", metavar="DIR", required=True
    )
    amateur: str | None = setting(
        None,
        "The amateur of round 1 (every rule) and of every round with --amateur-rule fixed: "
        "a Hugging Face folder sharing the expert's tokenizer.",
        metavar="DIR",
        required=True,
    )
    amateur_rule: str = setting(
        "fixed",
        "The amateur of round r >= 2: fixed (--amateur), base (E_1, the original expert) or "
        "previous (E_{r-1}, the expert of the round before).",
        choices=AMATEUR_RULES,
    )
    rounds: int = setting(
        2, "Rounds to run; may grow when a finished run is resumed.", check=at_least(1), free=True
    )
    data: str | None = setting(
        None,
        "Unlabeled train questions (JSONL), sampled every round.",
        metavar="FILE",
        required=True,
    )
    eval_data: str | None = setting(
        None, "Held-out questions with gold answers (JSONL).", metavar="FILE", required=True
    )
    out: str | None = setting(
        None, "Output folder (resumable).", metavar="DIR", required=True, free=True
    )
    max_questions: int | None = setting(
        None, "Sample the first N questions only.", parse=int, check=at_least(1)
    )
    eval_max_questions: int | None = setting(
        None, "Score the first N held-out questions only.", parse=int, check=at_least(1)
    )
    # sampling (LightReasoner's defaults, docs/METHOD.md §1)
    alpha: float = setting(
        _sample("alpha"), "Plausibility ratio α.", check=number_in(0, 1, open_low=True)
    )
    beta: float = setting(_sample("beta"), "KL threshold β.", check=number_in(0, math.inf))
    top_k: int = setting(_sample("top_k"), "Most tokens per target.", check=at_least(1))
    max_new_tokens: int = setting(_sample("max_new_tokens"), "Rollout length.", check=at_least(1))
    system_prompt: str = setting(
        _sample("system_prompt"), "System turn of the chat prompt (sampling and eval)."
    )
    prompt_style: str = setting(
        _sample("prompt_style"), "chat template or plain text.", choices=PROMPT_STYLES
    )
    # training: a fresh LoRA on each round's expert
    lora_rank: int = setting(_train("lora_rank"), "LoRA rank.", check=at_least(1))
    lora_alpha: float = setting(_train("lora_alpha"), "LoRA alpha.", check=number_in(0, math.inf))
    lora_targets: tuple[str, ...] = setting(
        _train("lora_targets"), "Comma-separated layers LoRA adapts."
    )
    learning_rate: float = setting(
        _train("learning_rate"),
        "Peak learning rate (AdamW, linear decay).",
        flags=("--lr", "--learning-rate"),
        check=number_in(0, math.inf, open_low=True),
    )
    steps: int = setting(_train("steps"), "Optimizer steps per round.", check=at_least(1))
    batch_positions: int = setting(
        _train("batch_positions"), "Supervised positions per step.", check=at_least(1)
    )
    grad_accum: int = setting(_train("grad_accum"), "Micro-batches per step.", check=at_least(1))
    length_bucket: int = setting(
        _train("length_bucket"), "Training length padding.", check=at_least(1)
    )
    seed: int = setting(
        _train("seed"), "Round r trains with seed + r - 1 (adapter init, dropout, data order)."
    )
    dtype: str = compute_dtype_setting()
    param_dtype: str | None = param_dtype_setting()
    # evaluation
    eval_max_new_tokens: int = setting(
        default_of(EvalSettings, "max_new_tokens"), "Most new tokens per answer.", check=at_least(1)
    )
    batch_size: int = setting(
        _sample("batch_size"), "Questions per sampling batch.", check=at_least(1), free=True
    )
    eval_batch_size: int = setting(
        default_of(EvalSettings, "batch_size"),
        "Questions per eval batch.",
        check=at_least(1),
        free=True,
    )
    save_every: int = setting(
        _train("save_every"), "Training checkpoint every N steps.", check=at_least(1), free=True
    )
    progress: bool = setting(True, "No progress bars.", flags=("--no-progress",), free=True)

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", comma_list(self.lora_targets))
        check(self)
        if not self.lora_targets:
            raise ValueError("--lora-targets names no layer")
        if self.batch_positions % self.grad_accum:
            raise ValueError(
                f"--batch-positions ({self.batch_positions}) must be a multiple of "
                f"--grad-accum ({self.grad_accum})"
            )
        if self.param_dtype is not None and self.param_dtype not in DTYPES:
            raise ValueError(f"--param-dtype must be one of {', '.join(DTYPES)}")

    def check_inputs(self) -> None:
        """ValueError naming the first input path that is missing or of the wrong kind."""
        for name in ("expert", "amateur"):
            folder = Path(getattr(self, name))
            if not (folder / "config.json").is_file():
                raise ValueError(f"--{name} {folder} is not a model folder (no config.json)")
        for name in ("data", "eval_data"):
            path = Path(getattr(self, name))
            if not path.is_file():
                raise ValueError(f"--{name.replace('_', '-')} {path} is not a file")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")

    def settings(self) -> dict:
        """The recorded settings (free ones left out; input paths absolute)."""
        free = free_fields(RoundsSettings)
        values = {k: v for k, v in record(self).items() if k not in free}
        for key in _PATHS:
            values[key] = str(Path(values[key]).absolute())
        return values
