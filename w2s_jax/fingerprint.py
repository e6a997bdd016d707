"""Fingerprints of checkpoints and tokenizers, recorded with every output.

A later stage compares them to refuse mixing data from one model with another
(e.g. training on samples drawn from a different expert), and the sampling
stage uses `tokenizer_mapping` to check that expert and amateur share ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_SAMPLE_BYTES = 1 << 20  # hash the first and last MiB of each weight file


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
    """sha256 over config.json and the names, sizes, first and last MiB of weight files.

    Cheap even for a 7B checkpoint, and different for checkpoints that differ in
    architecture or weights (random or trained).
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_SAMPLE_BYTES))
            handle.seek(max(size - _SAMPLE_BYTES, 0))
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()
