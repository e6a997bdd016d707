"""SALT_DS data scores (`w2s score`): how a small model finds each training sequence.

Per record of a samples folder (the `w2s train` input: prompt_ids + completion_ids),
over its completion tokens (the positions `sft` and `salt` train on), the small
model's next-token loss ℓ_t and whether the true token is in its top-k:

- salt_ds: median of ℓ_t over the positions whose true token is in the top-k
  (SALT's score: challenging yet learnable; None when no position is);
- mean_loss: mean of ℓ_t over all positions; topk_hit_rate: the share in the top-k.

One forward per batch of records; losses and ranks come from the hidden states and
the LM head, `chunk_size` positions at a time (`divergence.fused_loss_and_rank`).
Records are scored in fixed shards of `shard_size`, each written atomically to
OUT/shards/NNNNNN.jsonl; a re-run skips the shards already there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np

from w2s_jax.data.kd_selection import SCORE_SHARDS
from w2s_jax.settings import (
    allow_unused_weights_setting,
    at_least,
    attention_setting,
    check,
    compute_dtype_setting,
    free_fields,
    layer_stack_setting,
    model_options,
    param_dtype_setting,
    record,
    setting,
)

RUN_FILE = "score_config.json"


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    """Every setting of a scoring run; `free` ones may change when it resumes."""

    model: str | None = setting(
        None, "The small model's HF folder (SALT's teacher).", metavar="DIR", required=True
    )
    data: str | None = setting(
        None, "A samples folder (as `w2s train --samples`).", metavar="DIR", required=True
    )
    out: str | None = setting(
        None, "Output folder, resumable.", metavar="DIR", required=True, free=True
    )
    top_k: int = setting(
        10, "A position counts when its true token is in the top k.", check=at_least(1)
    )
    batch_size: int = setting(16, "Records per forward pass.", check=at_least(1), free=True)
    shard_size: int = setting(256, "Records per output shard.", check=at_least(1))
    chunk_size: int = setting(
        64, "Positions per block of the loss kernel.", check=at_least(1), free=True
    )
    length_bucket: int = setting(
        64, "Pad lengths to a multiple of this (fewer compilations).", check=at_least(1), free=True
    )
    dtype: str = compute_dtype_setting()
    param_dtype: str | None = param_dtype_setting()
    layer_stack: str = layer_stack_setting()
    attention: str = attention_setting()
    progress: bool = setting(True, "No progress bar.", flags=("--no-progress",), free=True)
    allow_unused_weights: bool = allow_unused_weights_setting()

    def __post_init__(self):
        check(self)


def sequence_scores(losses: np.ndarray, ranks: np.ndarray, top_k: int) -> dict:
    """One record's scores from its positions' losses and target ranks."""
    hits = ranks < top_k
    return {
        "salt_ds": float(np.median(losses[hits])) if hits.any() else None,
        "mean_loss": float(np.mean(losses)),
        "topk_hit_rate": float(np.mean(hits)),
        "positions": int(len(losses)),
    }


@functools.cache
def _jitted_loss_and_rank():
    """`_loss_and_rank` jitted, made on first use (`w2s --help` imports no JAX)."""
    import jax

    return jax.jit(_loss_and_rank, static_argnames=("graphdef", "chunk_size"))


def _loss_and_rank(graphdef, state, input_ids, attention_mask, *, chunk_size):
    """Per-position (loss, rank) of the next token of every row, [B, T - 1]."""
    from flax import nnx

    from w2s_jax.divergence import fused_loss_and_rank

    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(input_ids, attention_mask)[:, :-1]
    head, layout = model.lm_head_matrix()
    targets = input_ids[:, 1:]
    return fused_loss_and_rank(
        hidden,
        head,
        targets,
        chunk_size=min(chunk_size, targets.shape[1]),
        vocab_size=model.token_count,
        head_layout=layout,
    )


def score_trajectories(
    model, trajectories, *, top_k=10, batch_size=16, chunk_size=64, length_bucket=64
) -> list[dict]:
    """Scores (`sequence_scores` + id) of trajectories (`load_trajectories(..., "sft")`), in
    order, `batch_size` per padded forward pass of `model` (a `CausalLM`)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    loss_and_rank = _jitted_loss_and_rank()
    rows = []
    for b in range(0, len(trajectories), batch_size):
        batch = trajectories[b : b + batch_size]
        length = max(len(t.input_ids) for t in batch) + 1
        ids = np.zeros((len(batch), math.ceil(length / length_bucket) * length_bucket), np.int32)
        mask = np.zeros_like(ids)
        for row, t in enumerate(batch):
            full = np.append(t.input_ids, t.target_ids[-1, 0])  # + the last supervised token
            ids[row, : len(full)], mask[row, : len(full)] = full, 1
        losses, ranks = map(
            np.asarray, loss_and_rank(graphdef, state, ids, mask, chunk_size=chunk_size)
        )
        for r, t in enumerate(batch):
            at = t.logit_index
            rows.append({"id": t.id, **sequence_scores(losses[r, at], ranks[r, at], top_k)})
    return rows


