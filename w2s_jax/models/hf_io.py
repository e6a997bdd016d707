"""Hugging Face model folders in and out: load, save, tokenizer, random init."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from w2s_jax import sharding
from w2s_jax.files import DataError, atomic_write_json
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.decoder import CausalLM
from w2s_jax.models.dtypes import resolve_dtype
from w2s_jax.models.safetensors_io import (
    CheckpointError,
    SafetensorsFolder,
    shard_files,
    write_shards,
)
from w2s_jax.models.weight_map import IGNORED_HF_KEYS, hf_tensors

logger = logging.getLogger(__name__)


def _with_dtype(config: ModelConfig, dtype) -> ModelConfig:
    if dtype is None:
        return config
    return dataclasses.replace(config, dtype=jnp.dtype(dtype).name)


def _compute_config(config: ModelConfig, dtype, **runtime) -> ModelConfig:
    """`config` in the compute dtype (`auto` resolved per backend), with the run-time
    choices (`param_dtype`, `attention`, `layer_stack`, `remat`) that are not None."""
    config = _with_dtype(config, resolve_dtype(dtype))
    if runtime.get("param_dtype") is not None:
        runtime["param_dtype"] = jnp.dtype(runtime["param_dtype"]).name
    return dataclasses.replace(config, **{k: v for k, v in runtime.items() if v is not None})


def _path_name(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def _require_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    return folder


class _ShapeOnlyKeys:
    """Stands in for `nnx.Rngs` when only shapes matter (every parameter is then loaded):
    a constant key, so tracing skips nnx.Rngs' counter updates (~3x faster)."""

    def params(self):
        return jax.random.key(0)


def load_pretrained(
    path: str | Path,
    *,
    dtype=None,
    mesh=None,
    rules=sharding.PARTITION_RULES,
    allow_unused: bool = False,
    param_dtype=None,
    attention: str | None = None,
    layer_stack: str | None = None,
    remat: str | None = None,
):
    """Load a local HF model folder (config.json + safetensors) as a `CausalLM`.

    dtype: compute dtype ("auto": bfloat16 on GPU/TPU, float32 on CPU; "float32",
    "bfloat16", ...; default the checkpoint's); param_dtype: the parameters' storage
    dtype (default: `dtype`). attention, layer_stack, remat: run-time choices of
    `ModelConfig` (default: its defaults). mesh: place each parameter
    with its NamedSharding from `rules` (default: one local device). Tensors are
    memory-mapped and placed one at a time, only the slices each local device needs.
    A missing tensor or a wrong shape raises `CheckpointError` naming the key. So do
    checkpoint tensors the model does not use (a config with fewer layers than the
    weights, say), before anything is loaded, unless `allow_unused` (then they are
    logged).
    """
    folder = _require_folder(path)
    config = _compute_config(
        ModelConfig.from_hf_json(folder / "config.json"),
        dtype,
        param_dtype=param_dtype,
        attention=attention,
        layer_stack=layer_stack,
        remat=remat,
    )
    tensors = SafetensorsFolder(folder)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=_ShapeOnlyKeys())))
    layers = config.num_hidden_layers
    variables = [
        (name, v, hf_tensors(name, layers))
        for name, v in ((_path_name(p), v) for p, v in nnx.to_flat_state(state))
    ]
    _check_unused(
        folder, tensors, {key for _, _, hf in variables for key in hf.names}, config, allow_unused
    )
    for name, variable, hf in variables:
        abstract = variable.get_value()
        shape = abstract.shape[1:] if hf.stacked else abstract.shape
        arrays = [_host_tensor(folder, tensors, key, name, hf.transpose, shape) for key in hf.names]
        if mesh is None:
            target = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        else:
            target = sharding.param_sharding(name, abstract.shape, mesh, rules)
        variable.set_value(
            jax.make_array_from_callback(
                abstract.shape,
                target,
                functools.partial(_slice, arrays, hf.stacked, abstract.dtype),
            )
        )
    check_finite(
        folder, {hf.names if hf.stacked else hf.names[0]: v.get_value() for _, v, hf in variables}
    )
    return nnx.merge(graphdef, state)


def _host_tensor(folder, tensors, key: str, name: str, transpose: bool, shape: tuple):
    """The checkpoint's tensor `key` (memory-mapped) laid out as parameter `name` (of
    per-layer shape `shape`); CheckpointError when it is missing or its shape differs."""
    if key not in tensors.entries:
        raise CheckpointError(f"{folder}: tensor {key!r} (parameter {name}) is missing")
    array = tensors.get(key)
    array = array.T if transpose else array
    if array.shape != shape:
        expected = shape[::-1] if transpose else shape
        raise CheckpointError(
            f"{tensors.entries[key][0]}: tensor {key!r} has shape {list(tensors.shape(key))}, "
            f"config.json implies {list(expected)}"
        )
    return array


def _slice(arrays: list, stacked: bool, dtype, index: tuple) -> np.ndarray:
    """The block `index` of a parameter from its host tensors: one, or one per layer
    stacked on the leading axis (only the layers and slices asked for are read)."""
    if not stacked:
        return np.array(arrays[0][index], dtype=dtype)
    return np.stack([arrays[i][index[1:]] for i in range(len(arrays))[index[0]]]).astype(dtype)


