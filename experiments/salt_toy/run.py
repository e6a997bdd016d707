"""SALT in the toy world: a small teacher helps a 2x larger student trained from scratch.

    .venv/bin/python experiments/salt_toy/run.py --config experiments/salt_toy/config.json \
        --out runs/salt_toy

Steps (each skipped when its output exists, so a re-run resumes):
1. SFT records of the config's train problems (exact worked solutions), of
   `validation_records` validation problems (the validation loss) and
   `validation_questions` validation questions (accuracy), with the shipped toy
   tokenizer;
2. the teacher: the shipped amateur's architecture trained from scratch on the same
   records (`w2s train --objective sft`), exported;
3. `w2s score` of the train records with the teacher (SALT_DS scores);
4. per arm and seed, the student from scratch (`--init random`), same steps, data
   and seed for every arm: `baseline` (sft), `salt`, `salt_ds` (the config's flags);
5. validation loss (token-weighted next-token CE over the validation records'
   completions) of every kept checkpoint, greedy accuracy of the final one on the
   validation questions (Wilson 95% intervals), and the first checkpoint whose
   validation loss reaches the baseline's final one (same seed).
Writes OUT/results.json, OUT/curves.png and prints a table. Only the validation split
is used; the test split is left alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments" / "toy_world"))

from build import evaluate, export_step, model_config_json, task_config, w2s  # noqa: E402


def write_data(config: dict, out: Path, tokenizer) -> None:
    """Train and validation SFT records, and the validation questions."""
    from w2s_jax.data.arithmetic import generate_split, write_split
    from w2s_jax.data.sft_records import write_sft_records

    task, seed = task_config(config), config["data_seed"]
    for name, split, n in (
        ("train_data", "train", config["train_problems"]),
        ("validation_data", "validation", config["validation_records"]),
    ):
        if not (out / name / "samples").is_dir():
            problems = generate_split(split, n, seed=seed, config=task)
            write_sft_records(
                out / name, tokenizer, ((p.id, p.question, p.answer) for p in problems)
            )
    write_split(
        out / "validation.jsonl",
        "validation",
        config["validation_questions"],
        seed=seed,
        config=task,
    )


def train(run: Path, spec: dict, out: Path, tokenizer, extra: list[str], seed: int) -> None:
    """`w2s train` from scratch into run/train (skipped when finished)."""
    from w2s_jax.files import atomic_write_json

    model_json = run / "model_config.json"
    atomic_write_json(model_json, model_config_json(spec["model"], tokenizer))
    t = spec["train"]
    if (run / "train" / "summary.json").is_file():
        return
    steps, save_every = t["steps"], t.get("save_every", t["steps"])
    w2s(
        "train", *extra, "--init", "random", "--model-config", str(model_json),
        "--tokenizer", str(REPO / spec["tokenizer"]), "--samples", str(out / "train_data"),
        "--out", str(run / "train"), "--lora-rank", "0", "--dtype", "float32",
        "--steps", str(steps), "--lr", str(t["lr"]), "--warmup-steps", str(t["warmup_steps"]),
        "--batch-positions", str(t["batch_positions"]), "--grad-accum", "1",
        "--seed", str(seed), "--save-every", str(save_every),
        "--keep-checkpoints", str(steps // save_every), "--log-every", "25",
        "--length-bucket", "32", "--no-progress",
    )  # fmt: skip


def validation_curve(run: Path, validation) -> dict[int, float]:
    """Step -> token-weighted validation CE of every kept checkpoint of `run`."""
    from flax import nnx

    from w2s_jax.checkpointing import locate_checkpoint, restore_params
    from w2s_jax.models import ModelConfig, init_random
    from w2s_jax.stages.score import score_trajectories

    model = init_random(
        ModelConfig.from_hf_json(run / "model_config.json"), seed=0, dtype="float32"
    )
    directory, _ = locate_checkpoint(run / "train")
    curve = {}
    for step in sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()):
        nnx.update(model, restore_params(run / "train", nnx.state(model, nnx.Param), step=step))
        rows = score_trajectories(model, validation, batch_size=64)
        curve[step] = sum(r["mean_loss"] * r["positions"] for r in rows) / sum(
            r["positions"] for r in rows
        )
    return curve


def first_step_reaching(curve: dict[int, float], target: float) -> int | None:
    """The first checkpoint step whose validation loss is <= target (None: never)."""
    return next((s for s in sorted(curve) if curve[s] <= target), None)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from w2s_jax.files import atomic_save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (arm, runs), color in zip(results["arms"].items(), ("C0", "C1", "C2"), strict=False):
        for i, run in enumerate(runs.values()):
            steps = sorted(int(s) for s in run["curve"])
            ax.plot(steps, [run["curve"][str(s)] for s in steps], color=color, alpha=0.8,
                    label=arm if i == 0 else None)  # fmt: skip
    kd = results.get("kd_steps")
    if kd:
        ax.axvline(kd, color="gray", linestyle=":", label=f"end of KD phase ({kd})")
    teacher = results["teacher"]["curve"]
    final = teacher[max(teacher, key=int)]
    ax.axhline(final, color="gray", linestyle="--", label=f"teacher, final ({final:.3f})")
    ax.set(xlabel="step", ylabel="validation loss (next-token CE)", yscale="log")
    seeds = len(results["config"]["seeds"])
    ax.set_title(f"Toy world: 2x-teacher student from scratch, {seeds} seeds per arm")
    ax.legend()
    atomic_save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def summarize(results: dict) -> None:
    """Per arm: mean final validation loss, pooled accuracy with a Wilson interval, and
    the steps to reach the baseline's final validation loss (per seed)."""
    from w2s_jax.stats import wilson_interval

    base = results["arms"]["baseline"]
    for arm, runs in results["arms"].items():
        correct = sum(r["correct"] for r in runs.values())
        total = sum(r["total"] for r in runs.values())
        reach = {
            seed: first_step_reaching(
                {int(s): v for s, v in r["curve"].items()}, base[seed]["final_loss"]
            )
            for seed, r in runs.items()
        }
        low, high = wilson_interval(correct, total)
        results.setdefault("table", {})[arm] = {
            "final_loss": [r["final_loss"] for r in runs.values()],
            "accuracy": [r["accuracy"] for r in runs.values()],
            "pooled_accuracy": correct / total,
            "pooled_ci95": [low, high],
            "steps_to_baseline_final_loss": reach,
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("config.json"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", help="Only these seeds (parallel runs).")
    args = parser.parse_args(argv)

    from w2s_jax.data.packing import find_sample_files, load_trajectories
    from w2s_jax.files import atomic_write_json
    from w2s_jax.models import load_tokenizer

    config = json.loads(args.config.read_text())
    config["seeds"] = args.seeds or config["seeds"]
    out = args.out.resolve()
    tokenizer = load_tokenizer(REPO / config["tokenizer"])
    write_data(config, out, tokenizer)
    teacher = {**config["teacher"], "tokenizer": config["tokenizer"]}
    student = {**config["student"], "tokenizer": config["tokenizer"]}
    train(
        out / "teacher", teacher, out, tokenizer, ["--objective", "sft"], teacher["train"]["seed"]
    )
    teacher_model = out / "teacher" / "export"
    export_step(out / "teacher", teacher["train"]["steps"], teacher_model)
    if not (out / "scores" / "summary.json").is_file():
        w2s("score", "--model", str(teacher_model), "--data", str(out / "train_data"),
            "--out", str(out / "scores"), "--top-k", str(config["score_top_k"]),
            "--dtype", "float32", "--no-progress")  # fmt: skip
    validation, _ = load_trajectories(find_sample_files(out / "validation_data"), objective="sft")
    steps = student["train"]["steps"]
    results = {"config": config, "arms": {}, "teacher": {}}
    results["teacher"]["curve"] = validation_curve(out / "teacher", validation)
    for arm, flags in config["arms"].items():
        extra = ["--objective", "sft"]
        if flags:
            extra = ["--objective", "salt", "--teacher", str(teacher_model), *flags]
            extra += ["--kd-scores", str(out / "scores")] if "--kd-data-selection" in flags else []
            results["kd_steps"] = int(flags[flags.index("--kd-steps") + 1])
        for seed in config["seeds"]:
            run = out / "runs" / f"{arm}-seed{seed}"
            train(run, student, out, tokenizer, extra, seed)
            curve = validation_curve(run, validation)
            export_step(run, steps, run / "export")
            summary = evaluate(run / "export", out / "validation.jsonl", run / "eval",
                               config["eval_max_new_tokens"])  # fmt: skip
            results["arms"].setdefault(arm, {})[seed] = {
                "curve": {str(s): v for s, v in curve.items()},
                "final_loss": curve[steps],
                **{k: summary[k] for k in ("accuracy", "correct", "total")},
            }
            print(f"{arm} seed {seed}: val loss {curve[steps]:.4f}, accuracy "
                  f"{summary['accuracy_text']}", flush=True)  # fmt: skip
    summarize(results)
    results = json.loads(json.dumps(results))  # int keys -> str, as read back
    atomic_write_json(out / "results.json", results)
    plot(results, out / "curves.png")
    print(json.dumps(results["table"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
