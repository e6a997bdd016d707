"""Minimal safetensors reader/writer: one tensor at a time, no framework needed.

Reading memory-maps a tensor's bytes (so only what is asked for is read); writing
streams tensors into a temp file renamed into place; `shard_files` and `write_shards`
lay a model out as Hugging Face does (one file, or numbered files and an index). bfloat16
comes from ml_dtypes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from w2s_jax.files import atomic_write_json, atomic_writer

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the file and key."""


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries by key, byte offset of the data section) of a .safetensors file.

    Checked against the file's size: a truncated or padded file is a CheckpointError
    naming it, raised before any tensor is mapped.
    """
    file_size = Path(path).stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if 8 + size > file_size:
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file (its header claims {size:,} "
                f"bytes, the file holds {file_size:,})"
            )
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a safetensors file (bad header)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (bad header)")
    header.pop("__metadata__", None)
    _check_extent(path, header, file_size - 8 - size)
    return header, 8 + size


def _check_extent(path: Path, header: dict, data_bytes: int) -> None:
    """Every tensor's byte range matches its shape and dtype and lies inside the file."""
    end = 0
    for key, entry in header.items():
        try:
            start, stop = (int(v) for v in entry["data_offsets"])
            count = int(np.prod(entry["shape"], dtype=np.int64))
            itemsize = _DTYPES[entry["dtype"]].itemsize if entry["dtype"] in _DTYPES else None
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry") from exc
        if itemsize is not None and stop - start != count * itemsize:
            raise CheckpointError(
                f"{path}: tensor {key!r} spans {stop - start} bytes but its shape "
                f"{entry['shape']} and dtype {entry['dtype']} need {count * itemsize}"
            )
        end = max(end, stop)
    if end > data_bytes:
        raise CheckpointError(
            f"{path}: truncated: its tensors need {end:,} bytes of data, the file holds "
            f"{data_bytes:,} (a partial download or copy?)"
        )


class SafetensorsFolder:
    """All tensors of a HF folder: `model.safetensors`, a sharded index, or `*.safetensors`."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / name for name in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors files (nor an index)")
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {index.name} but missing")
            header, data_start = read_header(path)
            for key, entry in header.items():
                self.entries[key] = (path, entry, data_start)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key][1]["shape"])

    def get(self, key: str) -> np.ndarray:
        """A read-only memory map of tensor `key` (bytes are read on access)."""
        path, entry, data_start = self.entries[key]
        name = entry["dtype"]
        if name not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {name}")
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == start:
            return np.zeros(shape, _DTYPES[name])
        return np.memmap(path, _DTYPES[name], mode="r", offset=data_start + start, shape=shape)


def write_safetensors(
    path: str | Path,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    fetch: Callable[[str], np.ndarray],
) -> None:
    """Write tensors described by (key, shape, dtype), fetching each one when it is written.

    Holds one tensor in host memory at a time; the file appears atomically.
    """
    path = Path(path)
    header, offset = {}, 0
    specs = list(specs)
    for key, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {
            "dtype": _NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_writer(path) as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        for key, shape, dtype in specs:
            array = np.ascontiguousarray(fetch(key), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {key!r}: shape {array.shape} != {tuple(shape)}")
            handle.write(array.tobytes())


Spec = tuple[str, tuple[int, ...], np.dtype]
INDEX_FILE = "model.safetensors.index.json"


def _nbytes(spec: Spec) -> int:
    return int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize


def shard_files(specs: Iterable[Spec], max_shard_bytes: int) -> list[tuple[str, list[Spec]]]:
    """[(file name, its specs)]: the specs in order, a new file whenever the next tensor
    would take the current one past `max_shard_bytes`; `model.safetensors` when one file
    holds them all, else `model-00001-of-0000N.safetensors`..."""
    shards, size = [[]], 0
    for spec in specs:
        if shards[-1] and size + _nbytes(spec) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += _nbytes(spec)
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    count = len(shards)
    return [(f"model-{i:05d}-of-{count:05d}.safetensors", s) for i, s in enumerate(shards, 1)]


def write_shards(
    folder: Path, shards: list[tuple[str, list[Spec]]], fetch: Callable[[str], np.ndarray]
) -> None:
    """Write each shard of `shard_files` into `folder` (one tensor in memory at a time),
    then the index when there are several files (a stale index is removed otherwise)."""
    for name, specs in shards:
        write_safetensors(folder / name, specs, fetch)
    index = folder / INDEX_FILE
    if len(shards) == 1:
        index.unlink(missing_ok=True)
        return
    total = sum(_nbytes(spec) for _, specs in shards for spec in specs)
    weight_map = {spec[0]: name for name, specs in shards for spec in specs}
    atomic_write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
