"""A sequence classifier on any loaded decoder: a linear head on the last real token.

As openai/weak-to-strong's `TransformerWithHead`: the decoder's final-norm hidden state
at each row's last real token (the last position whose attention mask is 1, so left
and right padding both work) times a head [D, C] without bias, initialised to zeros
(every class starts equally likely). Logits are float32.

What trains (`MODES`): "lora" (adapters on the decoder, `w2s_jax.lora`, plus the
head), "full" (every parameter) or "head" (the head alone: a linear probe; the
decoder's features are detached). A trained classifier is saved as two files in its
folder: `classifier.safetensors` (the trained variables: head, adapters or every
parameter) and `classifier.json` (base model folder, classes, mode, LoRA settings),
written last, so a folder with it is complete. `load_classifier` rebuilds it on the
base. The decoder is placed by `load_pretrained(mesh=...)`'s partition rules; head and
adapters are replicated on the same mesh.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from w2s_jax import sharding
from w2s_jax.files import atomic_write_json
from w2s_jax.lora import apply_lora
from w2s_jax.models.decoder import CausalLM
from w2s_jax.train_config import LoRAConfig

MODES = ("lora", "full", "head")
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"


class ClassifierHead(nnx.Param):
    """The head's weight [D, C] (a Param of its own type, so filters can pick it)."""


def last_token_index(attention_mask_bt) -> jax.Array:
    """Index of each row's last real token (mask 1); 0 for a row without one."""
    mask = jnp.asarray(attention_mask_bt) != 0
    t = mask.shape[-1]
    return jnp.where(mask.any(-1), t - 1 - jnp.argmax(mask[:, ::-1], axis=-1), 0)


class SequenceClassifier(nnx.Module):
    """`lm` (a CausalLM) with a linear head [D, C] on the last real token's hidden state."""

    def __init__(self, lm: CausalLM, num_classes: int, *, linear_probe: bool = False):
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.lm = lm
        self.num_classes = num_classes
        self.linear_probe = linear_probe
        self.score = ClassifierHead(jnp.zeros((lm.config.hidden_size, num_classes), jnp.float32))

    def features(self, input_ids_bt, attention_mask_bt):
        """Final-norm hidden state [B, D] of each row's last real token."""
        hidden_btd = self.lm.hidden_states(input_ids_bt, attention_mask_bt)
        index_b = last_token_index(attention_mask_bt)
        return jnp.take_along_axis(hidden_btd, index_b[:, None, None], axis=1)[:, 0]

    def __call__(self, input_ids_bt, attention_mask_bt):
        """Float32 class logits [B, C]."""
        features_bd = self.features(input_ids_bt, attention_mask_bt)
        if self.linear_probe:
            features_bd = jax.lax.stop_gradient(features_bd)
        return features_bd.astype(jnp.float32) @ self.score[...]


def trainable_filter(mode: str):
    """The nnx filter of what trains in `mode` (see MODES)."""
    if mode == "head":
        return ClassifierHead
    if mode == "full":
        return nnx.Param
    if mode == "lora":
        return nnx.Any(nnx.LoRAParam, ClassifierHead)
    raise ValueError(f"classifier mode must be one of {', '.join(MODES)}, got {mode!r}")


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """What a classifier is made of: base folder, classes, what trains, LoRA settings."""

    base: str
    num_classes: int = 2
    mode: str = "lora"
    lora: LoRAConfig = LoRAConfig(rank=8, alpha=8.0, dropout=0.0)

    def __post_init__(self):
        trainable_filter(self.mode)  # validates the mode

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "lora": self.lora.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> ClassifierSpec:
        return cls(**{**values, "lora": LoRAConfig.from_dict(values["lora"])})


def build_classifier(
    spec: ClassifierSpec, *, dtype=None, mesh=None, seed: int = 0, allow_unused=False
):
    """Load `spec.base` (placed on `mesh`) and put a zero head (and adapters) on it."""
    from w2s_jax.models.hf_io import load_pretrained

    lm = load_pretrained(spec.base, dtype=dtype, mesh=mesh, allow_unused=allow_unused)
    if spec.mode == "lora":
        apply_lora(lm, spec.lora, seed=seed)
    model = SequenceClassifier(lm, spec.num_classes, linear_probe=spec.mode == "head")
    if mesh is not None:
        model.score.set_value(sharding.replicate(model.score.get_value(), mesh))
    return model


def _flat_trainable(state) -> dict[str, nnx.Variable]:
    return {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}


def save_classifier(model: SequenceClassifier, folder: str | Path, spec: ClassifierSpec) -> None:
    """Write the trained variables and `classifier.json` (last) into `folder`, atomically.
    Under multi-host JAX every process calls it and process 0 writes."""
    from w2s_jax.models.safetensors_io import write_safetensors

    folder = Path(folder)
    flat = _flat_trainable(nnx.state(model, trainable_filter(spec.mode)))
    specs = [(k, v.get_value().shape, np.dtype(v.get_value().dtype)) for k, v in flat.items()]
    if not sharding.is_leader():  # gathers are collective: every process fetches, one writes
        for key in flat:
            sharding.to_host(flat[key].get_value())
        return
    write_safetensors(folder / WEIGHTS_FILE, specs, lambda k: sharding.to_host(flat[k].get_value()))
    atomic_write_json(folder / META_FILE, spec.to_dict())


def read_spec(folder: str | Path) -> ClassifierSpec:
    """The `ClassifierSpec` a saved classifier folder records."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved classifier there")
    return ClassifierSpec.from_dict(json.loads(path.read_text()))


def load_classifier(folder: str | Path, *, dtype=None, mesh=None) -> SequenceClassifier:
    """A classifier saved by `save_classifier`, rebuilt on its base (dropout off)."""
    from w2s_jax.models.hf_io import check_finite
    from w2s_jax.models.safetensors_io import CheckpointError, SafetensorsFolder

    spec = read_spec(folder)
    spec = dataclasses.replace(spec, lora=dataclasses.replace(spec.lora, dropout=0.0))
    model = build_classifier(spec, dtype=dtype, mesh=mesh)
    tensors = SafetensorsFolder(folder)
    state = nnx.state(model, trainable_filter(spec.mode))
    flat = _flat_trainable(state)
    for key, variable in flat.items():
        if key not in tensors.entries:
            raise CheckpointError(f"{folder}/{WEIGHTS_FILE}: tensor {key!r} is missing")
        current = variable.get_value()
        array = tensors.get(key)
        if array.shape != current.shape:
            raise CheckpointError(
                f"{folder}/{WEIGHTS_FILE}: tensor {key!r} has shape {list(array.shape)}, "
                f"the model expects {list(current.shape)}"
            )
        variable.set_value(sharding.put(np.asarray(array, current.dtype), current.sharding))
    check_finite(folder, {k: v.get_value() for k, v in flat.items()})
    nnx.update(model, state)
    return model
