"""Device mesh, parameter partition rules and activation rules (as data), multi-host start-up.

Mesh axes are ("data", "fsdp", "tensor"): batch over data x fsdp, parameters over
fsdp (their input/embedding dimension) and tensor (heads / MLP width / vocab).
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

P = PartitionSpec
AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the "/"-joined parameter path, spec). First match wins; kernels are [in, out].
PARTITION_RULES: tuple[tuple[str, PartitionSpec], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P("tensor")),
    (r"(o_proj|down_proj)/kernel$", P("tensor", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r".*", P()),
)
# Parameters of the scanned layer stack (`model/layers/mlp/up_proj/kernel`, no layer index
# in the path) carry a leading layer axis: it stays unsharded and the rule's spec applies
# to the axes after it.
STACKED_LAYER_PATH = r"(^|/)layers/(?!\d)"

# Logical activation axis -> mesh axes (None: unsharded), for `constrain`. FSDP is data
# parallelism with sharded weights, so rows split over data x fsdp; tensor parallelism splits
# what the column-parallel kernels ([fsdp, tensor]) put on their output axis (heads, MLP
# width) and the row-parallel ones (o_proj, down_proj: [tensor, fsdp]) sum back into a
# residual stream whose embedding axis stays whole (no sequence parallelism).
ACTIVATION_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": None,
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
}


def make_mesh(spec: str | None = None, *, devices=None) -> Mesh:
    """Mesh over ("data", "fsdp", "tensor") from a spec like "data=2,tensor=4".

    None or "auto" puts every device on "data". Unnamed axes have size 1; one axis
    may be -1 to take the remaining devices. The sizes must multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {axis: 1 for axis in AXES}
    if spec is None or spec.strip() in ("", "auto"):
        sizes["data"] = n
    else:
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in AXES:
                raise ValueError(
                    f"mesh spec {spec!r}: bad entry {part!r} (expected AXIS=SIZE, AXIS in {AXES})"
                )
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: size {value!r} is not an integer") from None
        free = [a for a in AXES if sizes[a] == -1]
        if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
            raise ValueError(f"mesh spec {spec!r}: sizes must be positive (at most one -1)")
        if free:
            rest = int(np.prod([s for s in sizes.values() if s != -1]))
            sizes[free[0]] = n // rest if n % rest == 0 else 0
    shape = tuple(sizes[a] for a in AXES)
    if int(np.prod(shape)) != n:
        raise ValueError(
            f"mesh spec {spec!r} gives shape {dict(zip(AXES, shape, strict=True))}, not {n} devices"
        )
    axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=PARTITION_RULES) -> PartitionSpec:
    """The first matching rule's spec, without axes of size 1 or that do not divide the dim
    (after an unsharded layer axis for parameters of a stacked layer)."""
    spec = next((spec for pattern, spec in rules if re.search(pattern, path)), P())
    if re.search(STACKED_LAYER_PATH, path):
        spec = P(None, *spec)
    return _fit(spec, shape, dict(mesh.shape))


def activation_spec(names, shape, mesh, rules=ACTIVATION_RULES) -> PartitionSpec:
    """The spec of an activation whose axes have the logical `names` (keys of `rules`),
    without mesh axes that are not Auto, of size 1 or that do not divide their dim."""
    auto = jax.sharding.AxisType.Auto
    sizes = {
        name: size
        for (name, size), kind in zip(mesh.shape.items(), mesh.axis_types, strict=True)
        if kind == auto
    }
    return _fit(P(*(rules[name] for name in names)), shape, sizes)


def constrain(x, names, rules=ACTIVATION_RULES):
    """`x` under `with_sharding_constraint` to `activation_spec(names)` on the mesh it is
    traced on (its inputs' mesh, else `jax.set_mesh`'s). A no-op without a mesh or when no
    axis would be sharded (one device, dims that do not divide)."""
    mesh = getattr(jax.typeof(x).sharding, "mesh", None)
    if mesh is None or mesh.empty:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = activation_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec)) if spec else x


def _fit(spec: PartitionSpec, shape: tuple[int, ...], sizes: dict[str, int]) -> PartitionSpec:
    """`spec` with None for each dim whose axes are not all in `sizes` (axis -> size), are
    of size 1 or do not divide it; trailing Nones dropped."""
    dims = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([sizes.get(a, 0) for a in names])) if names else 1
        dims.append(axes if size > 1 and dim % size == 0 else None)
    while dims and dims[-1] is None:
        dims.pop()
    return P(*dims)


def param_sharding(path: str, shape: tuple[int, ...], mesh: Mesh, rules=PARTITION_RULES):
    """NamedSharding of the parameter at `path` (e.g. "model/layers/0/mlp/up_proj/kernel")."""
    return NamedSharding(mesh, spec_for(path, shape, mesh, rules))


def state_shardings(state, mesh: Mesh, rules=PARTITION_RULES):
    """An nnx.State like `state` (abstract or concrete) holding each variable's NamedSharding."""
    from flax import nnx

    return nnx.from_flat_state(
        [
            (path, var.replace(param_sharding(_name(path), var.get_value().shape, mesh, rules)))
            for path, var in nnx.to_flat_state(state)
        ]
    )


def to_global(array, sharding) -> jax.Array:
    """A global array from identical host copies on every process (one host or many)."""
    return jax.make_array_from_callback(np.shape(array), sharding, lambda index: array[index])


def place_batch(array, mesh: Mesh) -> jax.Array:
    """A host [B, ...] array split over the mesh's batch axes (`batch_sharding`)."""
    return to_global(array, batch_sharding(mesh, np.shape(array)[0], np.ndim(array)))


def put(x, placement) -> jax.Array:
    """`x` (numpy or a jax array) placed with the sharding `placement`, on one process or several.

    `jax.device_put` where it can (one process, or `x` already spread over the processes);
    otherwise built from this process's copy of `x` (a host value or an array on its own
    devices), which must equal every other process's: device_put refuses a sharding whose
    devices are not all this process's.
    """
    if placement.is_fully_addressable or not getattr(x, "is_fully_addressable", True):
        return jax.device_put(x, placement)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        data = put(jax.random.key_data(x), placement)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return to_global(np.asarray(x), placement)


def replicate(tree, mesh: Mesh):
    """Every array of `tree` replicated over `mesh`, unless it already lives on it (`put`:
    under multi-host JAX every process must hold the same values)."""
    replicated = NamedSharding(mesh, P())

    def place(x):
        placed = getattr(x, "sharding", None)
        if isinstance(placed, NamedSharding) and placed.mesh == mesh:
            return x
        return put(x, replicated)

    return jax.tree.map(place, tree)


def _name(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def batch_sharding(mesh: Mesh, batch_size: int, ndim: int = 2) -> NamedSharding:
    """Shard a [B, ...] array's batch over data x fsdp when it divides, else replicate."""
    size = mesh.shape["data"] * mesh.shape["fsdp"]
    first = BATCH_AXES if batch_size % size == 0 else None
    return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def to_host(array) -> np.ndarray:
    """The whole value of a (possibly multi-host sharded) array, on this host."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    if array.is_fully_replicated:  # every process holds it whole: no collective needed
        return np.asarray(array.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def is_leader() -> bool:
    """Whether this is process 0: the one process of a multi-host run that writes files."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process. A collective under multi-host JAX: every process
    must call it at the same point."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def leader_says(flag: bool) -> bool:
    """Process 0's `flag` on every process (a collective under multi-host JAX), so that all
    take the same branch, e.g. on whether an output file exists already."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when launched as one of several processes.

    Detects a multi-host TPU slice (TPU_WORKER_HOSTNAMES with several hosts), a
    multi-task SLURM/Open MPI job, or an explicit launch: JAX_COORDINATOR_ADDRESS
    (host:port of process 0) with JAX_NUM_PROCESSES and JAX_PROCESS_ID (any machines,
    including several processes on one CPU host). Must run before any other JAX call.
    Returns True when it initialised.
    """
    if jax.distributed.is_initialized():
        return False
    env = os.environ
    explicit = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        for name, key in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if env.get(key):
                try:
                    explicit[name] = int(env[key])
                except ValueError:
                    raise ValueError(f"{key} must be an integer, got {env[key]!r}") from None
    multi = (
        bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if multi:
        jax.distributed.initialize(**explicit)
    return multi
