"""Weaker copies of a checkpoint, for amateurs that share the expert's tokenizer.

Two transforms of a Hugging Face folder, each written as a new folder (atomically)
with the same tokenizer and generation config:

- `truncate_layers(src, out, keep)`: the first `keep` decoder layers, then the
  final norm and head (an early exit). Depth is what multi-step arithmetic needs,
  so the copy gets weaker at it while its lower layers still produce text.
- `requantize(src, out, bits, group_size)`: every projection matrix of the decoder
  layers rounded to `bits`-bit symmetric integers per group of `group_size` input
  weights (round to nearest, one float scale per group), stored dequantized in
  float32. Embeddings and norms stay as they are. 4 bits is about what the GGUF
  already holds; 2-3 bits makes a visibly weaker model.

Neither needs training; both run in seconds.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from w2s_jax.files import atomic_folder
from w2s_jax.models.safetensors_io import SafetensorsFolder, write_safetensors

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
# Files copied unchanged: tokenizer, chat template, generation config.
_KEPT = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|chat_template\.jinja|generation_config\.json)$"
)


def _config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no config.json")
    return json.loads(path.read_text())


def _write(src: Path, out: Path, config: dict, keys: list[str], tensor, record: dict) -> Path:
    """`out` with `config`, the tensors `keys` (each from `tensor(key)`), src's tokenizer
    files, and `weakened.json` saying how it was made."""
    weights = SafetensorsFolder(src)
    if out.exists():
        raise ValueError(f"{out}: already exists; pick a new folder")
    with atomic_folder(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        specs = [(key, weights.shape(key), np.float32) for key in keys]
        write_safetensors(tmp / "model.safetensors", specs, tensor)
        for path in src.iterdir():
            if path.is_file() and _KEPT.match(path.name):
                shutil.copy(path, tmp / path.name)
        (tmp / "weakened.json").write_text(json.dumps({"source": str(src), **record}) + "\n")
    return out


def truncate_layers(src: str | Path, out: str | Path, keep: int) -> Path:
    """Write the first `keep` decoder layers of `src` (with its norm and head) to `out`."""
    src, out = Path(src), Path(out)
    config = _config(src)
    layers = int(config["num_hidden_layers"])
    if not 1 <= keep < layers:
        raise ValueError(f"keep must be in 1..{layers - 1} for {src} ({layers} layers), got {keep}")
    weights = SafetensorsFolder(src)
    keys = [
        k for k in sorted(weights.entries) if not (m := _LAYER.match(k)) or int(m.group(1)) < keep
    ]
    fetch = lambda key: np.asarray(weights.get(key), np.float32)  # noqa: E731
    record = {"transform": "truncate_layers", "keep": keep, "of": layers}
    config = config | {"num_hidden_layers": keep}
    if isinstance(config.get("layer_types"), list):  # per-layer attention kinds (Qwen2, Qwen3)
        config["layer_types"] = config["layer_types"][:keep]
    return _write(src, out, config, keys, fetch, record)


def quantize_groups(matrix: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """`matrix` [out, in] rounded to symmetric `bits`-bit integers per group of
    `group_size` consecutive inputs (scale = max |w| / (2**(bits-1) - 1)), dequantized."""
    rows, cols = matrix.shape
    if cols % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input width {cols}")
    levels = 2 ** (bits - 1) - 1
    groups = matrix.astype(np.float64).reshape(rows, cols // group_size, group_size)
    scale = np.abs(groups).max(axis=-1, keepdims=True) / levels
    scale = np.where(scale == 0, 1.0, scale)
    return (np.clip(np.rint(groups / scale), -levels, levels) * scale).reshape(rows, cols)


def requantize(src: str | Path, out: str | Path, bits: int, group_size: int = 32) -> Path:
    """Write `src` with every decoder projection matrix `quantize_groups`-rounded to `out`."""
    src, out = Path(src), Path(out)
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    config = _config(src)
    weights = SafetensorsFolder(src)

    def fetch(key):
        tensor = np.asarray(weights.get(key), np.float32)
        if _PROJECTION.match(key):
            return quantize_groups(tensor, bits, group_size).astype(np.float32)
        return tensor

    record = {"transform": "requantize", "bits": bits, "group_size": group_size}
    return _write(src, out, config, sorted(weights.entries), fetch, record)
