"""`w2s demo`'s settings: one declaration per field, with defaults that depend on the world
(`WORLD_PRESETS`) and, in the Qwen world, on the scale (`--scale cpu|paper`)."""

from __future__ import annotations

import dataclasses
import math

from w2s_jax.demo_report import ARMS
from w2s_jax.demo_worlds import QWEN_SCALES, REAL_LM_AMATEURS, REAL_LM_PRESETS, WORLDS
from w2s_jax.settings import (
    at_least,
    check,
    comma_list,
    default_of,
    free_fields,
    layer_stack_setting,
    number_in,
    record,
    setting,
)
from w2s_jax.stages.sample_settings import SampleSettings

SPLITS = ("test", "validation")
TOY_ARMS = tuple(arm for arm in ARMS if arm not in ("weak_sft", "lightreasoner_cross"))
REAL_LM_ARMS = tuple(
    arm for arm in ARMS if arm not in ("no_select", "no_contrast", "lightreasoner_cross")
)
QWEN_ARMS = ("base", "lightreasoner", "sft", "contrastive_decoding", "lightreasoner_cross")
# Defaults that depend on the world: the toy world's are the tuned ones (10 minutes
# on 2 cores); the real-LM world's fit a 135M model on a CPU.
WORLD_PRESETS = {
    "toy": {
        "questions": 1024,
        "eval_questions": 1000,
        "max_new_tokens": 96,
        "steps": 100,
        "batch_positions": 64,
        "length_bucket": 192,
        "arms": TOY_ARMS,
    },
    # the real LM's sparse ablations cost 6 of its 17 minutes: `--arms` adds them back
    "real-lm": {**REAL_LM_PRESETS, "arms": REAL_LM_ARMS},
    "qwen": {**QWEN_SCALES["cpu"], "arms": QWEN_ARMS, "beta": 0.4},
}
# The Qwen world's `--scale paper`: the paper's sizes and learning rate, for a GPU or TPU.
PAPER_PRESETS = {**WORLD_PRESETS["qwen"], **QWEN_SCALES["paper"], "learning_rate": 5e-5}


def _preset(name: str, help: str):  # noqa: A002 (argparse's name)
    """A size setting whose default comes from the world (WORLD_PRESETS)."""
    shown = "; ".join(f"{world}: {presets[name]}" for world, presets in WORLD_PRESETS.items())
    return setting(None, f"{help} (default: {shown})", check=at_least(1), parse=int)


def _known_arms(arms) -> str | None:
    if arms and set(arms) <= set(ARMS) and arms[0] == "base":
        return None
    return f"must start with base and be among {', '.join(ARMS)}"


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Every setting of a demo run (defaults: the tuned ones, within 10 minutes on 2 cores)."""

    out: str = setting("demo_out", "Output folder (resumable).", metavar="DIR", free=True)
    seeds: int = setting(1, "Repeat with N seeds; reports mean ± sd.", check=at_least(1), free=True)
    world: str = setting(
        "toy", "Where the models and problems come from (see w2s_jax.demo_worlds).", choices=WORLDS
    )
    questions: int = _preset("questions", "Unlabeled train questions per seed.")
    eval_questions: int = _preset("eval_questions", "Held-out problems scored.")
    split: str = setting(
        "test",
        "Held-out split scored: test (reported runs) or validation (tuning).",
        choices=SPLITS,
    )
    alpha: float = setting(
        default_of(SampleSettings, "alpha"),
        "Plausibility ratio α.",
        check=number_in(0, 1, open_low=True),
    )
    beta: float = setting(
        None,
        "KL threshold β of step selection (default: toy, real-lm: 0.2, tuned on validation; "
        "qwen: the paper's 0.4).",
        parse=float,
        check=number_in(0, math.inf),
    )
    top_k: int = setting(
        default_of(SampleSettings, "top_k"),
        "Most tokens per contrastive target.",
        check=at_least(1),
    )
    max_new_tokens: int = _preset("max_new_tokens", "Rollout (and eval) length.")
    eval_max_new_tokens: int = setting(
        None,
        "Eval length, when not the rollout length (qwen --scale paper: 1024).",
        check=at_least(1),
        parse=int,
    )
    scale: str = setting(
        "cpu",
        "qwen world: cpu (sized for 2 CPU cores) or paper (the paper's sizes, for a GPU/TPU).",
        choices=tuple(QWEN_SCALES),
    )
    lora_rank: int = setting(8, "LoRA rank of every trained arm.", check=at_least(1))
    lora_alpha: float = setting(16.0, "LoRA alpha of every trained arm.")
    learning_rate: float = setting(
        None,
        "Peak learning rate of every trained arm (default: 5e-4; qwen --scale paper: 5e-5).",
        flags=("--lr", "--learning-rate"),
        parse=float,
        check=number_in(0, math.inf, open_low=True),
    )
    steps: int = _preset("steps", "Optimizer steps of every trained arm.")
    batch_positions: int = _preset("batch_positions", "Positions per step.")
    batch_size: int = setting(64, "Questions per sampling/eval batch.", check=at_least(1))
    lora_targets: tuple[str, ...] = setting(
        ("q_proj", "v_proj"), "Comma-separated layers LoRA adapts."
    )
    arms: tuple[str, ...] = setting(
        None,
        "Comma-separated arms to run (base first; default: toy: "
        f"{','.join(TOY_ARMS)}; real-lm: {','.join(REAL_LM_ARMS)}; qwen: {','.join(QWEN_ARMS)}; "
        f"all: {','.join(ARMS)}).",
        check=_known_arms,
    )
    length_bucket: int = _preset("length_bucket", "Training length padding.")
    expert: str | None = setting(
        None, "Expert HF folder (default: the world's, see w2s_jax.demo_worlds).", metavar="DIR"
    )
    amateur: str | None = setting(None, "Amateur HF folder (default: the world's).", metavar="DIR")
    real_amateur: str = setting(
        "slips",
        "real-lm world: the amateur built when --amateur is not given.",
        choices=REAL_LM_AMATEURS,
    )
    layer_stack: str = layer_stack_setting()
    progress: bool = setting(
        False, "Progress bars of training and evaluation.", flags=("--progress",), free=True
    )

    def __post_init__(self):
        presets = {"beta": 0.2, "learning_rate": 5e-4, **WORLD_PRESETS.get(self.world, {})}
        if (self.world, self.scale) == ("qwen", "paper"):
            presets = PAPER_PRESETS
        for name, value in presets.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "arms", comma_list(self.arms))
        object.__setattr__(self, "lora_targets", comma_list(self.lora_targets))
        check(self)
        if "lightreasoner_cross" in self.arms and self.world != "qwen":
            raise ValueError("--arms lightreasoner_cross runs in --world qwen only")

    def settings(self) -> dict:
        """The recorded settings (the free ones left out)."""
        free = free_fields(DemoSettings)
        return {k: v for k, v in record(self).items() if k not in free}