def check_finite(where, arrays: dict) -> None:
    """NonFiniteError naming the first of `arrays` holding a NaN or an infinity; one
    reduction per tensor. Keys are names, or for a stacked array [L, ...] a tuple of L
    names, one per layer (the layer is named)."""
    from w2s_jax.files import NonFiniteError

    names = list(arrays)
    finite = _all_finite(
        [arrays[name] for name in names], tuple(isinstance(n, tuple) for n in names)
    )
    per_name = [
        zip(name if isinstance(name, tuple) else (name,), np.atleast_1d(ok), strict=True)
        for name, ok in zip(names, finite, strict=True)
    ]
    bad = [layer for layers in per_name for layer, layer_ok in layers if not bool(layer_ok)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"{where}: non-finite values (NaN or inf) in {shown}")


@functools.partial(jax.jit, static_argnums=1)
def _all_finite(arrays: list, per_layer: tuple[bool, ...]) -> list:
    return [
        jnp.isfinite(x).reshape(x.shape[0], -1).all(-1) if stacked else jnp.isfinite(x).all()
        for x, stacked in zip(arrays, per_layer, strict=True)
    ]


def _check_unused(folder: Path, tensors, expected: set, config, allow: bool) -> None:
    """CheckpointError naming the checkpoint tensors the model would not use."""
    unused = sorted(
        key
        for key in tensors.entries
        if key not in expected
        and not IGNORED_HF_KEYS.search(key)
        and not (config.tie_word_embeddings and key == "lm_head.weight")
    )
    if not unused:
        return
    shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
    message = f"{folder}: {len(unused)} checkpoint tensor(s) not used by config.json: {shown}"
    if not allow:
        raise CheckpointError(
            f"{message}; does config.json describe these weights? "
            "(--allow-unused-weights loads them anyway)"
        )
    logger.warning("%s", message)


def init_random(config: ModelConfig, *, seed: int, dtype=None, mesh=None):
    """A `CausalLM` with random weights (normal(initializer_range); norms 1).

    Weights are drawn in float32 and cast, so a seed gives the same model in every
    dtype. Initialised under jit; with `mesh`, each parameter is created directly
    in its NamedSharding (no full copy on one device).
    """
    config = _compute_config(config, dtype)
    graphdef, state = _random_init_fn(config, mesh)(jax.random.key(seed))
    return nnx.merge(graphdef, state)


@functools.cache
def _random_init_fn(config: ModelConfig, mesh):
    """(graphdef, jitted key -> state) for `init_random`, compiled once per config and mesh."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))
    config32 = dataclasses.replace(config, dtype="float32")
    cast = lambda x: x.astype(config.weights_dtype)  # noqa: E731

    @functools.partial(
        jax.jit, out_shardings=None if mesh is None else sharding.state_shardings(abstract, mesh)
    )
    def init(key):
        return jax.tree.map(cast, nnx.state(CausalLM(config32, rngs=nnx.Rngs(key))))

    return lambda key: (graphdef, init(key))


def save_pretrained(
    model, path: str | Path, *, tokenizer=None, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write `model` as a HF folder: config.json + safetensors (sharded with an index
    above `max_shard_bytes`), loadable by `transformers.AutoModelForCausalLM`.

    Parameters are written in their dtype, fetched to the host one at a time
    (gathered across hosts; process 0 writes). `tokenizer`: a folder or tokenizer
    object saved alongside. Older model*.safetensors files in `path` are removed.
    """
    folder = Path(path)
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    specs, values = [], {}
    for param_path, variable in params:
        hf = hf_tensors(_path_name(param_path), model.config.num_hidden_layers)
        value = variable.get_value()
        shape = value.shape[1:] if hf.stacked else value.shape
        for layer, key in enumerate(hf.names):
            specs.append((key, shape[::-1] if hf.transpose else shape, np.dtype(value.dtype)))
            values[key] = (value, hf.transpose, layer if hf.stacked else None)

    def fetch(key: str) -> np.ndarray:
        value, transpose, layer = values[key]
        value = value if layer is None else value[layer]
        if not value.is_fully_addressable:
            value = multihost_utils.process_allgather(value, tiled=True)
        array = np.asarray(jax.device_get(value))
        return array.T if transpose else array

    shards = shard_files(specs, max_shard_bytes)
    if jax.process_index() != 0:
        for key, _, _ in specs:
            fetch(key)  # collective gathers must run on every process
        return
    write_shards(folder, shards, fetch)
    names = [name for name, _ in shards]
    for stale in folder.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    dtype = np.dtype(specs[0][2]).name if specs else model.config.dtype
    atomic_write_json(folder / "config.json", _with_dtype(model.config, dtype).to_hf_dict())
    if tokenizer is not None:
        tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str | Path) else tokenizer
        tokenizer.save_pretrained(str(folder))


# The files a tokenizer is read from: a fast tokenizer, a BPE pair, or SentencePiece.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def load_tokenizer(path: str | Path):
    """The folder's tokenizer (and chat template) via `transformers.AutoTokenizer`.

    Raises FileNotFoundError naming the folder when it holds no tokenizer file (without
    one, transformers would build a near-empty tokenizer and every answer would come out
    empty), and DataError when the tokenizer has more tokens than the folder's model has
    vocabulary rows.
    """
    from transformers import AutoTokenizer

    folder = _require_folder(path)
    if not any(all((folder / name).is_file() for name in group) for group in TOKENIZER_FILES):
        wanted = ", or ".join(" + ".join(group) for group in TOKENIZER_FILES)
        raise FileNotFoundError(f"{folder} holds no tokenizer: expected {wanted}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    rows = _config_vocab_size(folder)
    if rows is not None and len(tokenizer) > rows:
        raise DataError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's "
            f"vocabulary has {rows} rows (config.json vocab_size); they belong to "
            "different models"
        )
    return tokenizer


def _config_vocab_size(folder: Path) -> int | None:
    """config.json's vocab_size, when the folder has a readable one."""
    try:
        value = json.loads((folder / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None
