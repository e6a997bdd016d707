"""Sequence classification data, training and prediction (the weak-to-strong stage's engine).

Data: JSONL records {"id", "label"} with either "text" (encoded as is, with the
tokenizer's own special tokens) or "prompt" and "completion" (the prompt formatted as
`w2s eval` does, chat template or plain, then the completion's ids). `label` is a
class id in 0..C-1. Sequences longer than `max_length` keep their last tokens (the
classifier reads the last one).

Training (`fit`): AdamW with linear decay and clipping (`train.build_optimizer`), one
jitted step over a fixed batch of rows (the last batch padded with rows marked
invalid, which enter no loss), the loss a weak-to-strong loss of
`w2s_jax.objectives.w2s_losses` with step_frac = step / steps, as published.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import types
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from w2s_jax import sharding
from w2s_jax.files import DataError, read_jsonl
from w2s_jax.models.classifier import trainable_filter
from w2s_jax.objectives.w2s_losses import check_soft_labels, loss_function


def read_examples(path: str | Path, num_classes: int) -> list[dict]:
    """Checked classification records of a JSONL file (DataError naming file:line)."""
    records, seen = [], set()
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "text" not in record and not {"prompt", "completion"} <= set(record):
            raise DataError(
                f"{where}: a classification record needs 'text', or 'prompt' and 'completion' "
                f"(got keys {', '.join(sorted(record)) or 'none'})"
            )
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
            raise DataError(
                f"{where}: label {label!r} is not a class id in 0..{num_classes - 1} "
                f"(--num-classes {num_classes})"
            )
        if "id" not in record or str(record["id"]) in seen:
            raise DataError(f"{where}: every record needs a unique 'id' (got {record.get('id')!r})")
        seen.add(str(record["id"]))
        records.append({**record, "id": str(record["id"])})
    if not records:
        raise DataError(f"{path}: no records")
    return records


def encode_examples(
    model_dir: str | Path, records: list[dict], *, style: str, system_prompt: str, max_length: int
) -> tuple[list[list[int]], int, int]:
    """(token ids per record, pad id, how many records were cut) with `model_dir`'s
    tokenizer. A record longer than `max_length` keeps its last `max_length` tokens (the
    class is read at the last one). A `max_length` beyond the model's context is a
    ValueError, and so is a model that cannot format the records (no chat template for
    prompt/completion records)."""
    from w2s_jax.models import load_tokenizer
    from w2s_jax.prompts import prompt_ids

    context = json.loads((Path(model_dir) / "config.json").read_text()).get(
        "max_position_embeddings"
    )
    if context and max_length > context:
        raise ValueError(
            f"--max-length {max_length} is longer than {model_dir}'s context of {context} "
            "positions (max_position_embeddings); lower it"
        )
    tokenizer = load_tokenizer(model_dir)
    encoded, cut = [], 0
    for record in records:
        if "text" in record:
            ids = list(tokenizer(record["text"])["input_ids"])
        else:
            try:
                ids = prompt_ids(
                    tokenizer, record["prompt"], style=style, system_prompt=system_prompt
                )
            except ValueError as exc:
                raise ValueError(
                    f"{model_dir}: cannot format the data's prompt/completion records ({exc}); "
                    "weak and strong must both read the data: use --prompt-style plain or "
                    "'text' records"
                ) from None
            ids += tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"record {record['id']}: encodes to no tokens")
        cut += len(ids) > max_length
        encoded.append(ids[-max_length:])
    return encoded, int(tokenizer.pad_token_id or 0), cut


def one_hot_labels(records: list[dict], num_classes: int) -> np.ndarray:
    """Ground-truth labels as float32 one-hot rows [N, C]."""
    return np.eye(num_classes, dtype=np.float32)[[r["label"] for r in records]]


def padded_length(rows: list[list[int]], length_bucket: int) -> int:
    """The longest row rounded up to a multiple of `length_bucket` (one shape per call)."""
    return -(-max(len(r) for r in rows) // length_bucket) * length_bucket


def pad_rows(rows: list[list[int]], *, batch_size: int, length: int, pad_id: int):
    """(ids [B, length], mask [B, length], valid [B]): rows right-padded, and the batch
    filled up to `batch_size` rows with invalid (all-padding) rows."""
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask, np.arange(batch_size) < len(rows)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How one classifier trains (see the weak-to-strong settings for each field)."""

    loss: str = "xent"
    loss_options: tuple[tuple[str, object], ...] = ()
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    length_bucket: int = 32
    seed: int = 0
    progress: bool = False

    def optimizer(self, steps: int) -> tuple:
        """The optimizer's settings for `steps` steps (hashable: compiled steps are cached)."""
        return (
            ("learning_rate", self.learning_rate),
            ("steps", steps),
            ("warmup_steps", min(self.warmup_steps, steps - 1)),
            ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm),
            ("adam_b1", self.adam_b1),
            ("adam_b2", self.adam_b2),
            ("adam_eps", self.adam_eps),
        )


