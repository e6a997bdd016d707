"""Settings of the sampling stage (`w2s sample`): LightReasoner's defaults (docs/METHOD.md §1)."""

from __future__ import annotations

import dataclasses
import math

from w2s_jax.prompts import PROMPT_STYLES, SAMPLE_SYSTEM_PROMPT
from w2s_jax.settings import (
    allow_unused_weights_setting,
    at_least,
    attention_setting,
    check,
    compute_dtype_setting,
    layer_stack_setting,
    number_in,
    param_dtype_setting,
    setting,
    stop_ids_setting,
)
from w2s_jax.vocab_map import UNMAPPED_MASS_MODES


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """Every setting of a sampling run; `free` ones may change when it resumes."""

    expert: str | None = setting(
        None,
        "Expert: an HF model folder, or a `w2s train` run RUN (its latest checkpoint) or "
        "RUN@STEP (its base folder plus that step's adapters).",
        metavar="SOURCE",
        required=True,
    )
    amateur: str | None = setting(
        None,
        "Amateur: an HF model folder, RUN, RUN@STEP, or `base` (the model the expert's run, "
        "or the run a `w2s export` expert came from, started from).",
        metavar="SOURCE",
        required=True,
    )
    data: str | None = setting(
        None,
        "Questions: a JSONL file ({id?, question, answer?} per line) or tfds:NAME.",
        metavar="SOURCE",
        required=True,
    )
    out: str | None = setting(
        None, "Output folder, resumable.", metavar="DIR", required=True, free=True
    )
    alpha: float = setting(
        0.2, "Plausibility ratio α in (0, 1].", check=number_in(0.0, 1.0, open_low=True)
    )
    beta: float = setting(0.4, "KL threshold β for a step.", check=number_in(0.0, math.inf))
    max_new_tokens: int = setting(128, "Rollout length T.", check=at_least(1))
    max_questions: int | None = setting(
        None, "Use the first N only.", parse=int, check=at_least(1), free=True
    )
    batch_size: int = setting(8, "Questions per batch (global).", check=at_least(1), free=True)
    top_k: int = setting(16, "Most tokens kept per target (renormalized).", check=at_least(1))
    system_prompt: str = setting(SAMPLE_SYSTEM_PROMPT, "System turn of the chat prompt.")
    prompt_style: str = setting("chat", "chat template or plain text.", choices=PROMPT_STYLES)
    eos_ids: tuple[int, ...] = stop_ids_setting("a rollout")
    mesh: str | None = setting(None, 'e.g. "data=4,tensor=2"; default all data.', free=True)
    dtype: str = compute_dtype_setting()
    param_dtype: str | None = param_dtype_setting()
    layer_stack: str = layer_stack_setting()
    attention: str = attention_setting()
    chunk_size: int = setting(
        32, "Rollout positions per block of the KL kernel.", check=at_least(1), free=True
    )
    select: bool = setting(True, "Ablation: keep every rollout position.", flags=("--no-select",))
    contrast: bool = setting(
        True, "Ablation: one-hot target on the expert's own token.", flags=("--no-contrast",)
    )
    export_reference: str | None = setting(
        None,
        "Also write the LightReasoner reference's one-line-per-step JSONL.",
        metavar="FILE",
        free=True,
    )
    unmapped_mass: str = setting(
        "residual",
        "Amateur of another tokenizer: mass on tokens without a counterpart is kept in one "
        "residual bucket per side, or renormalized away (docs/CROSS_TOKENIZER.md; measured).",
        choices=UNMAPPED_MASS_MODES,
    )
    min_vocab_coverage: float = setting(
        0.5,
        "Amateur of another tokenizer: refuse a pair whose vocabulary map covers a smaller "
        "share of the expert's question tokens.",
        check=number_in(0.0, 1.0),
    )
    question_field: str = setting("question", "Field holding the question.")
    id_field: str = setting("id", "Field holding the question id.")
    tfds_split: str = setting("train", "Split of a tfds: source.")
    tfds_data_dir: str | None = setting(None, "TFDS data dir (default $TFDS_DATA_DIR).", free=True)

    allow_unused_weights: bool = allow_unused_weights_setting()

    def __post_init__(self):
        object.__setattr__(self, "eos_ids", tuple(sorted(int(i) for i in self.eos_ids)))
        check(self)
