"""Build the toy world's tokenizer, expert and amateur from a config, and measure them.

    .venv/bin/python experiments/toy_world/build.py --config experiments/toy_world/config.json \
        --out runs/toy_world [--only expert] [--ship]

Steps (each skipped when its output exists, so a re-run resumes):
1. the tokenizer (trained on train problems of the config's task);
2. SFT records of train problems (chat prompt ids, worked-solution ids + <|im_end|>);
3. `w2s train --objective sft --lora-rank 0` for each run (subprocess, wall time
   recorded): from scratch (`--init random`), or, for a run with an `init`, from
   another run's checkpoint; a run's `slip_rate` plants the misconception in its
   corpus (`arithmetic.slipped_solution`: that share of carries and borrows forgotten);
4. `w2s eval` (greedy) on the first N validation problems.
Results go to OUT/results.json. `--ship` copies the config's `models` (with the
tokenizer) into w2s_jax/assets/toy_world/ and adds their entries to its manifest.json
(config.json: the expert and amateur; cross_tokenizer.json: the amateur with its own
tokenizer). The test split is never touched here.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "w2s_jax" / "assets" / "toy_world"
REPORT = "export_report.json"  # w2s_jax.export.REPORT_FILE (not imported: it loads jax)
# Validation problems whose accuracy the test suite recomputes for the shipped expert.
CHECK_SUBSET = 48


def task_config(config: dict):
    from w2s_jax.data.arithmetic import TaskConfig

    task = dict(config["task"])
    task["operations"] = tuple(task["operations"])
    return TaskConfig(**task)


def model_config_json(spec: dict, tokenizer) -> dict:
    """A Qwen2 config.json for a model trained from scratch with this tokenizer."""
    heads = spec["num_attention_heads"]
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": len(tokenizer),
        "hidden_size": spec["hidden_size"],
        "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": spec["num_key_value_heads"],
        "head_dim": spec["hidden_size"] // heads,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }


def w2s(*args: str) -> float:
    """Run a `w2s` subcommand in a subprocess; return its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "w2s_jax.cli", *args], check=True, cwd=REPO)
    return time.perf_counter() - start


def train_run(name: str, config: dict, out: Path, tokenizer, tok_dir: Path, task) -> dict:
    """Train run `name` of the config (resumable): from scratch, or from the checkpoint
    its `init` names; returns its wall time and size."""
    from w2s_jax.data.arithmetic import generate_split, slipped_solution
    from w2s_jax.data.sft_records import write_sft_records
    from w2s_jax.files import atomic_write_json

    spec = config["runs"][name]
    train = spec["train"]
    folder = out / "runs" / name
    data = folder / "sft_data"
    if not (data / "samples").is_dir():
        problems = generate_split("train", train["problems"], seed=config["data_seed"], config=task)
        rate, slips = spec.get("slip_rate", 0.0), random.Random(spec.get("slip_seed", 0))
        write_sft_records(
            data,
            tokenizer,
            ((p.id, p.question, slipped_solution(p, slips, rate, task)) for p in problems),
        )
    if "transplant" in spec.get("init", {}):
        start = folder / "transplant"
        transplant(REPO / spec["init"]["transplant"], tokenizer, tok_dir, start)
        model_json = start / "config.json"
        init = ["--init", "pretrained", "--expert", str(start)]
    elif "init" in spec:
        source = out / "runs" / spec["init"]["run"]
        model_json = source / "model_config.json"
        start = source / "export" / f"step-{spec['init']['step']}"
        export_step(source, spec["init"]["step"], start)
        init = ["--init", "pretrained", "--expert", str(start)]
    else:
        model_json = folder / "model_config.json"
        atomic_write_json(model_json, model_config_json(spec["model"], tokenizer))
        init = ["--init", "random", "--model-config", str(model_json)]
    run = folder / "train"
    result = {"params": _num_params(model_json)}
    if not (run / "summary.json").is_file():
        result["train_s"] = w2s(
            "train", "--objective", "sft", *init,
            "--tokenizer", str(tok_dir), "--samples", str(data), "--out", str(run),
            "--lora-rank", "0", "--dtype", "float32", "--steps", str(train["steps"]),
            "--lr", str(train["lr"]), "--warmup-steps", str(train["warmup_steps"]),
            "--batch-positions", str(train["batch_positions"]),
            "--grad-accum", str(train["grad_accum"]), "--seed", str(train["seed"]),
            "--weight-decay", str(train.get("weight_decay", 0.0)),
            "--save-every", str(train["save_every"]),
            "--keep-checkpoints", str(train["keep_checkpoints"]),
            "--log-every", "25", "--length-bucket", "32", "--no-progress",
        )  # fmt: skip
    return result


