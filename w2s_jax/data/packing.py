"""Training data for `w2s train`: sample records -> trajectories -> packed, length-bucketed steps.

A trajectory is one record's prompt + completion ids with its supervised positions:
the selected steps and their sparse contrastive targets (`contrastive`), or every
completion token as a one-hot target (`sft`). One forward pass over a trajectory
gives the logits of all its supervised positions at once; the loss gathers them.

Steps hold exactly `positions_per_step` supervised positions, split into
`micro_batches` equal micro-batches (gradient accumulation). Positions are taken
in trajectory order from an endless stream (reshuffled every epoch, sorted by
length inside windows so a micro-batch's rows have similar lengths); a trajectory
whose positions straddle a boundary appears as a segment in both micro-batches.
The stream is a pure function of the seed, so a resumed run replays it exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from w2s_jax.files import DataError, read_jsonl

OBJECTIVES = ("contrastive", "sft")


@dataclass(frozen=True)
class Trajectory:
    """One record ready for training.

    input_ids: i32[L] prompt + completion, cut after the last token any position needs.
    logit_index: i32[n] index into input_ids of the logits that predict each supervised
      token (prompt length + completion position - 1), strictly increasing.
    target_ids, target_weights: [n, k] sparse soft targets, heaviest first (weight 0 pads).
    """

    id: str
    input_ids: np.ndarray
    logit_index: np.ndarray
    target_ids: np.ndarray
    target_weights: np.ndarray

    @property
    def num_positions(self) -> int:
        return len(self.logit_index)


@dataclass(frozen=True)
class Segment:
    """Supervised positions [start, stop) of trajectory number `trajectory`."""

    trajectory: int
    start: int
    stop: int


def find_sample_files(folder: str | Path) -> list[Path]:
    """The JSONL shards of a `w2s sample` output folder (`DIR/samples/*.jsonl` or `DIR/*.jsonl`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: samples folder does not exist")
    shards = folder / "samples"
    files = sorted((shards if shards.is_dir() else folder).glob("*.jsonl"))
    if not files:
        raise DataError(f"{folder}: no samples (expected {shards}/*.jsonl or {folder}/*.jsonl)")
    return files


def samples_fingerprint(files: Sequence[Path]) -> str:
    """sha256 over the names and bytes of the shards (a resumed run must see the same data)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _int_list(value, where: str, field: str, low: int, high: int | None) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise DataError(f"{where}: field {field!r} must be a list of integers")
    bad = [v for v in value if v < low or (high is not None and v >= high)]
    if bad:
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise DataError(f"{where}: field {field!r} has value {bad[0]} outside {bound}")
    return value


def _contrastive_targets(record: dict, where: str, completion_len: int, vocab_size: int | None):
    for field in ("positions", "target_ids", "target_weights"):
        if field not in record:
            raise DataError(f"{where}: field {field!r} is missing (is this a `w2s sample` output?)")
    positions = _int_list(record["positions"], where, "positions", 0, completion_len)
    if any(b <= a for a, b in zip(positions, positions[1:], strict=False)):
        raise DataError(f"{where}: field 'positions' must be strictly increasing")
    ids, weights = record["target_ids"], record["target_weights"]
    if not isinstance(ids, list) or not isinstance(weights, list):
        raise DataError(f"{where}: 'target_ids' and 'target_weights' must be lists of lists")
    if not len(ids) == len(weights) == len(positions):
        raise DataError(
            f"{where}: {len(positions)} positions but {len(ids)} target_ids and "
            f"{len(weights)} target_weights lists"
        )
    rows = []
    for j, (row_ids, row_w) in enumerate(zip(ids, weights, strict=True)):
        row_ids = _int_list(row_ids, where, f"target_ids[{j}]", 0, vocab_size)
        ok = isinstance(row_w, list) and all(
            isinstance(w, int | float) and not isinstance(w, bool) for w in row_w
        )
        if not ok or len(row_w) != len(row_ids) or not row_ids:
            raise DataError(
                f"{where}: target_weights[{j}] must be a non-empty list of numbers as long "
                f"as target_ids[{j}]"
            )
        w = np.asarray(row_w, np.float64)
        if not np.all(np.isfinite(w)) or w.min() < 0 or not 0 < w.sum() <= 1 + 1e-3:
            raise DataError(
                f"{where}: target_weights[{j}] must be finite, >= 0 and sum to (0, 1], "
                f"got sum {w.sum():.6g}"
            )
        rows.append((row_ids, row_w))
    return positions, rows


def load_trajectories(
    files: Sequence[Path], *, objective: str = "contrastive", vocab_size: int | None = None
) -> tuple[list[Trajectory], dict]:
    """Read and check every record of the sample shards.

    `contrastive` trains the selected `positions` on their sparse targets; `sft`
    trains every completion token (next-token cross-entropy, prompt masked).
    Token ids must be below `vocab_size` when given. Records with no supervised
    position are counted, not trained. Returns (trajectories, stats) where stats
    has records, trajectories, positions, tokens and k (the widest target).
    Errors name the file and line.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {OBJECTIVES}")
    out: list[Trajectory] = []
    records = 0
    seen: dict[str, str] = {}
    for path in files:
        for lineno, record in read_jsonl(path):
            where = f"{path}:{lineno}"
            records += 1
            for field in ("prompt_ids", "completion_ids"):
                if field not in record:
                    raise DataError(f"{where}: field {field!r} is missing")
            prompt = _int_list(record["prompt_ids"], where, "prompt_ids", 0, vocab_size)
            completion = _int_list(record["completion_ids"], where, "completion_ids", 0, vocab_size)
            if not prompt:
                raise DataError(f"{where}: field 'prompt_ids' is empty")
            rid = str(record.get("id", f"{path.name}:{lineno}"))
            if rid in seen:
                raise DataError(f"{where}: id {rid!r} already used at {seen[rid]}")
            seen[rid] = where
            if objective == "sft":
                positions = list(range(len(completion)))
                rows = [([t], [1.0]) for t in completion]
            else:
                positions, rows = _contrastive_targets(record, where, len(completion), vocab_size)
            if not positions:
                continue
            tokens = np.asarray(prompt + completion[: positions[-1]], np.int32)
            k = max(len(r[0]) for r in rows)
            ids = np.zeros((len(rows), k), np.int32)
            weights = np.zeros((len(rows), k), np.float32)
            for j, (row_ids, row_w) in enumerate(rows):
                order = np.argsort(-np.asarray(row_w), kind="stable")  # top target first
                ids[j, : len(row_ids)] = np.asarray(row_ids)[order]
                weights[j, : len(row_w)] = np.asarray(row_w)[order]
            index = np.asarray(positions, np.int32) + len(prompt) - 1
            out.append(Trajectory(rid, tokens, index, ids, weights))
    if records == 0:
        raise DataError(f"no records in {', '.join(map(str, files))}")
    positions = sum(t.num_positions for t in out)
    if positions == 0:
        raise DataError(
            f"none of the {records} records in {', '.join(map(str, files))} has a supervised "
            "position (contrastive: 'positions' all empty; sft: all completions empty)"
        )
    stats = {
        "records": records,
        "trajectories": len(out),
        "positions": positions,
        "tokens": int(sum(len(t.input_ids) for t in out)),
        "k": max(t.target_ids.shape[1] for t in out),
    }
    return out, stats


def _epoch_order(lengths: np.ndarray, *, seed: int, epoch: int, bucket_window: int) -> np.ndarray:
    """A seeded permutation, sorted by length inside consecutive windows of `bucket_window`."""
    perm = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    windows = [perm[i : i + bucket_window] for i in range(0, len(perm), bucket_window)]
    return np.concatenate([w[np.argsort(lengths[w], kind="stable")] for w in windows])


def iter_steps(
    trajectories: Sequence[Trajectory],
    *,
    positions_per_step: int,
    micro_batches: int = 1,
    seed: int = 0,
    bucket_window: int = 64,
    start_step: int = 0,
) -> Iterator[list[list[Segment]]]:
    """Endless steps, each a list of `micro_batches` micro-batches of segments.

    Every micro-batch holds exactly positions_per_step / micro_batches positions.
    `start_step` skips that many steps (the replay is cheap: indices only).
    """
    if positions_per_step < 1 or micro_batches < 1 or positions_per_step % micro_batches:
        raise ValueError(
            f"positions per step ({positions_per_step}) must be a positive multiple of the "
            f"number of micro-batches ({micro_batches})"
        )
    if bucket_window < 1:
        raise ValueError(f"bucket window must be >= 1, got {bucket_window}")
    per_micro = positions_per_step // micro_batches
    lengths = np.asarray([len(t.input_ids) for t in trajectories])
    counts = [t.num_positions for t in trajectories]
    step, epoch = 0, 0
    micro: list[Segment] = []
    room = per_micro
    step_micros: list[list[Segment]] = []
    while True:
        for i in _epoch_order(lengths, seed=seed, epoch=epoch, bucket_window=bucket_window):
            start = 0
            while start < counts[i]:
                stop = min(counts[i], start + room)
                micro.append(Segment(int(i), start, stop))
                room -= stop - start
                start = stop
                if room == 0:
                    step_micros.append(micro)
                    micro, room = [], per_micro
                    if len(step_micros) == micro_batches:
                        if step >= start_step:
                            yield step_micros
                        step += 1
                        step_micros = []
        epoch += 1


def _round_rows(rows: int, multiple: int) -> int:
    rows = 1 << max(rows - 1, 0).bit_length()  # next power of two
    return math.ceil(max(rows, multiple) / multiple) * multiple


def collate_step(
    trajectories: Sequence[Trajectory],
    step: list[list[Segment]],
    *,
    k: int,
    pad_id: int = 0,
    length_bucket: int = 64,
    row_multiple: int = 1,
) -> dict[str, np.ndarray]:
    """Arrays for one step; A micro-batches, R rows, T tokens, P positions, K target slots.

    input_ids, attention_mask: i32[A, R, T] (right padding; rows padded to a power of
      two that is a multiple of `row_multiple`, length to a multiple of `length_bucket`).
    flat_index: i32[A, P] = row * T + logit index, into the flattened [R * T] positions.
    target_ids i32[A, P, K], target_weights f32[A, P, K].
    """
    needed = [
        [int(trajectories[s.trajectory].logit_index[s.stop - 1]) + 1 for s in micro]
        for micro in step
    ]
    rows = _round_rows(max(len(m) for m in step), row_multiple)
    length = math.ceil(max(max(n) for n in needed) / length_bucket) * length_bucket
    per_micro = sum(s.stop - s.start for s in step[0])
    a = len(step)
    input_ids = np.full((a, rows, length), pad_id, np.int32)
    attention_mask = np.zeros((a, rows, length), np.int32)
    flat_index = np.zeros((a, per_micro), np.int32)
    target_ids = np.zeros((a, per_micro, k), np.int32)
    target_weights = np.zeros((a, per_micro, k), np.float32)
    for m, (micro, lens) in enumerate(zip(step, needed, strict=True)):
        p = 0
        for r, (seg, n) in enumerate(zip(micro, lens, strict=True)):
            traj = trajectories[seg.trajectory]
            input_ids[m, r, :n] = traj.input_ids[:n]
            attention_mask[m, r, :n] = 1
            q = p + seg.stop - seg.start
            flat_index[m, p:q] = r * length + traj.logit_index[seg.start : seg.stop]
            kk = traj.target_ids.shape[1]
            target_ids[m, p:q, :kk] = traj.target_ids[seg.start : seg.stop]
            target_weights[m, p:q, :kk] = traj.target_weights[seg.start : seg.stop]
            p = q
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "flat_index": flat_index,
        "target_ids": target_ids,
        "target_weights": target_weights,
    }