@functools.lru_cache(maxsize=32)
def _compiled_step(graphdef, optimizer: tuple, loss: str, loss_options: tuple):
    """(tx, jitted step) for one model structure, optimizer and loss; classifiers of the same
    structure (every seed, the ceiling and the xent student) reuse one compilation."""
    from w2s_jax.train import build_optimizer

    tx, _ = build_optimizer(types.SimpleNamespace(**dict(optimizer)))
    loss_fn = loss_function(loss, **dict(loss_options))

    def step(state, rest, ids, mask, labels, valid, step_frac):
        params, opt_state = state

        def loss_of(p):
            logits = nnx.merge(graphdef, p, rest, copy=True)(ids, mask)
            return loss_fn(logits, labels, step_frac, valid), logits

        (loss, logits), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        hits = (jnp.argmax(logits, -1) == jnp.argmax(labels, -1)) & valid
        accuracy = jnp.sum(hits) / jnp.maximum(jnp.sum(valid), 1)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), {"loss": loss, "accuracy": accuracy}

    return tx, jax.jit(step, donate_argnums=0)


def fit(
    model,
    mode: str,
    rows: list[list[int]],
    labels_nc,
    options: FitOptions,
    *,
    pad_id: int,
    mesh,
    log: Callable[[str], None] = print,
) -> dict:
    """Train `model` in place on token rows and soft labels [N, C]; returns a summary."""
    from tqdm.auto import tqdm

    labels_nc = np.asarray(labels_nc, np.float32)
    check_soft_labels(labels_nc, model.num_classes, where="training labels")
    n, b = len(rows), options.batch_size
    steps = max(1, math.ceil(n * options.epochs / b))
    order = np.concatenate(
        [np.random.default_rng([options.seed, e]).permutation(n) for e in range(options.epochs)]
    )
    graphdef, params, rest = nnx.split(model, trainable_filter(mode), ...)
    tx, step_fn = _compiled_step(
        graphdef, options.optimizer(steps), options.loss, options.loss_options
    )
    state = (params, sharding.replicate(jax.jit(tx.init)(params), mesh))
    length = padded_length(rows, options.length_bucket)
    started, history = time.perf_counter(), []
    for step in tqdm(range(steps), disable=not options.progress, desc=options.loss):
        index = order[step * b : (step + 1) * b]
        ids, mask, valid = pad_rows(
            [rows[i] for i in index], batch_size=b, length=length, pad_id=pad_id
        )
        labels = np.zeros((b, labels_nc.shape[1]), np.float32)
        labels[: len(index)] = labels_nc[index]
        placed = [sharding.place_batch(x, mesh) for x in (ids, mask, labels, valid)]
        state, metrics = step_fn(state, rest, *placed, jnp.float32(step / steps))
        history.append(metrics)
    final = {k: float(np.mean([m[k] for m in history[-10:]])) for k in history[-1]}
    if not np.isfinite(final["loss"]):
        raise ValueError(f"training with the {options.loss} loss diverged (loss {final['loss']})")
    nnx.update(model, state[0])
    seconds = time.perf_counter() - started
    log(f"  {options.loss}: {steps} steps, last-10 loss {final['loss']:.4f}, {seconds:.0f} s")
    return {"steps": steps, "final": final, "seconds": seconds}


@functools.lru_cache(maxsize=8)
def _compiled_probs(graphdef):
    return jax.jit(
        lambda state, ids, mask: jax.nn.softmax(
            nnx.merge(graphdef, state, copy=True)(ids, mask), -1
        )
    )


def predict(model, rows: list[list[int]], *, batch_size: int, length_bucket: int, pad_id, mesh):
    """Class probabilities [N, C] (float32 numpy) of token rows."""
    graphdef, state = nnx.split(model)
    probs_fn = _compiled_probs(graphdef)
    length, out = padded_length(rows, length_bucket), []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask, _ = pad_rows(chunk, batch_size=batch_size, length=length, pad_id=pad_id)
        probs = probs_fn(state, sharding.place_batch(ids, mesh), sharding.place_batch(mask, mesh))
        out.append(sharding.to_host(probs)[: len(chunk)])
    return np.concatenate(out).astype(np.float32)