def score(settings: ScoreSettings) -> dict:
    """Score every record of `settings.data` with `settings.model` into `settings.out`.

    Returns the summary (also OUT/summary.json): records, positions, and the means over
    records of salt_ds (of those that have one), mean_loss and topk_hit_rate.
    """
    from tqdm.auto import tqdm

    from w2s_jax.data.packing import find_sample_files, load_trajectories
    from w2s_jax.files import atomic_write_jsonl
    from w2s_jax.models import load_pretrained, load_tokenizer

    files = find_sample_files(settings.data)
    tokens = len(load_tokenizer(settings.model))
    trajectories, _ = load_trajectories(files, objective="sft", vocab_size=tokens)
    out = Path(settings.out)
    _claim(out, settings, files)
    allow = settings.allow_unused_weights
    model = load_pretrained(settings.model, allow_unused=allow, **model_options(settings))
    model.restrict_vocab(tokens)
    options = {
        k: getattr(settings, k) for k in ("top_k", "batch_size", "chunk_size", "length_bucket")
    }
    bar = tqdm(total=len(trajectories), desc="score", disable=not settings.progress)
    for number, start in enumerate(range(0, len(trajectories), settings.shard_size)):
        shard = trajectories[start : start + settings.shard_size]
        path = out / SCORE_SHARDS / f"{number:06d}.jsonl"
        if not path.exists():
            atomic_write_jsonl(path, score_trajectories(model, shard, **options))
        bar.update(len(shard))
    bar.close()
    return _summarize(out)


def _claim(out: Path, settings: ScoreSettings, files) -> None:
    """Record the settings and the data's fingerprint; refuse a folder made otherwise."""
    from w2s_jax.data.packing import samples_fingerprint
    from w2s_jax.run_folder import claim

    document = {**record(settings), "data_fingerprint": samples_fingerprint(files)}
    for key in ("model", "data"):
        document[key] = str(Path(document[key]).absolute())
    shards = out / SCORE_SHARDS
    claim(
        out / RUN_FILE,
        document,
        ignore=free_fields(ScoreSettings),
        what="a scoring run",
        has_results=shards.is_dir() and any(shards.glob("*.jsonl")),
    )


def _summarize(out: Path) -> dict:
    """Means over the records of every shard; written to OUT/summary.json."""
    from w2s_jax.data.kd_selection import score_files
    from w2s_jax.files import atomic_write_json, read_jsonl

    rows = [row for file in score_files(out) for _, row in read_jsonl(file)]
    with_score = [r["salt_ds"] for r in rows if r["salt_ds"] is not None]
    summary = {
        "records": len(rows),
        "positions": int(sum(r["positions"] for r in rows)),
        "records_with_score": len(with_score),
        "mean_salt_ds": float(np.mean(with_score)) if with_score else None,
        "mean_loss": float(np.mean([r["mean_loss"] for r in rows])),
        "mean_topk_hit_rate": float(np.mean([r["topk_hit_rate"] for r in rows])),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary
