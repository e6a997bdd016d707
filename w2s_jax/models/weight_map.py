"""Hugging Face tensor names <-> NNX parameter paths, as one table (load and export)."""

from __future__ import annotations

import dataclasses
import re

from w2s_jax.models.safetensors_io import CheckpointError

# (HF key template, "/"-joined NNX path template, transpose). {i}: layer index,
# {p}: projection/norm name. HF Linear weights are [out, in]; nnx.Linear kernels [in, out].
# A stacked layer (ModelConfig.layer_stack "scan") holds each per-layer path without its
# "{i}/" (`STACKED_FORM`), the layer index as its leading axis: one table for both layouts.
WEIGHT_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "model/embed_tokens/embedding", False),
    (
        "model.layers.{i}.self_attn.{p}_proj.weight",
        "model/layers/{i}/self_attn/{p}_proj/kernel",
        True,
    ),
    ("model.layers.{i}.self_attn.{p}_proj.bias", "model/layers/{i}/self_attn/{p}_proj/bias", False),
    (
        "model.layers.{i}.self_attn.{p}_norm.weight",
        "model/layers/{i}/self_attn/{p}_norm/weight",
        False,
    ),
    ("model.layers.{i}.mlp.{p}_proj.weight", "model/layers/{i}/mlp/{p}_proj/kernel", True),
    ("model.layers.{i}.mlp.{p}_proj.bias", "model/layers/{i}/mlp/{p}_proj/bias", False),
    ("model.layers.{i}.{p}_layernorm.weight", "model/layers/{i}/{p}_layernorm/weight", False),
    ("model.norm.weight", "model/norm/weight", False),
    ("lm_head.weight", "lm_head/kernel", True),
)
# Checkpoint tensors that are expected but carry nothing to load (derived buffers).
IGNORED_HF_KEYS = re.compile(r"\.rotary_emb\.inv_freq$")

STACKED_FORM = ("layers/{i}/", "layers/")
_FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>[a-z_]+)"}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern + "$")


_PATH_TO_HF = [(_compile(path), hf, t, False) for hf, path, t in WEIGHT_TABLE] + [
    (_compile(path.replace(*STACKED_FORM)), hf, t, True)
    for hf, path, t in WEIGHT_TABLE
    if STACKED_FORM[0] in path
]


@dataclasses.dataclass(frozen=True)
class HFTensors:
    """The HF tensors of one parameter: `names` (one per layer, the parameter's leading
    axis, when `stacked`), each transposed (`transpose`) relative to the parameter."""

    names: tuple[str, ...]
    transpose: bool
    stacked: bool


def hf_tensors(path: str, num_layers: int) -> HFTensors:
    """The HF tensors of the NNX parameter at `path`; CheckpointError when unmapped."""
    for pattern, template, transpose, stacked in _PATH_TO_HF:
        match = pattern.match(path)
        if match:
            fields = match.groupdict()
            layers = range(num_layers) if stacked else [fields.pop("i", None)]
            names = tuple(template.format(**fields, i=i) for i in layers)
            return HFTensors(names, transpose, stacked)
    raise CheckpointError(
        f"parameter {path!r} has no Hugging Face name in WEIGHT_TABLE "
        "(merge LoRA adapters into the base weights before exporting)"
    )


def path_to_hf(path: str) -> tuple[str, bool]:
    """(HF tensor name, transpose) for the NNX path of an unstacked parameter."""
    tensors = hf_tensors(path, 1)
    if tensors.stacked:
        raise CheckpointError(f"parameter {path!r} is stacked over layers: use hf_tensors")
    return tensors.names[0], tensors.transpose
