"""`w2s demo`'s settings: one declaration per field, with defaults that depend on the world
(`WORLD_PRESETS`) and, in the Qwen world, on the scale (`--scale cpu|full|paper`)."""

from __future__ import annotations

import dataclasses
import math

from w2s_jax.demo_report import ARMS
from w2s_jax.demo_worlds import QWEN_SCALES, REAL_LM_AMATEURS, REAL_LM_PRESETS, SMOLLM2, WORLDS
from w2s_jax.settings import (
    at_least,
    check,
    comma_list,
    default_of,
    free_fields,
    layer_stack_setting,
    number_in,
    record,
    remat_setting,
    setting,
)
from w2s_jax.stages.sample_settings import SampleSettings

SPLITS = ("test", "validation")
TOY_ARMS = tuple(arm for arm in ARMS if arm not in ("weak_sft", "lightreasoner_cross"))
REAL_LM_ARMS = tuple(
    arm for arm in ARMS if arm not in ("no_select", "no_contrast", "lightreasoner_cross")
)
QWEN_ARMS = ("base", "lightreasoner", "sft", "contrastive_decoding", "lightreasoner_cross")
# With SmolLM2 as the amateur (`--scale cpu`), LightReasoner is already the cross-tokenizer
# arm, and contrastive decoding needs an amateur of the expert's tokenizer.
QWEN_CPU_ARMS = ("base", "lightreasoner", "sft")


def qwen_presets(scale: str) -> dict:
    """The Qwen world's defaults at `scale` (QWEN_SCALES; the paper's learning rate at
    `paper`)."""
    sizes = {k: v for k, v in QWEN_SCALES[scale].items() if k != "task"}
    arms = QWEN_CPU_ARMS if sizes["amateur"] == SMOLLM2 else QWEN_ARMS
    learning_rate = 5e-5 if scale == "paper" else 5e-4
    return {
        "beta": 0.4,
        "learning_rate": learning_rate,
        "arms": arms,
        "remat": "full",
        "loss_chunk_size": 256,
        **sizes,
    }


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
    "qwen": qwen_presets("cpu"),
}


def _preset(name: str, help: str):  # noqa: A002 (argparse's name)
    """A size setting whose default comes from the world (WORLD_PRESETS)."""
    shown = "; ".join(f"{world}: {presets[name]}" for world, presets in WORLD_PRESETS.items())
    return setting(None, f"{help} (default: {shown})", check=at_least(1), parse=int)


def _known_arms(arms) -> str | None:
    if arms and set(arms) <= set(ARMS) and arms[0] == "base":
        return None
    return f"must start with base and be among {', '.join(ARMS)}"


def _check_smollm2_amateur(arms) -> None:
    """The arms that cannot run with SmolLM2 (another tokenizer) as the world's amateur."""
    if "contrastive_decoding" in arms:
        raise ValueError(
            "--arms contrastive_decoding needs an amateur of the expert's tokenizer, and "
            f"{SMOLLM2}'s is not Qwen's: drop the arm, or use --scale full"
        )
    if "lightreasoner_cross" in arms:
        raise ValueError(
            f"--arms lightreasoner_cross: the amateur is already {SMOLLM2}, so the "
            "lightreasoner arm is the cross-tokenizer one"
        )


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
        "qwen world: cpu (0.5B expert, SmolLM2 amateur: 90 minutes on 2 CPU cores), full (the "
        "paper's 1.5B/0.5B pair at the CPU sizes) or paper (that pair at the paper's sizes, "
        "for a GPU/TPU).",
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
        f"{','.join(TOY_ARMS)}; real-lm: {','.join(REAL_LM_ARMS)}; qwen: "
        f"{','.join(QWEN_CPU_ARMS)}, at full/paper {','.join(QWEN_ARMS)}; "
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
    remat: str = remat_setting(None, "qwen: full, else none")
    loss_chunk_size: int = setting(
        None,
        "Supervised positions projected onto the vocabulary at a time in training (0: all; "
        "default: qwen: 256, else 0).",
        check=at_least(0),
        parse=int,
        free=True,
    )
    progress: bool = setting(
        False, "Progress bars of training and evaluation.", flags=("--progress",), free=True
    )

    def __post_init__(self):
        presets = {"beta": 0.2, "learning_rate": 5e-4, "remat": "none", "loss_chunk_size": 0}
        presets |= WORLD_PRESETS.get(self.world, {})
        if self.world == "qwen":
            presets = qwen_presets(self.scale)
        for name, value in presets.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "arms", comma_list(self.arms))
        object.__setattr__(self, "lora_targets", comma_list(self.lora_targets))
        check(self)
        if "lightreasoner_cross" in self.arms and self.world != "qwen":
            raise ValueError("--arms lightreasoner_cross runs in --world qwen only")
        if self.world == "qwen" and self.amateur == SMOLLM2:
            _check_smollm2_amateur(self.arms)

    def settings(self) -> dict:
        """The recorded settings (the free ones left out)."""
        free = free_fields(DemoSettings)
        return {k: v for k, v in record(self).items() if k not in free}
