"""Merge trained LoRA adapters into the expert and write a Hugging Face model folder.

--lora is a `w2s train --out` folder (latest checkpoint), its checkpoints/ folder
or one step's folder. The output (config.json, safetensors, tokenizer) loads with
transformers.AutoModelForCausalLM. Full fine-tuning checkpoints (--lora-rank 0)
are exported the same way; for a model trained from scratch (--init random)
--expert may be left out.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--expert", metavar="DIR", help="The base HF model folder the adapters were trained on.")
    add("--lora", required=True, metavar="CKPT", help="A `w2s train` output or checkpoint folder.")
    add("--out", required=True, metavar="DIR", help="Folder for the merged HF model.")
    add("--step", type=int, default=None, help="Checkpoint step (default: the latest).")
    add("--dtype", default=None, help="Weight dtype written (default: the base model's).")
    add("--tokenizer", metavar="DIR", help="Tokenizer to copy (default: the one training used).")


def export(expert, lora, out, *, step=None, dtype=None, tokenizer=None) -> str:
    """Merge checkpoint `lora` into `expert` (or a fresh model for random-init runs); save to `out`.

    Adapters are folded in float32; weights are written in `dtype` (default: the
    base model's). Returns the checkpoint folder used.
    """
    from flax import nnx

    from w2s_jax.checkpointing import locate_checkpoint, read_meta
    from w2s_jax.lora import load_lora_into, merge_lora
    from w2s_jax.models import ModelConfig, init_random, load_pretrained, save_pretrained

    directory, step = locate_checkpoint(lora, step)
    meta = read_meta(directory, step=step)
    config = lambda: ModelConfig.from_hf_json(meta["model_config"])
    if expert is None and meta["lora"]["rank"] == 0:  # every parameter is in the checkpoint
        model = nnx.eval_shape(lambda: init_random(config(), seed=0, dtype=dtype))
    elif expert is not None:
        model = load_pretrained(expert, dtype=dtype)
    elif meta.get("init") == "random":  # LoRA on a scratch model: rebuild its seeded base
        model = init_random(config(), seed=meta.get("seed", 0), dtype=dtype)
    else:
        raise ValueError(f"{lora} holds LoRA adapters: --expert (their base model) is required")
    merge_lora(load_lora_into(model, directory, step=step))
    save_pretrained(model, out, tokenizer=tokenizer or meta.get("tokenizer") or expert)
    return f"{directory}/{step}"


def run(args: argparse.Namespace) -> int:
    try:
        used = export(
            args.expert,
            args.lora,
            args.out,
            step=args.step,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
        )
    except (ValueError, FileNotFoundError) as exc:  # also CheckpointError, ConfigError
        raise SystemExit(f"error: {exc}") from None
    print(f"merged {used} -> {args.out}")
    return 0
