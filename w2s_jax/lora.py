"""LoRA adapters on a model's `nnx.Linear` projections, built on Flax's `nnx.LoRA`.

`apply_lora` wraps the projections named in `LoRAConfig.targets` (e.g. q_proj,
v_proj) in `ScaledLoRA`: y = base(x) + (alpha / rank) * dropout(x) @ A @ B, as
PEFT computes it (A: uniform(±1/sqrt(in)), B: zeros, so training starts at the
base model). Adapter weights are `nnx.LoRAParam` in float32 whatever the model's
dtype; the product runs in the base layer's compute dtype. On a stacked layer
(`ModelConfig.layer_stack` "scan", kernels [L, in, out]) one adapter per projection holds
A [L, in, r] and B [L, r, out]. `merge_lora` folds them back into the base kernels;
`load_lora_into` restores a `w2s train` checkpoint onto a loaded model.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from w2s_jax import sharding
from w2s_jax.train_config import LoRAConfig

logger = logging.getLogger(__name__)

__all__ = [
    "LoRAConfig",
    "ScaledLoRA",
    "apply_lora",
    "check_adapter_base",
    "load_lora_into",
    "merge_lora",
    "trainable_filter",
]


class ScaledLoRA(nnx.LoRA):
    """`nnx.LoRA` around a base `nnx.Linear` with PEFT's alpha/rank scaling and input dropout."""

    def __init__(self, base: nnx.Linear, config: LoRAConfig, *, rngs: nnx.Rngs):
        super().__init__(
            base.in_features,
            config.rank,
            base.out_features,
            base_module=base,
            dtype=base.dtype,
            param_dtype=jnp.float32,
            a_initializer=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            rngs=rngs,
        )
        self.scaling = config.alpha / config.rank
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x):
        y = self.base_module(x)
        x, lora_a, lora_b = self.promote_dtype(
            (self.dropout(x), self.lora_a[...], self.lora_b[...]), dtype=self.dtype
        )
        return y + (self.scaling * (x @ lora_a @ lora_b)).astype(y.dtype)

    def delta_kernel(self) -> jax.Array:
        """The update the adapter adds to the base kernel: scaling * A @ B, float32 [in, out]."""
        return self.scaling * (self.lora_a[...] @ self.lora_b[...])

    def merged_kernel(self) -> jax.Array:
        """The base kernel plus `delta_kernel()`, added in float32, cast to the kernel's dtype."""
        kernel = self.base_module.kernel[...]
        return (kernel.astype(jnp.float32) + self.delta_kernel()).astype(kernel.dtype)


def _linears(model: nnx.Module):
    """(parent, attribute name, path string, module) of every nnx.Linear/ScaledLoRA."""
    found = []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Linear | ScaledLoRA) and path:
            parent = model
            for part in path[:-1]:
                parent = parent[part] if isinstance(part, int) else getattr(parent, part)
            if isinstance(parent, ScaledLoRA):
                continue  # the base layer inside an adapter
            found.append((parent, path[-1], "/".join(map(str, path)), module))
    return found


def apply_lora(model: nnx.Module, config: LoRAConfig, *, seed: int = 0) -> list[str]:
    """Wrap every nnx.Linear whose attribute name is in `config.targets`; return their paths.

    Raises ValueError naming the unknown target and the available names when a
    target matches no layer. Does nothing for rank 0 (full fine-tuning).
    """
    if config.rank == 0:
        return []
    linears = [item for item in _linears(model) if isinstance(item[3], nnx.Linear)]
    available = sorted({str(name) for _, name, _, _ in linears})
    missing = [t for t in config.targets if t not in available]
    if missing:
        raise ValueError(
            f"LoRA target(s) {', '.join(missing)} match no linear layer of the model "
            f"(available: {', '.join(available)})"
        )
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    targets = [item for item in linears if item[1] in config.targets]
    stacked = [_layer_count(item[3]) for item in targets]
    # Adapters of a stacked layer's projections are drawn layer by layer, in the order
    # per-layer modules draw theirs, then stacked: both layouts start from equal adapters.
    drawn = [
        [
            ScaledLoRA(item[3], config, rngs=rngs)
            for item, n in zip(targets, stacked, strict=True)
            if n
        ]
        for _ in range(max(stacked, default=0))
    ]
    stacked_adapters = iter([_stack_adapters(column) for column in zip(*drawn, strict=True)])
    for (parent, name, _, module), n in zip(targets, stacked, strict=True):
        adapter = next(stacked_adapters) if n else ScaledLoRA(module, config, rngs=rngs)
        _replicate_like_base(adapter)
        setattr(parent, name, adapter)
    return [path for _, _, path, _ in targets]


