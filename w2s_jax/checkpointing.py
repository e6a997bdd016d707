"""Training checkpoints with Orbax: trainable parameters, optimizer state and a JSON record.

A `w2s train --out DIR` run keeps its checkpoints in DIR/checkpoints/<step>/ with
three items: `params` (the adapters, or every parameter for full fine-tuning),
`opt_state`, and `meta` (step, data position, LoRA settings, parameter shapes,
run settings). `TrainCheckpoints` saves every N steps and keeps the last K;
`StopSignal` turns SIGTERM (a TPU preemption notice) into a save-and-exit.

A checkpoint keeps the layer layout of the run that wrote it (`ModelConfig.layer_stack`:
per-layer `layers/{i}/...` or stacked `layers/...` [L, ...]); restoring into the other
layout converts it, so a run resumes and exports whatever layout it is loaded in.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from w2s_jax import sharding

CHECKPOINT_DIR = "checkpoints"


def _manager(directory: Path, *, save_every: int = 1, keep: int | None = None, owner=False):
    """Orbax's manager of `directory`; the `owner` (a training run, alone on its folder)
    also deletes the unfinished step folders a killed run left (process 0 does)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=True, cleanup_tmp_directories=owner
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def param_shapes(params) -> dict[str, list[int]]:
    """{"model/layers/0/self_attn/q_proj/lora_a/value": [64, 8], ...} of a parameter pytree."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): list(leaf.shape)
        for path, leaf in flat
    }


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _stacked(names) -> bool:
    """Whether parameter names (`param_shapes` keys) are in the stacked (scan) layout."""
    from w2s_jax.sharding import STACKED_LAYER_PATH

    return any(re.search(STACKED_LAYER_PATH, name) for name in names)


def _to_layout(tree, stacked: bool):
    """`tree` (parameters, or optimizer state holding them) in the stacked or loop layout."""
    from flax import nnx

    from w2s_jax.models.stacking import stack_layers, unstack_layers

    convert = stack_layers if stacked else unstack_layers
    is_state = lambda x: isinstance(x, nnx.State)  # noqa: E731
    return jax.tree.map(lambda x: convert(x) if is_state(x) else x, tree, is_leaf=is_state)


def _place_like(x, like):
    """`x` placed like `like` (an array or a shape with a sharding), on one host or many."""
    placement = getattr(like, "sharding", None)
    return x if placement is None else sharding.put(x, placement)


def _shapes_in_layout(template, stacked: bool):
    """The shapes of `template` in the other layout, replicated over the template's devices
    (its own specs may not fit the new shapes; without a placement Orbax would use the one
    saved, whose devices may not exist here: another topology, other processes)."""
    from jax.sharding import NamedSharding, PartitionSpec

    shapes = jax.eval_shape(lambda t: _to_layout(t, stacked), template)
    placed = getattr(next(iter(jax.tree.leaves(template)), None), "sharding", None)
    if isinstance(placed, NamedSharding):
        placed = NamedSharding(placed.mesh, PartitionSpec())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placed), shapes)


def _restore_in_saved_layout(restore, saved_names, *templates) -> tuple:
    """`restore(*templates)`, the templates (arrays or shapes) in the layout of the
    checkpoint's parameters (`saved_names`); results in the templates' layout, placed like
    them."""
    own, saved = _stacked(param_shapes(templates[0])), _stacked(saved_names)
    if own == saved:
        return restore(*templates)
    restored = restore(*(_shapes_in_layout(t, saved) for t in templates))
    return tuple(
        jax.tree.map(_place_like, _to_layout(result, own), template)
        for result, template in zip(restored, templates, strict=True)
    )


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, say); the message says what exists."""


