"""How the decoder layers run: a Python loop over per-layer modules, or one scan over a
single layer module whose parameters carry a leading layer axis; and which activations
each layer keeps for the backward pass (rematerialization).

Both layouts hold the same numbers: the stacked parameter `model/layers/mlp/up_proj/kernel`
[L, in, out] is the loop's `model/layers/{i}/mlp/up_proj/kernel` stacked over i
(`stack_layers` / `unstack_layers` convert a state between them). Only `nnx.Param`s
(weights and LoRA adapters) are stacked; the rest of a layer's state (the dropout RNG
streams of LoRA adapters) stays one copy, carried from layer to layer through the scan.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from w2s_jax.sharding import STACKED_LAYER_PATH

# "auto" per backend, as data: (layout, the measured reason). benchmarks/compile_time.py on
# 2-core XLA:CPU, 2026-11-30 (BENCHMARKS.md, "Layer stacking"); no GPU or TPU was measured.
_COMPILE = (
    "compiling from shapes, the 1.5B shape's prefill, decode step and LoRA step take 5.6, "
    "5.5 and 16.8 s scanned instead of 33.5, 14.5 and 54.3 s (7B: 4.3-5.0x faster), and "
    "remat cuts a 1.5B LoRA step's peak from 37.7 to 11.1 GiB only when scanned"
)
AUTO_LAYER_STACK: dict[str, tuple[str, str]] = {
    "cpu": (
        "loop",
        f"{_COMPILE}; but steady steps are slower scanned: a decode step of the 1.5B shape "
        "(4 of its layers) 1.64x (3.23 s vs 1.97 s; each layer's weights come through a "
        "dynamic slice), a LoRA step of a small shape 1.15x, so the seconds of compile "
        "saved are repaid within a few dozen decode steps",
    ),
    "gpu": ("scan", f"{_COMPILE} on XLA:CPU; a layer compiles once on every backend"),
    "tpu": ("scan", f"{_COMPILE} on XLA:CPU; a layer compiles once on every backend"),
}
# ModelConfig.remat -> jax.checkpoint policy of each decoder layer ("none": no checkpoint).
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def resolve_layer_stack(layer_stack: str, backend: str | None = None) -> str:
    """ "loop" or "scan": `layer_stack` itself, or for "auto" the rule of the backend."""
    if layer_stack != "auto":
        return layer_stack
    backend = backend or jax.default_backend()
    return AUTO_LAYER_STACK.get(backend, AUTO_LAYER_STACK["gpu"])[0]


def stacked_module(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs) -> nnx.Module:
    """One module whose variables are `count` independently initialised copies of
    `make(rngs)`'s, stacked on a leading axis (one key per copy, split from `rngs.params()`)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), count)
    return nnx.merge(graphdef, jax.vmap(lambda key: nnx.state(make(nnx.Rngs(key))))(keys))


def _layer_fn(graphdef, remat: str, *, scanned: bool, mutated: list[bool]):
    """(params, rest, x_btd, cache, *inputs) -> (x_btd, cache, rest): one layer as a pure
    function under the remat policy. Appends to `mutated` whether the layer changed `rest`
    (a LoRA dropout drew keys), so that only then is the module's state written back."""

    def apply(params, rest, x_btd, cache, cos_btd, sin_btd, mask_bts, cache_index):
        layer = nnx.merge(graphdef, params, rest)
        x_btd, cache = layer(x_btd, cos_btd, sin_btd, mask_bts, cache, cache_index)
        new_rest = nnx.split(layer, nnx.Param, ...)[2]
        pairs = zip(jax.tree.leaves(rest), jax.tree.leaves(new_rest), strict=True)
        mutated.append(any(old is not new for old, new in pairs))
        return x_btd, cache, new_rest

    if remat == "none":
        return apply
    # inside a scan the loop already keeps XLA from merging the recomputation away
    return jax.checkpoint(apply, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)


def run_loop(layers, remat: str, x_btd, cache, *inputs):
    """The per-layer modules one after the other. cache: one (keys, values) per layer."""
    new_cache = None if cache is None else []
    for i, layer in enumerate(layers):
        layer_cache = None if cache is None else cache[i]
        if remat == "none":
            x_btd, layer_cache = layer(x_btd, *inputs[:3], layer_cache, inputs[3])
        else:
            graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
            mutated = []
            x_btd, layer_cache, rest = _layer_fn(graphdef, remat, scanned=False, mutated=mutated)(
                params, rest, x_btd, layer_cache, *inputs
            )
            if any(mutated):
                nnx.update(layer, rest)
        if cache is not None:
            new_cache.append(layer_cache)
    return x_btd, new_cache


def run_scan(layers, remat: str, x_btd, cache, *inputs):
    """One `jax.lax.scan` over the stacked layer. cache: [(keys [L, ...], values [L, ...])].

    The cache rides in the carry and each layer's slice is written back in place: as scan
    outputs the whole cache was copied every step (decoding up to 1.45x slower on XLA:CPU)."""
    graphdef, params, rest = nnx.split(layers, nnx.Param, ...)
    mutated = []
    apply = _layer_fn(graphdef, remat, scanned=True, mutated=mutated)

    def body(carry, xs):
        x_btd, rest, cache = carry
        layer_params, i = xs
        layer_cache = jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, i, 0, False), cache)
        x_btd, layer_cache, rest = apply(layer_params, rest, x_btd, layer_cache, *inputs)
        cache = jax.tree.map(
            lambda c, new: jax.lax.dynamic_update_index_in_dim(c, new, i, 0), cache, layer_cache
        )
        return (x_btd, rest, cache), None

    count = jax.tree.leaves(params)[0].shape[0]
    carry = (x_btd, rest, None if cache is None else cache[0])
    (x_btd, rest, stacked_cache), _ = jax.lax.scan(body, carry, (params, jnp.arange(count)))
    if any(mutated):
        nnx.update(layers, rest)
    return x_btd, None if cache is None else [stacked_cache]


def _layer_index(path: tuple) -> int | None:
    """Position of the layer index in a per-layer path (`model/layers/{i}/...`), or None."""
    for n in range(len(path) - 1):
        if path[n] == "layers" and isinstance(path[n + 1], int):
            return n + 1
    return None


def stack_layers(state: nnx.State) -> nnx.State:
    """A loop-layout state (`layers/{i}/...`) in the scan layout (`layers/...` [L, ...])."""
    groups: dict[tuple, list] = {}
    out = []
    for path, variable in nnx.to_flat_state(state):
        n = _layer_index(path)
        if n is None:
            out.append((path, variable))
        else:
            groups.setdefault(path[:n] + path[n + 1 :], []).append((path[n], variable))
    for path, layers in groups.items():
        layers.sort(key=lambda item: item[0])
        stacked = jnp.stack([variable.get_value() for _, variable in layers])
        out.append((path, layers[0][1].replace(stacked)))
    return nnx.from_flat_state(out)


def unstack_layers(state: nnx.State) -> nnx.State:
    """A scan-layout state (`layers/...` [L, ...]) in the loop layout (`layers/{i}/...`)."""
    out = []
    for path, variable in nnx.to_flat_state(state):
        name = "/".join(map(str, path))
        match = re.search(STACKED_LAYER_PATH, name)
        if match is None:
            out.append((path, variable))
            continue
        n = name[: match.end()].count("/")  # the position after "layers"
        value = variable.get_value()
        out.extend(
            (path[:n] + (i,) + path[n:], variable.replace(value[i])) for i in range(value.shape[0])
        )
    return nnx.from_flat_state(out)