def _layer_count(linear: nnx.Linear) -> int:
    """L for the projection of a stacked layer (kernel [L, in, out]), else 0."""
    kernel = linear.kernel.get_value()
    return kernel.shape[0] if kernel.ndim == 3 else 0


def _stack_adapters(adapters: tuple[ScaledLoRA, ...]) -> ScaledLoRA:
    """The first adapter holding every adapter's A and B, stacked on a leading layer axis."""
    first = adapters[0]
    first.lora_a.set_value(jnp.stack([a.lora_a.get_value() for a in adapters]))
    first.lora_b.set_value(jnp.stack([a.lora_b.get_value() for a in adapters]))
    return first


def _replicate_like_base(adapter: ScaledLoRA) -> None:
    """Put the adapter's own variables (A, B, dropout key) on its base layer's mesh, replicated.

    Without this a model sharded over a mesh would mix them (on one device) with its
    weights (on the mesh) in one jitted call, which JAX refuses.
    """
    placed = getattr(adapter.base_module.kernel[...], "sharding", None)  # None when traced
    if not isinstance(placed, NamedSharding):
        return
    for path, variable in nnx.iter_graph(adapter):
        if isinstance(variable, nnx.Variable) and path[0] != "base_module":
            variable.set_value(sharding.replicate(variable.get_value(), placed.mesh))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel and put the plain nnx.Linear back (in place)."""
    for parent, name, _, module in _linears(model):
        if isinstance(module, ScaledLoRA):
            base = module.base_module
            base.kernel[...] = module.merged_kernel()
            setattr(parent, name, base)
    return model


def without_adapters(model: nnx.Module) -> nnx.Module:
    """The base model of an adapted `model`: a copy whose every `lora_b` is zero, so each
    adapter adds exactly 0, with gradients stopped. Cheap under jit (no weight is copied
    twice); what a KL anchor to the base compares against."""
    graphdef, state = nnx.split(model)

    def zero_adapter(path, value):
        names = {getattr(key, "key", getattr(key, "name", None)) for key in path}
        return jnp.zeros_like(value) if "lora_b" in names else value

    state = jax.tree_util.tree_map_with_path(zero_adapter, state)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def trainable_filter(config: LoRAConfig):
    """The nnx filter of what trains: adapter weights, or every parameter at rank 0."""
    return nnx.LoRAParam if config.rank else nnx.Param


def check_adapter_base(checkpoint: str | Path, base: str | Path, *, force: bool = False) -> None:
    """Refuse to apply a LoRA checkpoint to a base other than the one it was trained on.

    The train run records its expert's weights fingerprint; a base whose fingerprint
    differs raises ValueError naming both, unless `force` (then a warning is logged).
    Full fine-tuning checkpoints (every parameter replaced) and checkpoints that
    recorded no base are not checked.
    """
    from w2s_jax.checkpointing import read_meta
    from w2s_jax.fingerprint import weights_fingerprint

    meta = read_meta(checkpoint)
    recorded = (meta.get("expert_weights_hashed") or {}).get("fingerprint")
    if not meta["lora"].get("rank") or recorded is None:
        return
    actual = weights_fingerprint(base)
    if actual == recorded:
        return
    message = (
        f"{checkpoint} holds adapters trained on a base with weights fingerprint "
        f"{recorded[:16]}…, but {base} has {actual[:16]}…"
    )
    if not force:
        raise ValueError(
            f"{message}; adapters are only meaningful on their own base "
            "(--force applies them anyway)"
        )
    logger.warning("%s; applying them anyway (--force)", message)


def load_lora_into(model: nnx.Module, checkpoint: str | Path, *, step: int | None = None):
    """Apply a `w2s train` checkpoint to a loaded model, in place; returns the model.

    `checkpoint` is a `w2s train --out` folder, its `checkpoints/` folder or one
    step's folder; `step` picks a step (default: the one named, else the latest).
    A checkpoint written in the other layer layout (`ModelConfig.layer_stack`) is
    stacked or unstacked to the model's as it is restored (`restore_params`).
    LoRA checkpoints add their adapters (dropout off) with the trained weights;
    full fine-tuning checkpoints (rank 0) replace every parameter. Raises
    ValueError when the checkpoint's shapes do not fit the model.
    """
    from w2s_jax.checkpointing import read_meta, restore_params
    from w2s_jax.models.hf_io import check_finite

    config = LoRAConfig.from_dict(read_meta(checkpoint, step=step)["lora"])
    apply_lora(model, dataclasses.replace(config, dropout=0.0))
    template = nnx.state(model, trainable_filter(config))
    restored = restore_params(checkpoint, template, step=step)  # converts the layer layout
    check_finite(
        checkpoint,
        {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(restored)},
    )
    nnx.update(model, restored)
    return model
