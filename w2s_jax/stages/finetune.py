"""Once-only steps shared by the multi-stage runs (the demo, the real-LM world's models,
weak-to-strong-gen, the rounds): a `w2s train` run that a finished summary.json makes a
no-op, a `w2s train` run merged into a model folder, atomically, and a `w2s eval` run
that a finished summary.json makes a no-op."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from w2s_jax.files import atomic_folder


def train_once(settings) -> dict:
    """The summary of the `w2s train` run with `settings` (TrainSettings); trained (or
    resumed) only when its summary.json does not yet record all `settings.steps` steps."""
    from w2s_jax.train import train

    summary = Path(settings.out) / "summary.json"
    if summary.is_file():
        done = json.loads(summary.read_text())
        if done["steps"] == settings.steps:
            return done
    return train(settings)


def export_once(run: str | Path, model: str | Path, expert: str | Path) -> Path:
    """`run`'s last checkpoint merged into `expert` as the HF folder `model` (`w2s export`),
    which appears whole or not at all; skipped when `model` already holds a config.json."""
    from w2s_jax.export import ExportSettings, export

    model = Path(model)
    if (model / "config.json").is_file():
        return model
    shutil.rmtree(model, ignore_errors=True)  # no config.json: an unfinished folder
    with atomic_folder(model) as tmp:
        export(ExportSettings(lora=str(run), out=str(tmp), expert=str(expert)))
    return model


def evaluate_once(out: str | Path, **settings) -> dict:
    """The summary of the `w2s eval` run in `out` with `settings` (EvalSettings fields);
    run only when `out` holds no summary.json yet."""
    from w2s_jax.evaluate import EvalSettings, run_eval

    summary = Path(out) / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    return run_eval(EvalSettings(out=str(out), **settings))
