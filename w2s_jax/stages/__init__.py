"""The pipeline's stages as library calls: each takes its settings object and returns a
result. The `w2s` commands only turn flags into these settings.

    from w2s_jax import stages
    stages.sample(stages.SampleSettings(expert=E, amateur=A, data=Q, out="runs/s"))
    stages.train(stages.TrainSettings(samples="runs/s", expert=E, out="runs/t"))

Names are imported on first use (`w2s --help` stays fast).
"""

from __future__ import annotations

import importlib

_WHERE = {
    "sample": "w2s_jax.stages.sample",
    "SampleSettings": "w2s_jax.stages.sample_settings",
    "train": "w2s_jax.train",
    "TrainSettings": "w2s_jax.train_config",
    "export": "w2s_jax.export",
    "ExportSettings": "w2s_jax.export",
    "evaluate": ("w2s_jax.evaluate", "run_eval"),
    "EvalSettings": "w2s_jax.evaluate",
    "compare": "w2s_jax.compare",
    "CompareSettings": "w2s_jax.compare",
    "demo": ("w2s_jax.demo", "run_demo"),
    "DemoSettings": "w2s_jax.demo",
    "weak_to_strong": "w2s_jax.stages.weak_to_strong",
    "WeakToStrongSettings": "w2s_jax.stages.w2s_settings",
    "weak_to_strong_gen": "w2s_jax.stages.w2s_generative",
    "GenerativeW2SSettings": "w2s_jax.stages.w2s_gen_settings",
    "rounds": ("w2s_jax.stages.rounds", "run_rounds"),
    "RoundsSettings": "w2s_jax.stages.rounds_settings",
    "score": "w2s_jax.stages.score",
    "ScoreSettings": "w2s_jax.stages.score",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _WHERE[name]
    module, attribute = where if isinstance(where, tuple) else (where, name)
    return getattr(importlib.import_module(module), attribute)
