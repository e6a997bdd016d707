"""SALT_DS: the KD phase draws its steps from the highest-scoring records.

Scores come from `w2s score` (per record id: `salt_ds`, the median small-model loss
over the positions whose true token is in its top-k; higher = challenging yet
learnable). `--kd-data-selection top=P%` keeps the P% of trajectories with the
highest scores (records without a score value rank last; ties by id) for the first
`kd_steps` steps; later steps draw from every trajectory. Both streams are pure
functions of the seed, so a resumed run replays them exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

from w2s_jax.data.packing import Segment, Trajectory, iter_steps
from w2s_jax.files import DataError, read_jsonl

SCORE_SHARDS = "shards"  # `w2s score` writes OUT/shards/*.jsonl


def score_files(path: str | Path) -> list[Path]:
    """The JSONL files of a `w2s score` --out folder, or [path] for one file."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted((path / SCORE_SHARDS).glob("*.jsonl"))
    if not files:
        raise DataError(f"{path}: no scores (expected {path / SCORE_SHARDS}/*.jsonl or a file)")
    return files


def read_scores(path: str | Path) -> tuple[dict[str, float], str]:
    """(record id -> salt_ds score, NaN where it has none; sha256 of the files' bytes)."""
    scores: dict[str, float] = {}
    digest = hashlib.sha256()
    for file in score_files(path):
        digest.update(file.read_bytes())
        for lineno, record in read_jsonl(file):
            if "id" not in record or "salt_ds" not in record:
                raise DataError(f"{file}:{lineno}: a score record needs 'id' and 'salt_ds'")
            value = record["salt_ds"]
            scores[str(record["id"])] = math.nan if value is None else float(value)
    return scores, digest.hexdigest()


def top_share(trajectories: Sequence[Trajectory], scores: dict[str, float], share: float):
    """Indices of the ceil(share · n) trajectories with the highest scores (at least one)."""
    missing = [t.id for t in trajectories if t.id not in scores]
    if missing:
        raise DataError(
            f"{len(missing)} records have no score (first: {missing[0]!r}); score the "
            "same samples with `w2s score`"
        )

    def rank(i):
        value = scores[trajectories[i].id]
        return (math.isnan(value), -value if not math.isnan(value) else 0.0, trajectories[i].id)

    keep = max(1, math.ceil(share * len(trajectories)))
    return sorted(sorted(range(len(trajectories)), key=rank)[:keep])


def phased_steps(
    trajectories: Sequence[Trajectory],
    kd_subset: Sequence[int],
    *,
    kd_steps: int,
    start_step: int = 0,
    **stream,
) -> Iterator[list[list[Segment]]]:
    """Steps from `start_step` on: the first `kd_steps` from the `kd_subset` trajectories
    (segments index `trajectories`), then from all. `stream`: `iter_steps`' options."""
    subset = [trajectories[i] for i in kd_subset]
    kd = iter_steps(subset, start_step=min(start_step, kd_steps), **stream)
    kd = (
        [[Segment(kd_subset[s.trajectory], s.start, s.stop) for s in micro] for micro in step]
        for step in kd
    )
    after = iter_steps(trajectories, start_step=max(start_step - kd_steps, 0), **stream)
    return itertools.chain(itertools.islice(kd, max(kd_steps - start_step, 0)), after)


def kd_selection(config, trajectories: Sequence[Trajectory], data_fingerprint: str):
    """(KD-phase trajectory indices or None, the data fingerprint with the scores' digest)
    for a run's `TrainSettings` (`--kd-data-selection`, `--kd-scores`)."""
    if config.kd_selection_share is None:
        return None, data_fingerprint
    scores, scores_digest = read_scores(config.kd_scores)
    subset = top_share(trajectories, scores, config.kd_selection_share)
    return subset, f"{data_fingerprint}+scores:{scores_digest}"


def step_stream(trajectories: Sequence[Trajectory], config, start: int, kd_subset=None):
    """A run's seeded stream of steps from step `start` on (a resume replays it); with
    `kd_subset` (SALT_DS) its first `kd_steps` steps draw from those trajectories."""
    stream = dict(
        positions_per_step=config.batch_positions,
        micro_batches=config.grad_accum,
        seed=config.seed,
        bucket_window=config.bucket_window,
        start_step=start,
    )
    if kd_subset is None:
        return iter_steps(trajectories, **stream)
    return phased_steps(trajectories, kd_subset, kd_steps=config.kd_steps, **stream)
