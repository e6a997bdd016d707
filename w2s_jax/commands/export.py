"""Merge trained LoRA adapters into the expert and write a Hugging Face model folder.

--lora is a `w2s train --out` folder (latest checkpoint), its checkpoints/ folder
or one step's folder. The output (config.json, safetensors, tokenizer,
generation_config.json) loads with transformers.AutoModelForCausalLM; OUT/adapter/
holds the adapters in PEFT's format (float32) and OUT/export_report.json how much
of the update the merged weights keep in --dtype. Full fine-tuning checkpoints
(--lora-rank 0) are exported the same way, without an adapter; for a model
trained from scratch (--init random) --expert may be left out.
"""

from __future__ import annotations

import argparse
import sys

from w2s_jax.export import ExportSettings, export
from w2s_jax.settings import add_arguments as add_settings
from w2s_jax.settings import from_namespace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, ExportSettings)


def run(args: argparse.Namespace) -> int:
    result = export(from_namespace(ExportSettings, args))
    line = f"merged {result.checkpoint} -> {result.out} ({result.dtype})"
    if result.adapter is None:
        print(f"{line}; full fine-tuning checkpoint: no adapter written")
        return 0
    kept, error = result.update.kept, result.update.error
    if kept is not None:
        line += f"; update kept {kept:.1%} (error {error:.1%})"
    print(f"{line}; PEFT adapter -> {result.adapter}")
    if result.update_lost:
        print(
            f"warning: the {result.dtype} weights keep only {kept:.1%} of the LoRA update "
            f"(see {result.out}/export_report.json), so they are not the trained model; "
            f"export with --dtype float32, or load the PEFT adapter {result.adapter} "
            "on the base model",
            file=sys.stderr,
        )
    return 0