class TrainCheckpoints:
    """Orbax CheckpointManager over OUT/checkpoints (save every `save_every`, keep `keep`).

    Under multi-host JAX every process makes one and calls each `save` and `restore` at
    the same step: Orbax's saves are collective (each process writes the shards of its
    own devices, process 0 the metadata and `meta`, and it finalizes the step folder).
    """

    def __init__(self, out_dir: str | Path, *, save_every: int, keep: int):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every ({save_every}) and keep ({keep}) must be >= 1")
        self.directory = Path(out_dir) / CHECKPOINT_DIR
        self._manager = _manager(self.directory, save_every=save_every, keep=keep, owner=True)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict, *, force: bool = False) -> bool:
        """Save at `step` when it is due (or `force`); returns whether it saved. A failed
        save (this one, or the one before, finishing in the background) raises
        CheckpointSaveError."""
        meta = {**meta, "step": step, "param_shapes": param_shapes(params)}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        try:
            return self._manager.save(step, args=args, force=force)
        except (OSError, ValueError, RuntimeError) as exc:
            raise self._save_failure(exc) from exc

    def restore(self, step: int, params, opt_state):
        """(params, opt_state, meta) of `step`, laid out and placed like the given templates."""
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta.meta

        def restore(params, opt_state):
            args = ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params)),
                opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            )
            restored = self._manager.restore(step, args=args)
            return restored.params, restored.opt_state

        params, opt_state = _restore_in_saved_layout(
            restore, meta["param_shapes"], params, opt_state
        )
        return params, opt_state, meta

    def wait(self) -> None:
        """Wait for an asynchronous save to finish (CheckpointSaveError when it failed)."""
        try:
            self._manager.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as exc:
            raise self._save_failure(exc) from exc

    def reached_preemption(self, step: int) -> bool:
        """Orbax's multi-host preemption check (all processes agree on the step)."""
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        """Wait for asynchronous saves to finish (CheckpointSaveError when one failed)."""
        try:
            self._manager.wait_until_finished()
            self._manager.close()
        except (OSError, ValueError, RuntimeError) as exc:
            raise self._save_failure(exc) from exc

    def finished_steps(self) -> list[int]:
        """The steps whose checkpoint folder is complete (Orbax renames it when done)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def _save_failure(self, exc: Exception) -> CheckpointSaveError:
        """What a failed save tells the user: where, why, and which checkpoints exist."""
        text = str(exc)
        reason = "No space left on device" if "No space left on device" in text else text[:300]
        steps = self.finished_steps()
        kept = f"checkpoints of steps {steps} are complete" if steps else "no checkpoint exists yet"
        return CheckpointSaveError(
            f"cannot write a checkpoint into {self.directory}: {reason}; {kept}; free the "
            "cause and re-run the same command to resume"
        )


def locate_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, int]:
    """(checkpoints folder, step) for a run folder, its checkpoints/ folder or a step folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint folder does not exist")
    if (path / CHECKPOINT_DIR).is_dir():
        path = path / CHECKPOINT_DIR
    elif path.name.isdigit() and (path / "meta").exists():
        if step is not None and step != int(path.name):
            raise ValueError(f"{path} is the checkpoint of step {path.name}, not step {step}")
        path, step = path.parent, int(path.name)
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"{path}: no checkpoints (expected numbered step folders)")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"{path}: no checkpoint for step {step} (have {steps})")
    return path, step


def read_meta(checkpoint: str | Path, *, step: int | None = None) -> dict:
    """The JSON record of a checkpoint (see module doc); `step` defaults to the latest."""
    directory, step = locate_checkpoint(checkpoint, step)
    manager = _manager(directory)
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    finally:
        manager.close()


def restore_params(checkpoint: str | Path, template, *, step: int | None = None):
    """The trained parameters of a checkpoint, laid out, shaped and placed like `template`.

    Raises ValueError naming the first parameter whose path or shape differs.
    """
    directory, step = locate_checkpoint(checkpoint, step)
    manager = _manager(directory)

    def restore(template):
        want, have = param_shapes(template), meta["param_shapes"]
        for name in sorted(set(want) | set(have)):
            if want.get(name) != have.get(name):
                raise ValueError(
                    f"checkpoint {directory}/{step} does not fit the model: parameter {name} "
                    f"has shape {have.get(name, 'missing')} in the checkpoint and "
                    f"{want.get(name, 'missing')} in the model"
                )
        args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(template)))
        return (manager.restore(step, args=args).params,)

    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        return _restore_in_saved_layout(restore, meta["param_shapes"], template)[0]
    finally:
        manager.close()


class StopSignal:
    """Context manager: SIGTERM sets `requested` instead of killing the process."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)
        return False
