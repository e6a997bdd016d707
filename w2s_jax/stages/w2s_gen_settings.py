"""Settings of a generative weak-to-strong run (`w2s weak-to-strong-gen`), declared once.

No JAX import here, so `w2s weak-to-strong-gen --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from w2s_jax.prompts import PROMPT_STYLES
from w2s_jax.settings import (
    at_least,
    check,
    comma_list,
    compute_dtype_setting,
    free_fields,
    number_in,
    record,
    setting,
)
from w2s_jax.stages.w2s_settings import TOY_WORLD, strong_model_setting, weak_model_setting

FILTERS = ("none", "agreement", "logprob")


@dataclasses.dataclass(frozen=True)
class GenerativeW2SSettings:
    """Every setting of a generative weak-to-strong run; defaults: the toy world (the
    shipped amateur as weak, the shipped expert as strong)."""

    out: str = setting("w2s_gen_out", "Output folder (resumable).", metavar="DIR", free=True)
    weak: str | None = weak_model_setting()
    strong: str | None = strong_model_setting()
    data: str | None = setting(
        None,
        'Training JSONL {id, question, answer}, answer a worked solution ending "#### N" '
        "(default: the toy world's train problems).",
        metavar="FILE",
    )
    test_data: str | None = setting(
        None, "Test JSONL in the same form (needed with --data).", metavar="FILE"
    )
    train_questions: int = setting(
        1024, "Toy world: train problems (split into the two halves).", check=at_least(4)
    )
    test_questions: int = setting(1000, "Toy world: problems scored.", check=at_least(1))
    toy_eval_split: str = setting(
        "test",
        "Toy world: the split scored (test for reported runs, validation to calibrate).",
        choices=("test", "validation"),
    )
    seeds: int = setting(
        1, "Repeat with seeds 0..N-1 (split, sampling, LoRA init).", check=at_least(1), free=True
    )
    samples: int = setting(
        1, "Weak solutions per half-2 question: 1 greedy, k > 1 sampled.", check=at_least(1)
    )
    temperature: float = setting(
        0.7, "Sampling temperature (--samples > 1).", check=number_in(0, math.inf, open_low=True)
    )
    filter: str = setting(
        "none",
        "Confidence filter of the weak solutions: agreement (share of the k samples giving "
        "the majority answer) or logprob (the solution's mean token log-prob).",
        choices=FILTERS,
    )
    min_agreement: float = setting(
        0.6, "--filter agreement: keep a question at this agreement or more.", check=number_in(0, 1)
    )
    min_logprob: float = setting(
        -0.015,
        "--filter logprob: keep a solution at this mean token log-prob or more (the "
        "default, chosen on the toy weak model's half-2 solutions of seed 0, keeps about "
        "60 percent of them).",
    )
    steps: int = setting(100, "LoRA SFT steps of every trained model.", check=at_least(1))
    batch_positions: int = setting(256, "Supervised tokens per step.", check=at_least(1))
    lora_rank: int = setting(8, "LoRA rank.", check=at_least(1))
    lora_alpha: float = setting(16.0, "LoRA alpha.")
    lora_targets: tuple[str, ...] = setting(
        ("q_proj", "v_proj"), "Comma-separated layers LoRA adapts."
    )
    learning_rate: float = setting(5e-4, "Peak learning rate.", flags=("--lr", "--learning-rate"))
    length_bucket: int = setting(64, "Training length padding.", check=at_least(1))
    max_new_tokens: int = setting(96, "Most new tokens of a solution.", check=at_least(1))
    prompt_style: str = setting("chat", "chat template or plain text.", choices=PROMPT_STYLES)
    system_prompt: str | None = setting(
        None, "System turn (default: the toy world's, or `w2s eval`'s with --data)."
    )
    dtype: str = compute_dtype_setting()
    batch_size: int = setting(64, "Questions per decoding batch.", check=at_least(1), free=True)
    progress: bool = setting(False, "Progress bars.", flags=("--progress",), free=True)

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", comma_list(self.lora_targets))
        check(self)
        if bool(self.data) != bool(self.test_data):
            raise ValueError("--data and --test-data go together")
        if self.filter == "agreement" and self.samples < 2:
            raise ValueError("--filter agreement needs --samples 2 or more")

    @property
    def weak_dir(self) -> Path:
        return Path(self.weak) if self.weak else TOY_WORLD / "amateur"

    @property
    def strong_dir(self) -> Path:
        return Path(self.strong) if self.strong else TOY_WORLD / "expert"

    @property
    def prompt(self) -> str:
        """The system turn of every prompt (training, solutions, evaluation)."""
        from w2s_jax.data.toy_tokenizer import SYSTEM_PROMPT
        from w2s_jax.prompts import EVAL_SYSTEM_PROMPT

        if self.system_prompt is not None:
            return self.system_prompt
        return EVAL_SYSTEM_PROMPT if self.data else SYSTEM_PROMPT

    def settings(self) -> dict:
        """The recorded settings (the free ones left out), input paths made absolute."""
        free = free_fields(GenerativeW2SSettings)
        values = {k: v for k, v in record(self).items() if k not in free}
        for key in ("weak", "strong", "data", "test_data"):
            if values[key]:
                values[key] = str(Path(values[key]).absolute())
        return values
