"""Training objectives as plug-ins: name -> `Objective` (see `w2s_jax.objectives.base`).

Adding one: a module here that defines `OBJECTIVE = Objective(...)`, and one line in
`BUILTIN`. The modules import JAX, so they are imported on first use, not here (the
registry stays cheap for `w2s train --help`). `register` adds an objective defined
elsewhere (a notebook, a test) for the rest of the process.
"""

from __future__ import annotations

import importlib

from w2s_jax.objectives.base import LossContext, Objective

__all__ = ["BUILTIN", "LossContext", "Objective", "get_objective", "objective_names", "register"]

# name: (module defining OBJECTIVE, one line for `w2s train --help`)
BUILTIN: dict[str, tuple[str, str]] = {
    "contrastive": (
        "w2s_jax.objectives.contrastive",
        "soft CE on the selected positions' sparse targets",
    ),
    "sft": ("w2s_jax.objectives.sft", "next-token CE on every completion token (prompt masked)"),
    "salt": ("w2s_jax.objectives.salt", "SALT: (1-w)CE + w KD from a small --teacher, then CE"),
}

_registered: dict[str, Objective] = {}


def objective_names() -> tuple[str, ...]:
    """Every known objective name: the built-in ones, then the registered ones."""
    return (*BUILTIN, *(name for name in _registered if name not in BUILTIN))


def get_objective(name: str) -> Objective:
    """The objective called `name`; ValueError naming the known ones if there is none."""
    if name in _registered:
        return _registered[name]
    if name not in BUILTIN:
        raise ValueError(
            f"unknown objective {name!r}; known objectives: {', '.join(objective_names())}"
        )
    objective = importlib.import_module(BUILTIN[name][0]).OBJECTIVE
    if objective.name != name:
        raise ValueError(f"{BUILTIN[name][0]} defines objective {objective.name!r}, not {name!r}")
    return _registered.setdefault(name, objective)


def register(objective: Objective) -> Objective:
    """Make `objective` known by its name (replacing one of that name); returns it."""
    _registered[objective.name] = objective
    return objective