def transplant(source: Path, tokenizer, tok_dir: Path, target: Path) -> None:
    """`source` (an HF folder) with `tokenizer`'s vocabulary: every token's embedding is
    the mean of the source embeddings of the source tokens that spell its bytes (longest
    match first); special tokens keep their row by name; every other weight is copied.
    A float32 HF folder with `tok_dir`'s tokenizer at `target` (once)."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from w2s_jax.files import atomic_folder
    from w2s_jax.models import load_tokenizer
    from w2s_jax.vocab_map import token_bytes

    if (target / "config.json").is_file():
        return
    old_tokenizer = load_tokenizer(source)
    pieces = {b: i for i, b in enumerate(token_bytes(old_tokenizer)) if b}
    weights = {k: v.float() for k, v in load_file(source / "model.safetensors").items()}
    old = weights["model.embed_tokens.weight"].numpy()
    rows = []
    for token, spelled in zip(tokenizer.convert_ids_to_tokens(range(len(tokenizer))),
                              token_bytes(tokenizer), strict=True):  # fmt: skip
        if spelled is None:
            rows.append(old[old_tokenizer.convert_tokens_to_ids(token)])
            continue
        ids, start = [], 0
        while start < len(spelled):
            end = max(e for e in range(start + 1, len(spelled) + 1) if spelled[start:e] in pieces)
            ids.append(pieces[spelled[start:end]])
            start = end
        rows.append(old[ids].mean(axis=0))
    import torch

    weights["model.embed_tokens.weight"] = torch.from_numpy(np.stack(rows).astype(np.float32))
    config = json.loads((source / "config.json").read_text())
    config |= {"vocab_size": len(tokenizer), "dtype": "float32", "pad_token_id": 0}
    config["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with atomic_folder(target) as folder:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        for path in tok_dir.iterdir():
            shutil.copy(path, folder / path.name)


def export_step(run: Path, step: int, model: Path, dtype: str = "float32") -> None:
    """Checkpoint `step` of `run` as an HF folder with `dtype` weights."""
    if not (model / "config.json").is_file():
        w2s("export", "--lora", str(run / "train"), "--step", str(step), "--out", str(model),
            "--dtype", dtype)  # fmt: skip


def _num_params(model_json: Path) -> int:
    from w2s_jax.models import ModelConfig

    return ModelConfig.from_hf_json(model_json).num_params


def evaluate(model: Path, data: Path, out: Path, max_new_tokens: int, n: int | None = None):
    from w2s_jax.evaluate import EvalSettings, run_eval

    if (out / "summary.json").is_file():  # finished before
        return json.loads((out / "summary.json").read_text())
    settings = EvalSettings(
        model=str(model), data=str(data), max_new_tokens=max_new_tokens, dtype="float32"
    )
    return run_eval(replace(settings, out=str(out), batch_size=64, max_questions=n, progress=False))


def ship(out: Path, results: dict, config_path: Path) -> None:
    """Copy the config's models into the package and add their entries to manifest.json
    (other configs' entries are kept; every shipped model must share one task)."""
    from w2s_jax.files import atomic_write_json

    path = ASSETS / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    config = str(config_path.relative_to(REPO))
    shared = {k: results[k] for k in ("task", "data_seed", "eval_max_new_tokens")}
    for key, value in shared.items():
        if manifest.get(key, value) != value:
            raise ValueError(f"{config}: its {key} differs from {path}'s; ship it elsewhere")
    manifest = {"config": config, **manifest, **shared}
    models = manifest.setdefault("models", {})
    for name, entry in results["models"].items():
        target = ASSETS / name
        if target.exists():
            shutil.rmtree(target)
        # the export's report names this machine's checkpoint: the manifest holds the recipe
        shutil.copytree(out / "models" / name, target, ignore=shutil.ignore_patterns(REPORT))
        models[name] = entry if config == manifest["config"] else {"config": config, **entry}
    atomic_write_json(path, manifest)


def recipe(config: dict, run: str) -> dict:
    """The chain of training runs that made `run` (its `init`s), oldest first."""
    spec = config["runs"][run]
    earlier = recipe(config, spec["init"]["run"]) if "run" in spec.get("init", {}) else {}
    return {**earlier, run: spec}


def sweep(config: dict, out: Path, validation: Path, results: dict) -> None:
    """Validation accuracy of every kept checkpoint of every run (the calibration log)."""
    from w2s_jax.checkpointing import locate_checkpoint

    n, tokens = config["sweep_questions"], config["eval_max_new_tokens"]
    for name in config["runs"]:
        run = out / "runs" / name
        directory, _ = locate_checkpoint(run / "train")
        steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
        table = results.setdefault("sweep", {}).setdefault(name, {})
        for step in steps:
            model = run / "sweep" / f"step-{step}"
            export_step(run, step, model)
            summary = evaluate(model, validation, run / "sweep" / f"eval-{step}", tokens, n)
            table[str(step)] = {k: summary[k] for k in ("accuracy", "correct", "total")}
            print(f"{name} step {step}: validation {summary['accuracy_text']}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("config.json"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", action="store_true", help="Score every kept checkpoint.")
    parser.add_argument("--ship", action="store_true", help="Copy the models into the package.")
    args = parser.parse_args(argv)

    from w2s_jax.data.arithmetic import write_split
    from w2s_jax.data.toy_tokenizer import build_toy_tokenizer
    from w2s_jax.files import atomic_write_json
    from w2s_jax.models import load_tokenizer

    config = json.loads(args.config.read_text())
    task = task_config(config)
    out = args.out.resolve()
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        build_toy_tokenizer(tok_dir, config=task, seed=config["data_seed"], **config["tokenizer"])
    tokenizer = load_tokenizer(tok_dir)
    validation = out / "validation.jsonl"
    n_validation, seed = config["validation_questions"], config["data_seed"]
    write_split(validation, "validation", n_validation, seed=seed, config=task)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.update(
        task=config["task"],
        data_seed=config["data_seed"],
        eval_max_new_tokens=config["eval_max_new_tokens"],
    )
    runs = results.setdefault("runs", {})
    for name in config["runs"]:
        runs[name] = runs.get(name, {}) | train_run(name, config, out, tokenizer, tok_dir, task)
        runs[name] |= config["runs"][name]
        atomic_write_json(results_path, results)
    if args.sweep:
        sweep(config, out, validation, results)
        atomic_write_json(results_path, results)
    models = results.setdefault("models", {})
    for name, spec in config["models"].items():
        model = out / "models" / name
        export_step(out / "runs" / spec["run"], spec["step"], model, config["ship_dtype"])
        tokens = config["eval_max_new_tokens"]
        summary = evaluate(model, validation, out / "eval" / name, tokens)
        check = evaluate(model, validation, out / "eval_check" / name, tokens, CHECK_SUBSET)
        models[name] = {
            "run": spec["run"],
            "step": spec["step"],
            "params": runs[spec["run"]]["params"],
            "validation": {k: summary[k] for k in ("accuracy", "correct", "total", "no_answer")},
            "validation_check": {k: check[k] for k in ("accuracy", "correct", "total")},
            "tokenizer": {
                "vocab_size": len(tokenizer),
                "split_digits": config["tokenizer"].get("split_digits", True),
            },
            "recipe": recipe(config, spec["run"]),
        }
        print(f"{name}: {models[name]['params']:,} params, validation {summary['accuracy_text']}")
        atomic_write_json(results_path, results)
    if args.ship:
        ship(out, results, args.config.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
