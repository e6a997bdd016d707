"""Fingerprints of checkpoints and tokenizers, recorded with every output.

A later stage compares them to refuse mixing data from one model with another
(e.g. training on samples drawn from a different expert), and the sampling
stage uses `tokenizer_mapping` to check that expert and amateur share ids.
Weight fingerprints hash every byte of the weight and config files; per-file
digests are cached in `cache_path()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from w2s_jax.files import atomic_write_json

ALGORITHM = "sha256"
_CONFIG_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
_MAX_THREADS = 8
_CACHE_FORMAT = f"w2s_jax.fingerprints/1 {ALGORITHM}"
_RACY_S = 2.0  # files modified this recently are hashed but not cached
_CACHE_ENTRIES = 4096  # files; the oldest hashed are dropped beyond it (~1 MB of JSON)


def tokenizer_mapping(tokenizer) -> dict:
    """The parts of a tokenizer that must agree for two models to share token ids."""
    return {
        "vocab": {token: int(i) for token, i in tokenizer.get_vocab().items()},
        "special": {str(k): str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }


# Files AutoTokenizer reads; folders whose copies are byte-identical share a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def same_tokenizer_files(first: str | Path, second: str | Path) -> bool:
    """True when both folders hold the same tokenizer files with identical bytes.

    A cheap sufficient test (no tokenizer is loaded); False proves nothing.
    """
    found = False
    for name in TOKENIZER_FILES:
        a, b = Path(first) / name, Path(second) / name
        if a.is_file() != b.is_file():
            return False
        if a.is_file():
            if a.read_bytes() != b.read_bytes():
                return False
            found = True
    return found


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the id -> token mapping and the special tokens."""
    blob = json.dumps(tokenizer_mapping(tokenizer), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def weights_fingerprint(folder: str | Path) -> str:
    """sha256 over every byte of the model folder's config and weight files.

    See `weights_fingerprint_record` for the files hashed and the digest cache.
    """
    return weights_fingerprint_record(folder)["fingerprint"]


def weights_fingerprint_record(folder: str | Path) -> dict:
    """What `weights_fingerprint` hashed: {"fingerprint", "algorithm", "files"}.

    `files` maps each file name (relative to `folder`) to {"bytes", "digest"},
    where digest is the file's sha256, as `sha256sum` prints it; the fingerprint
    is the sha256 of the lines "<digest>  <name>\\n" in name order. Files: config.json,
    generation_config.json, model.safetensors.index.json (those present) and the
    weight files the loader reads (the index's shards, else *.safetensors).
    Digests are cached by (absolute path, size, mtime_ns) in `cache_path()`, so
    an edit that keeps both size and mtime goes unseen until the file is touched.
    """
    folder = Path(folder)
    return _record(folder, _model_files(folder))


def folder_fingerprint_record(folder: str | Path) -> dict:
    """`weights_fingerprint_record` over every file under `folder` (e.g. one checkpoint
    step of adapters and optimizer state), names relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder does not exist")
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return _record(folder, names)


def file_fingerprint_record(path: str | Path) -> dict:
    """`weights_fingerprint_record` of one file (e.g. a GGUF checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return _record(path.parent, [path.name])


def _record(folder: Path, names: list[str]) -> dict:
    paths = [folder / name for name in names]
    files = {
        name: {"bytes": size, "digest": digest}
        for name, (size, digest) in zip(names, _digests(paths), strict=True)
    }
    listing = "".join(f"{files[name]['digest']}  {name}\n" for name in sorted(files))
    return {
        "fingerprint": hashlib.sha256(listing.encode()).hexdigest(),
        "algorithm": ALGORITHM,
        "files": {name: files[name] for name in sorted(files)},
    }


def _model_files(folder: Path) -> list[str]:
    """Names of the config and weight files of `folder` that a fingerprint covers."""
    names = [name for name in _CONFIG_FILES if (folder / name).is_file()]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return names + sorted(path.name for path in folder.glob("*.safetensors"))
    try:
        shards = sorted(
            {str(name) for name in json.loads(index.read_text())["weight_map"].values()}
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{index}: not a safetensors index (no valid weight_map)") from exc
    for name in shards:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: listed in {index.name} but missing")
    return names + shards


def _file_digest(path: Path) -> str:
    """The file's sha256 (hashlib releases the GIL, so threads hash files in parallel)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, ALGORITHM).hexdigest()


def _digests(paths: list[Path]) -> list[tuple[int, str]]:
    """(size, digest) per path: cached digests reused, the others hashed in threads."""
    stats = [path.stat() for path in paths]
    keys = [str(path.resolve()) for path in paths]
    cache = _read_cache(cache_path())
    digests = [_cached(cache.get(key), stat) for key, stat in zip(keys, stats, strict=True)]
    todo = [i for i, digest in enumerate(digests) if digest is None]
    if todo:
        workers = min(len(todo), os.cpu_count() or 1, _MAX_THREADS)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            hashed = pool.map(lambda i: _file_digest(paths[i]), todo)
            for i, digest in zip(todo, hashed, strict=True):
                digests[i] = digest
        now = time.time()
        entries = {keys[i]: _entry(stats[i], digests[i], now) for i in todo}
        # No entry for a file changed while it was read, nor for one modified within the
        # last seconds, which a same-size rewrite could leave with an equal mtime.
        _store_in_cache(
            {
                key: entry
                for key, entry in entries.items()
                if _cached(entry, Path(key).stat()) and entry["mtime_ns"] < (now - _RACY_S) * 1e9
            }
        )
    return [(stat.st_size, digest) for stat, digest in zip(stats, digests, strict=True)]


def cache_path() -> Path:
    """fingerprints.json in $W2S_JAX_CACHE_DIR, $XDG_CACHE_HOME/w2s_jax or ~/.cache/w2s_jax."""
    folder = os.environ.get("W2S_JAX_CACHE_DIR")
    if not folder:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "w2s_jax"
    return Path(folder) / "fingerprints.json"


def _entry(stat: os.stat_result, digest: str, hashed_at: float) -> dict:
    return {
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "digest": digest,
        "hashed_at": hashed_at,
    }


def _cached(entry, stat: os.stat_result) -> str | None:
    """The entry's digest if it is well formed and matches the file's size and mtime."""
    if (
        isinstance(entry, dict)
        and entry.get("bytes") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("digest"), str)
        and isinstance(entry.get("hashed_at"), (int, float))
    ):
        return entry["digest"]
    return None


def _read_cache(path: Path) -> dict:
    """The cache's entries; {} when the file is missing, unreadable or malformed."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _store_in_cache(fresh: dict) -> None:
    """Merge `fresh` into the cache file, keep the newest entries and write it atomically.

    The file is re-read first, so entries written meanwhile by another process
    are kept (up to a narrow race where the last writer wins). An unwritable
    cache folder only means no caching.
    """
    if not fresh:
        return
    path = cache_path()
    entries = {
        key: entry
        for key, entry in _read_cache(path).items()
        if isinstance(entry, dict) and isinstance(entry.get("hashed_at"), (int, float))
    }
    entries.update(fresh)
    newest = sorted(entries, key=lambda key: entries[key]["hashed_at"])[-_CACHE_ENTRIES:]
    record = {"format": _CACHE_FORMAT, "entries": {key: entries[key] for key in newest}}
    with contextlib.suppress(OSError):
        atomic_write_json(path, record, indent=None)
