"""Training data for `w2s train`: sample records -> trajectories -> packed, length-bucketed steps.

A trajectory is one record's prompt + completion ids with its supervised positions
and their sparse targets, as the training objective reads them from the record
(`w2s_jax.objectives`: the selected steps and their contrastive targets for
`contrastive`, every completion token as a one-hot target for `sft`). One forward
pass over a trajectory gives the logits of all its supervised positions at once;
the loss gathers them.

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
from typing import TYPE_CHECKING

import numpy as np

from w2s_jax.files import DataError, read_jsonl
from w2s_jax.records import TOKEN_FIELDS, SampleRecord

if TYPE_CHECKING:
    from w2s_jax.objectives.base import Objective
    from w2s_jax.train_config import TrainSettings


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


def load_trajectories(
    files: Sequence[Path],
    *,
    objective: str | Objective = "contrastive",
    vocab_size: int | None = None,
) -> tuple[list[Trajectory], dict]:
    """Read and check every record of the sample shards.

    The objective (a name in `w2s_jax.objectives`, or an `Objective`) says which
    completion positions a record supervises and their targets: `contrastive` the
    selected `positions` with their sparse targets; `sft` every completion token.
    Every record is checked by `SampleRecord.from_json`; token ids must be below
    `vocab_size` when given. Records with no supervised position are counted, not
    trained. Returns (trajectories, stats) where stats has records, trajectories,
    positions, tokens and k (the widest target).
    Errors name the file and line.
    """
    if isinstance(objective, str):
        from w2s_jax.objectives import get_objective  # the registry: imported on use

        objective = get_objective(objective)
    out: list[Trajectory] = []
    records = 0
    seen: dict[str, str] = {}
    for path in files:
        for lineno, record in read_jsonl(path):
            where = f"{path}:{lineno}"
            records += 1
            sample = SampleRecord.from_json(
                record, where=where, vocab_size=vocab_size, required=TOKEN_FIELDS
            )
            prompt, completion = sample.prompt_ids, sample.completion_ids
            rid = sample.id if sample.id is not None else f"{path.name}:{lineno}"
            if rid in seen:
                raise DataError(f"{where}: id {rid!r} already used at {seen[rid]}")
            seen[rid] = where
            positions, rows = objective.record_targets(record, where, completion, vocab_size)
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


def check_samples_match(samples: str | Path, expert: str | Path) -> dict:
    """The samples folder's manifest, after checking it was made with this expert (or, for
    samples of a run checkpoint, its `w2s export`: `model_source.check_sampled_by`) and
    tokenizer. Raises DataError naming what differs.
    """
    from w2s_jax.fingerprint import tokenizer_fingerprint
    from w2s_jax.model_source import check_sampled_by
    from w2s_jax.models import load_tokenizer
    from w2s_jax.sample_store import read_manifest

    manifest = read_manifest(samples)
    check_sampled_by(manifest, samples, expert)
    recorded, actual = (
        manifest.get("tokenizer_fingerprint"),
        tokenizer_fingerprint(load_tokenizer(expert)),
    )
    if recorded != actual:
        raise DataError(
            f"{samples}/manifest.json: the samples were made with a different tokenizer "
            f"(tokenizer_fingerprint {recorded} there, {actual} for --expert {expert}); sample "
            "again with this expert or train the expert they came from"
        )
    return manifest


def _token_count(config: TrainSettings, manifest: dict, model_config) -> int:
    """Real token ids: the samples' tokenizer size, else the tokenizer's, else every row."""
    if manifest.get("vocab_size"):
        return int(manifest["vocab_size"])
    from w2s_jax.teacher import student_tokenizer_folder

    folder = student_tokenizer_folder(config)
    if folder:
        from w2s_jax.models import load_tokenizer

        return len(load_tokenizer(folder))
    return model_config.vocab_size


def load_training_data(config: TrainSettings):
    """(trajectories, stats, samples fingerprint, pad id, model config, token count) of a
    `w2s train` run, checked against its expert.

    Target and input ids must be real tokens (below the token count), not padded rows.
    """
    from w2s_jax.models import ModelConfig
    from w2s_jax.objectives import get_objective

    files = find_sample_files(config.samples)
    manifest = {}
    if config.expert and (Path(config.samples) / "manifest.json").exists():
        manifest = check_samples_match(config.samples, config.expert)
    elif config.expert and get_objective(config.objective).requires_manifest:
        raise DataError(
            f"{config.samples}/manifest.json is missing: cannot check that the samples were "
            f"drawn from --expert {config.expert}"
        )
    model_config = ModelConfig.from_hf_json(
        config.model_config if config.init == "random" else Path(config.expert) / "config.json"
    )
    token_count = _token_count(config, manifest, model_config)
    if token_count > model_config.vocab_size:
        raise DataError(
            f"the tokenizer has {token_count} tokens but the model only "
            f"{model_config.vocab_size} output rows"
        )
    trajectories, stats = load_trajectories(
        files, objective=config.objective, vocab_size=token_count
    )
    pad_id = int(manifest.get("pad_id") or 0)
    return trajectories, stats, samples_fingerprint(files), pad_id, model_config, token_count
