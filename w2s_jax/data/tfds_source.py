"""Question sources from TensorFlow Datasets, read without TensorFlow, plus a dispatcher.

`tfds:NAME` (e.g. `tfds:gsm8k`) reads a dataset already prepared in the
array_record file format in a local TFDS data dir, through
`tfds.data_source` (the `tfds` extra: tensorflow-datasets + array_record; no
TensorFlow, no download). Any other source string is a JSONL file read by
`w2s_jax.data.sources.load_questions`.

Prepare GSM8K once on a machine with internet access:
`tfds build gsm8k --data_dir DIR --file_format array_record`.
"""

from __future__ import annotations

import os
from pathlib import Path

from w2s_jax.data.sources import Question, SourceRecord, load_questions, questions_from_records
from w2s_jax.files import DataError

TFDS_PREFIX = "tfds:"


def _plain(value):
    """A TFDS feature value as a plain Python value: Text (bytes) as str, numpy
    scalars as Python scalars; anything else (arrays, None) unchanged."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if getattr(value, "ndim", None) == 0:  # numpy scalar or 0-d array
        return _plain(value.item())
    return value


def default_tfds_data_dir() -> str:
    """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR", str(Path("~/tensorflow_datasets").expanduser()))


def load_tfds_questions(
    name: str, *, split: str = "train", data_dir: str | None = None, **fields
) -> list[Question]:
    """Read questions from a prepared TFDS dataset (array_record format) without TensorFlow.

    `fields` are the options of `questions_from_records` (field names,
    `require_answer`, `max_questions`). Records without an id get "NAME/SPLIT/INDEX"
    (INDEX is the record's position in the prepared split, stable for a given data
    dir). Errors name the dataset, split and record index.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise DataError(
            f"{TFDS_PREFIX}{name}: tensorflow-datasets is not installed; "
            "install the extra with: pip install 'w2s-jax[tfds]'"
        ) from exc
    data_dir = data_dir or default_tfds_data_dir()
    where = f"{TFDS_PREFIX}{name} (split {split!r}, data dir {data_dir})"
    missing = DataError(
        f"{where}: dataset not found; prepare it with "
        f"`tfds build {name} --data_dir {data_dir} --file_format array_record`"
    )
    if not (Path(data_dir) / name.split(":")[0]).is_dir():
        raise missing
    try:
        source = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False, try_gcs=False
        )
    except tfds.core.registered.DatasetNotFoundError as exc:
        raise missing from exc
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        raise DataError(f"{where}: cannot open as an array_record data source: {exc}") from exc

    records = (
        SourceRecord(
            f"{where} record {index}",
            f"record {index}",
            f"{name}/{split}/{index}",
            {key: _plain(value) for key, value in source[index].items()},
        )
        for index in range(len(source))
    )
    return questions_from_records(records, **fields)


def load_source(
    source: str, *, split: str = "train", data_dir: str | None = None, **fields
) -> list[Question]:
    """Questions from `tfds:NAME` (with `split`, `data_dir`) or from a JSONL path.

    `split` and `data_dir` apply to TFDS sources only; `fields` are the options of
    `w2s_jax.data.sources.questions_from_records`.
    """
    if source.startswith(TFDS_PREFIX):
        name = source[len(TFDS_PREFIX) :]
        if not name:
            raise DataError(f"{source!r}: expected tfds:NAME, e.g. tfds:gsm8k")
        return load_tfds_questions(name, split=split, data_dir=data_dir, **fields)
    return load_questions(source, **fields)
