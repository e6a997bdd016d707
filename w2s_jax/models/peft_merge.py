"""Fold a PEFT LoRA adapter into a Hugging Face model folder, on the host, in numpy.

`w2s export` writes every LoRA run's adapters in PEFT's format (OUT/adapter/); this is
the way back without PyTorch or peft: W' = W + (lora_alpha / r) * B @ A for each adapted
projection, computed in float32 and stored in the base tensor's dtype. Every other file
of the base folder (config, tokenizer, chat template, generation config) is copied. The
merged folder appears atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from w2s_jax.files import atomic_folder
from w2s_jax.models.safetensors_io import CheckpointError, SafetensorsFolder, write_safetensors

_PEFT_PREFIX = "base_model.model."
_SUPPORTED = {"peft_type": "LORA", "use_dora": False, "use_rslora": False}


def read_peft_deltas(adapter: str | Path) -> dict[str, np.ndarray]:
    """{HF weight name: float32 delta [out, in]} of a PEFT LoRA adapter folder."""
    adapter = Path(adapter)
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no such file (expected a PEFT LoRA adapter)")
    config = json.loads(config_path.read_text())
    for key, expected in _SUPPORTED.items():
        if config.get(key, expected) != expected:
            raise CheckpointError(f"{config_path}: {key}={config[key]!r} is not supported")
    scaling = float(config["lora_alpha"]) / int(config["r"])
    tensors = SafetensorsFolder(adapter)
    deltas = {}
    for key in tensors.entries:
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key.removesuffix(".lora_A.weight")
        b_key = f"{stem}.lora_B.weight"
        if b_key not in tensors.entries:
            raise CheckpointError(f"{adapter}: {key} has no matching {b_key}")
        a_ri = np.asarray(tensors.get(key), np.float32)
        b_or = np.asarray(tensors.get(b_key), np.float32)
        deltas[f"{stem.removeprefix(_PEFT_PREFIX)}.weight"] = scaling * (b_or @ a_ri)
    if not deltas:
        raise CheckpointError(f"{adapter}: no lora_A/lora_B tensors")
    return deltas


def merge_peft_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write `out`: the HF folder `base` with the PEFT LoRA `adapter` folded in."""
    base, out = Path(base), Path(out)
    deltas = read_peft_deltas(adapter)
    tensors = SafetensorsFolder(base)
    missing = sorted(set(deltas) - set(tensors.entries))
    if missing:
        raise CheckpointError(f"{adapter}: adapts {missing[0]!r}, which {base} does not have")
    for key, delta in deltas.items():
        if tuple(tensors.shape(key)) != delta.shape:
            raise CheckpointError(
                f"{adapter}: the update of {key!r} is {list(delta.shape)}, "
                f"{base} holds {list(tensors.shape(key))}"
            )

    def fetch(key: str) -> np.ndarray:
        weight = tensors.get(key)
        if key not in deltas:
            return weight
        return (np.asarray(weight, np.float32) + deltas[key]).astype(weight.dtype)

    with atomic_folder(out) as tmp:
        for item in base.iterdir():
            weights = item.suffix == ".safetensors" or item.name.endswith(".index.json")
            if item.is_file() and not weights:
                shutil.copy2(item, tmp / item.name)
        specs = [(key, tensors.shape(key), tensors.get(key).dtype) for key in tensors.entries]
        write_safetensors(tmp / "model.safetensors", specs, fetch)
    return out
