"""What a training objective is: the contract between the data, the jitted step and a loss.

An `Objective` answers four questions, each with a plain function:

1. Data (`record_targets`): which completion positions of a sample record are
   supervised, and towards which sparse targets (token ids + weights). The generic
   part of reading a record (prompt/completion ids, ids in range, unique ids) is
   `w2s_jax.data.packing.load_trajectories`; it calls this for the rest.
2. Batch layout (`collate`, `layout`): the arrays one optimizer step needs, built
   from trajectories by `collate`, and how each is placed on the mesh (`layout`:
   array name -> ROWS, split over the mesh's batch axes with the token rows, or
   POSITIONS, replicated). Every array has a leading micro-batch axis A.
3. Loss (`loss`): (model, micro-batch, LossContext) -> (scalar loss, aux), under
   jit and grad, once per micro-batch. The model is the merged student: the loss
   asks it for what it needs (`model.hidden_states(ids, mask)`, then
   `model.logits(hidden)` or `model.lm_head_kernel()` on the positions it keeps), so
   no objective pays for the full [R, T, V] logits it does not use. aux: a dict of
   scalar arrays that are summed over the micro-batches. `needs_teacher`: the step
   also gets a frozen teacher model, in `LossContext.teacher` (SALT's KD).
4. Metrics (`metrics`): (mean loss over micro-batches, summed aux, whole step's batch)
   -> the reported metrics besides "loss".
5. Settings (`configure`, optional): binds the run's `TrainSettings` (e.g. SALT's KD
   schedule); `LossContext.step` gives the loss the optimizer step's index.

The step in `w2s_jax.train` is written once against this contract and never asks an
objective's name; `w2s_jax.objectives` maps names to objectives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from w2s_jax.data.packing import collate_step

# How an array of the batch is placed (see `w2s_jax.train.batch_shardings`).
ROWS = "rows"  # [A, R, ...]: rows over the mesh's batch axes ("data", "fsdp")
POSITIONS = "positions"  # [A, P, ...]: replicated on every device

# The packed layout of `collate_step`: token rows, and the supervised positions'
# flat indices into them with their sparse targets.
PACKED_LAYOUT: Mapping[str, str] = {
    "input_ids": ROWS,
    "attention_mask": ROWS,
    "flat_index": POSITIONS,
    "target_ids": POSITIONS,
    "target_weights": POSITIONS,
}

# (record, "file:line", its checked completion ids, vocab size or None)
#   -> (supervised completion positions, strictly increasing; one (ids, weights) per position)
RecordTargets = Callable[
    [dict, str, list[int], int | None], tuple[list[int], list[tuple[list[int], list[float]]]]
]


@dataclasses.dataclass(frozen=True)
class LossContext:
    """What the step hands a loss besides the model and the micro-batch.

    loss_chunk_size: project this many positions onto the vocabulary at a time (0: all
    at once). teacher: the frozen teacher model, for objectives with needs_teacher.
    step: the 0-based index of the optimizer step (an int32 scalar under jit), for losses
    whose weights follow a schedule (SALT's KD phase).
    """

    loss_chunk_size: int = 0
    teacher: Any = None
    step: Any = 0


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective (see the module docstring for each part's contract)."""

    name: str
    record_targets: RecordTargets
    loss: Callable[[Any, dict, LossContext], tuple[Any, dict]]
    metrics: Callable[[Any, dict, dict], dict]
    collate: Callable[..., dict] = collate_step
    layout: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(PACKED_LAYOUT))
    needs_teacher: bool = False
    # The targets are the expert's (`w2s sample`): with --expert, a samples folder
    # without manifest.json is refused (one that has it is checked whatever the objective).
    requires_manifest: bool = False
    # (TrainSettings) -> this objective bound to a run's own settings (SALT's KD options),
    # called once before the step is built; None: the objective has no settings of its own.
    configure: Callable[[Any], Objective] | None = None
