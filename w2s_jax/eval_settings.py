"""Settings of the evaluation stage (`w2s eval`, `w2s_jax.evaluate.run_eval`): `EvalSettings`.

No JAX import, so `w2s eval --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import math

from w2s_jax import eval_decoding, eval_engine
from w2s_jax.data.benchmarks import PRESET_HELP, PRESETS
from w2s_jax.eval_decoding import DECODINGS
from w2s_jax.grading import SYMBOLIC_TIMEOUT_S
from w2s_jax.prompts import EVAL_SYSTEM_PROMPT, PROMPT_STYLES
from w2s_jax.settings import (
    allow_unused_weights_setting,
    at_least,
    attention_setting,
    check,
    comma_list,
    compute_dtype_setting,
    layer_stack_setting,
    number_in,
    param_dtype_setting,
    setting,
    stop_ids_setting,
)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Every setting of an evaluation; `free` ones (batch size, question count, mesh,
    progress) may change when a run resumes, the others shape its outputs."""

    model: str | None = setting(
        None, "Hugging Face model folder to evaluate.", metavar="DIR", required=True
    )
    data: str | None = setting(
        None, "JSONL file of questions with gold answers.", metavar="FILE", required=True
    )
    out: str | None = setting(None, "Output folder (resumable).", metavar="DIR", free=True)
    lora: str | None = setting(
        None, "`w2s train` checkpoint (run folder or step folder) applied to --model."
    )
    preset: str = setting("gsm8k", PRESET_HELP, choices=tuple(sorted(PRESETS)))
    protocol: str | None = setting(
        None,
        "An evaluation protocol that sets other settings: qwen25-math (the Qwen2.5-Math "
        "toolkit as in the LightReasoner paper: its boxed system prompt, chat template, "
        "greedy, --max-new-tokens 2048).",
        choices=tuple(eval_decoding.PROTOCOLS),
    )
    question_fields: tuple[str, ...] | None = setting(
        None,
        "Field(s) holding the question; several comma-separated fields are joined.",
        flags=("--question-field",),
        parse=comma_list,
    )
    answer_field: str | None = setting(None, "Field holding the gold answer.")
    id_field: str | None = setting(None, "Field holding the question id (default: line number).")
    prompt_style: str = setting("chat", "chat template or plain text.", choices=PROMPT_STYLES)
    system_prompt: str = setting(
        EVAL_SYSTEM_PROMPT, "System turn of the chat prompt ('' for none)."
    )
    max_new_tokens: int = setting(
        512,
        "Most new tokens per answer (the Qwen2.5-Math toolkit and the LightReasoner paper: 2048).",
        check=at_least(1),
    )
    decoding: str | None = setting(
        None,
        "greedy, sampling (--temperature, default 1.0) or contrastive (needs --amateur; greedy "
        "over the contrastive scores unless --temperature > 0). Default: sampling when "
        "--temperature > 0 is given, else greedy.",
        choices=DECODINGS,
    )
    amateur: str | None = setting(
        None, "Amateur model of --decoding contrastive (the same tokenizer).", metavar="DIR"
    )
    cd_alpha: float | None = setting(
        None,
        "Contrastive plausibility: tokens with p_E >= alpha * max p_E (default 0.1).",
        parse=float,
        check=number_in(0, 1, open_low=True),
    )
    cd_beta: float | None = setting(
        None,
        "Contrastive weight: argmax (1+beta)*log p_E - beta*log p_A (default 0.5).",
        parse=float,
        check=number_in(0, math.inf),
    )
    cd_amateur_temperature: float | None = setting(
        None,
        "Temperature of the amateur's log-probabilities (default 1.0).",
        parse=float,
        check=number_in(0, math.inf, open_low=True),
    )
    cd_form: str | None = setting(
        None,
        "weighted: (1+beta)*s_E - beta*s_A (O'Brien & Lewis; default); difference: s_E - s_A "
        "(Li et al.).",
        choices=("weighted", "difference"),
    )
    samples: int = setting(
        1, "Answers sampled per question; reports pass@k for k <= N and maj@N.", check=at_least(1)
    )
    temperature: float | None = setting(
        None, "Sampling temperature (> 0 samples).", parse=float, check=number_in(0, math.inf)
    )
    top_p: float | None = setting(
        None, "Nucleus sampling mass.", parse=float, check=number_in(0, 1, open_low=True)
    )
    seed: int = setting(0, "Seed of sampled decoding (and of --compare's bootstrap).")
    engine: str | None = setting(
        None,
        "Decode with an OpenAI-compatible server serving --model (e.g. `vllm serve DIR`) "
        "instead of in process; --batch-size requests in flight (w2s_jax.eval_engine).",
        choices=eval_engine.ENGINES,
    )
    endpoint: str | None = setting(
        None, "--engine's URL, e.g. http://localhost:8000/v1.", metavar="URL", free=True
    )
    engine_model: str | None = setting(
        None, "Model name to request (default: --model, or the only one served).", free=True
    )
    dtype: str = compute_dtype_setting()
    param_dtype: str | None = param_dtype_setting()
    layer_stack: str = layer_stack_setting()
    attention: str = attention_setting()
    eos_ids: tuple[int, ...] = stop_ids_setting("an answer")
    batch_size: int = setting(16, "Questions per batch.", check=at_least(1), free=True)
    max_questions: int | None = setting(
        None, "Evaluate only the first N questions.", parse=int, check=at_least(1), free=True
    )
    mesh: str | None = setting(None, "Device mesh, e.g. 'data=8' or 'data=2,tensor=4'.", free=True)
    symbolic_timeout: float = setting(
        SYMBOLIC_TIMEOUT_S,
        "Seconds allowed per symbolic (math-verify) comparison; past it, graded wrong.",
        free=True,
    )
    progress: bool = setting(True, "Hide the progress bar.", flags=("--no-progress",), free=True)
    force: bool = setting(
        False, "Apply --lora even to a base other than the one it was trained on.", free=True
    )
    allow_unused_weights: bool = allow_unused_weights_setting()

    def __post_init__(self):
        object.__setattr__(self, "eos_ids", tuple(sorted(int(i) for i in self.eos_ids)))
        if self.question_fields is not None:
            object.__setattr__(self, "question_fields", comma_list(self.question_fields))
        check(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in eval_decoding.apply_protocol(self, defaults).items():
            object.__setattr__(self, name, value)
        for name, value in eval_decoding.resolve(self).items():
            object.__setattr__(self, name, value)
