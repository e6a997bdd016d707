"""Hugging Face tensor names <-> NNX parameter paths, as one table (load and export)."""

from __future__ import annotations

import re

from w2s_jax.models.safetensors_io import CheckpointError

# (HF key template, "/"-joined NNX path template, transpose). {i}: layer index,
# {p}: projection/norm name. HF Linear weights are [out, in]; nnx.Linear kernels [in, out].
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

_FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>[a-z_]+)"}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern + "$")


_PATH_TO_HF = [(_compile(path), hf, t) for hf, path, t in WEIGHT_TABLE]


def path_to_hf(path: str) -> tuple[str, bool]:
    """(HF tensor name, transpose) for an NNX parameter path; CheckpointError when unmapped."""
    for pattern, template, transpose in _PATH_TO_HF:
        match = pattern.match(path)
        if match:
            return template.format(**match.groupdict()), transpose
    raise CheckpointError(
        f"parameter {path!r} has no Hugging Face name in WEIGHT_TABLE "
        "(merge LoRA adapters into the base weights before exporting)"
    )
