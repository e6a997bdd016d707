"""One sample record: a line of `samples/*.jsonl`, built, written and checked in one place.

A record holds one question's expert rollout and what training needs from it:

- `id`: the question's id;
- `prompt_ids` (never empty) and `completion_ids`: token ids of the prompt and the rollout;
- `kl`: KL(π_E‖π_A) at every completion position (one number per completion token);
  null at a position the expert/amateur alignment could not match (an amateur of another
  tokenizer, docs/CROSS_TOKENIZER.md), never at a selected position;
- `positions`: the selected indices into `completion_ids`, strictly increasing;
- `target_ids`, `target_weights`: one row per selected position, each row non-empty and
  as long as its partner; weights finite, >= 0 and summing to (0, 1].

Token ids must lie in [0, vocab_size) when a vocabulary size is given.
`w2s_jax.sampling.build_records` builds records, `w2s_jax.sample_store` writes and reads
them, and `w2s_jax.data.packing` turns them into training trajectories. Supervised
fine-tuning records (`w2s_jax.data.sft_records`) are the same schema without `kl` and
the targets. `SampleRecord.from_json` checks a JSON object field by field and raises
`DataError` naming the file and line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from w2s_jax.files import DataError

RECORD_FIELDS = (
    "id",
    "prompt_ids",
    "completion_ids",
    "kl",
    "positions",
    "target_ids",
    "target_weights",
)
TOKEN_FIELDS = ("prompt_ids", "completion_ids")  # always required
TARGET_FIELDS = ("positions", "target_ids", "target_weights")  # all or none
WEIGHT_SUM_SLACK = 1e-3  # float32 targets may sum to a little over 1


@dataclass(frozen=True)
class SampleRecord:
    """One line of a samples shard. Optional fields are None when a record lacks them
    (training data written by hand, supervised fine-tuning records)."""

    id: str | None
    prompt_ids: list[int]
    completion_ids: list[int]
    kl: list[float | None] | None = None
    positions: list[int] | None = None
    target_ids: list[list[int]] | None = None
    target_weights: list[list[float]] | None = None

    def to_json(self) -> dict:
        """The JSON object written to a shard: fields in `RECORD_FIELDS` order, None left out."""
        values = {name: getattr(self, name) for name in RECORD_FIELDS}
        return {name: value for name, value in values.items() if value is not None}

    @classmethod
    def from_json(
        cls,
        obj,
        *,
        where: str,
        vocab_size: int | None = None,
        required: Iterable[str] = RECORD_FIELDS,
    ) -> SampleRecord:
        """A checked record from one JSON object; DataError names `where` ("path:line").

        `required`: the fields that must be present (`prompt_ids` and `completion_ids`
        always are); a field that is present is checked whether required or not, and
        the target fields come all together or not at all. An integer id becomes a string.
        """
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        needed = [*TOKEN_FIELDS, *required]
        if any(name in obj for name in TARGET_FIELDS):
            needed += TARGET_FIELDS
        missing = [name for name in dict.fromkeys(needed) if name not in obj]
        if missing:
            fields = "field " if len(missing) == 1 else "fields "
            verb = " is" if len(missing) == 1 else " are"
            raise DataError(
                f"{where}: {fields}{', '.join(map(repr, missing))}{verb} missing "
                "(is this a `w2s sample` output?)"
            )
        prompt = int_list(obj["prompt_ids"], where, "prompt_ids", 0, vocab_size)
        completion = int_list(obj["completion_ids"], where, "completion_ids", 0, vocab_size)
        if not prompt:
            raise DataError(f"{where}: field 'prompt_ids' is empty")
        kl = _kl(obj["kl"], where, len(completion)) if "kl" in obj else None
        targets = (None, None, None)
        if "positions" in obj:
            targets = _targets(obj, where, len(completion), vocab_size)
            if kl is not None and any(kl[t] is None for t in targets[0]):
                first = next(t for t in targets[0] if kl[t] is None)
                raise DataError(f"{where}: selected position {first} has a null kl")
        return cls(_id(obj, where), prompt, completion, kl, *targets)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _id(obj: dict, where: str) -> str | None:
    if "id" not in obj:
        return None
    value = obj["id"]
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field 'id' must be a string, got {type(value).__name__}")


def int_list(value, where: str, field: str, low: int, high: int | None) -> list[int]:
    """`value`, checked to be a list of integers in [low, high) (DataError naming `where`)."""
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise DataError(f"{where}: field {field!r} must be a list of integers")
    bad = [v for v in value if v < low or (high is not None and v >= high)]
    if bad:
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise DataError(f"{where}: field {field!r} has value {bad[0]} outside {bound}")
    return value


def _kl(value, where: str, completion_len: int) -> list[float | None]:
    if not isinstance(value, list) or not all(_is_number(v) or v is None for v in value):
        raise DataError(f"{where}: field 'kl' must be a list of numbers (null: unaligned)")
    if len(value) != completion_len:
        raise DataError(f"{where}: {len(value)} kl values for {completion_len} completion tokens")
    return value


def _targets(obj: dict, where: str, completion_len: int, vocab_size: int | None):
    """(positions, target_ids, target_weights), checked."""
    positions = int_list(obj["positions"], where, "positions", 0, completion_len)
    if any(b <= a for a, b in zip(positions, positions[1:], strict=False)):
        raise DataError(f"{where}: field 'positions' must be strictly increasing")
    ids, weights = obj["target_ids"], obj["target_weights"]
    if not isinstance(ids, list) or not isinstance(weights, list):
        raise DataError(f"{where}: 'target_ids' and 'target_weights' must be lists of lists")
    if not len(ids) == len(weights) == len(positions):
        raise DataError(
            f"{where}: {len(positions)} positions but {len(ids)} target_ids and "
            f"{len(weights)} target_weights lists"
        )
    for j, (row_ids, row_weights) in enumerate(zip(ids, weights, strict=True)):
        int_list(row_ids, where, f"target_ids[{j}]", 0, vocab_size)
        _check_weights(row_weights, where, j, len(row_ids))
    return positions, ids, weights


def _check_weights(row, where: str, j: int, count: int) -> None:
    if not (isinstance(row, list) and all(_is_number(w) for w in row)):
        got = f"a {type(row).__name__}" if not isinstance(row, list) else "a non-number"
    elif len(row) != count or not count:
        got = f"{count} ids and {len(row)} weights"
    else:
        got = None
    if got is not None:
        raise DataError(
            f"{where}: target_weights[{j}] must be a non-empty list of numbers as long "
            f"as target_ids[{j}] (got {got})"
        )
    finite = all(math.isfinite(w) for w in row)
    if not finite or min(row) < 0 or not 0 < math.fsum(row) <= 1 + WEIGHT_SUM_SLACK:
        raise DataError(
            f"{where}: target_weights[{j}] must be finite, >= 0 and sum to (0, 1], "
            f"got sum {sum(row):.6g}"
        )
