"""The device mesh (`data`, `fsdp`, `tensor`) and the rule tables mapping logical axis names onto it.

Parameters carry logical names (`vocab`, `embed`, `heads`, ...; see `models/transformer.py`). Training
shards weights over `fsdp` and `tensor`; sampling keeps weights whole along `fsdp` (each decode step
would otherwise all-gather every weight) and shards only over `tensor`.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("cache_len", None),
)

SAMPLE_RULES: Rules = tuple((name, None if name == "embed" else axes) for name, axes in TRAIN_RULES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 3-axis mesh; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
                         f"have {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """PartitionSpec for a tensor; a dimension the mesh axes do not divide stays replicated, and no mesh
    axis is used twice (the first dimension that asks for it wins)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        if not mesh_axes or size % math.prod(mesh.shape[a] for a in mesh_axes):
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: Rules) -> NamedSharding:
    axes = tuple(variable.get_metadata().get("out_sharding") or ())
    value = variable.get_value()
    if len(axes) != len(value.shape):
        axes = (None,) * len(value.shape)
    return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules):
    """A tree like `state` whose leaves are NamedShardings from the variables' logical axes."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_model(make: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = TRAIN_RULES) -> nnx.Module:
    """Build a (randomly initialised) model straight into its shardings: the shapes come from
    `nnx.eval_shape`, and one jitted initialiser writes each parameter's shards on their devices, so no
    device or host ever holds the whole model."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = TRAIN_RULES) -> nnx.Module:
    """Place every parameter of `model` by the rules (in place) and return it."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    values = jax.tree.map(lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    placed = jax.device_put(values, jax.tree.map(lambda s: s, shardings))
    nnx.update(model, placed)
    return model


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def rows_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules = TRAIN_RULES, row_axis: int = 0) -> NamedSharding:
    """The layout of a batch array: rows (axis `row_axis`) over the batch mesh axes (data, fsdp) when they
    divide the row count, otherwise replicated (every device sees the whole, small, batch)."""
    if not len(shape):
        return replicated(mesh)
    axes = [None] * len(shape)
    axes[row_axis] = "batch"
    return NamedSharding(mesh, logical_to_spec(tuple(axes), shape, mesh, rules))


def input_row_axis(ndim: int) -> int:
    """Where the rows of a step input are: inputs are [..., rows, time] (stacked micro-batches, rounds of
    L_PT batches), so the second-to-last axis; a vector's only axis."""
    return max(ndim - 2, 0)


def process_rows(target: NamedSharding, shape: Sequence[int], row_axis: int = 0) -> slice:
    """The block of rows (along `row_axis`) of a global array of `shape` that this process's devices hold."""
    rows = [index[row_axis] for index in target.addressable_devices_indices_map(tuple(shape)).values()]
    start = min(r.start or 0 for r in rows)
    stop = max(shape[row_axis] if r.stop is None else r.stop for r in rows)
    return slice(start, stop)


def place_batch(tree, mesh: Mesh, rules: Rules = TRAIN_RULES):
    """Global arrays from a host batch that every process built the same way (same seed, same order):
    rows (`input_row_axis`) over (data, fsdp), each process handing over only the rows its own devices
    hold (`jax.make_array_from_process_local_data`); scalars replicated, also without a collective (a
    `device_put` of a host value onto several processes' devices first checks, with an eager collective,
    that every process passed the same value). Arrays already on the mesh are re-laid out if needed."""
    def put(x):
        if isinstance(x, jax.Array):
            return jax.device_put(x, rows_sharding(mesh, x.shape, rules, input_row_axis(x.ndim)))  # no-op if so
        x = np.asarray(x)
        if not x.ndim:
            return from_host(x, replicated(mesh))
        row_axis = input_row_axis(x.ndim)
        target = rows_sharding(mesh, x.shape, rules, row_axis)
        local = x[(slice(None),) * row_axis + (process_rows(target, x.shape, row_axis),)]
        return jax.make_array_from_process_local_data(target, local, x.shape)

    return jax.tree.map(put, tree)


def from_host(x, target: jax.sharding.Sharding) -> jax.Array:
    """A global array laid out by `target` from a host value every process holds whole: each process hands
    over its own devices' slices (no collective: a `device_put` of a host value onto several processes'
    devices first gathers the whole value from every process to check they agree)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def to_host(x) -> np.ndarray:
    """The whole value of an array on this process; rows held by other processes are gathered."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


_AGREEMENTS = itertools.count()
AGREEMENT_TIMEOUT_S = 1800


def on_every_process(flag: bool) -> bool:
    """True only when `flag` holds on every process; every process must call it, in the same order.

    Agreed through the coordination service's key-value store, not a device collective: the loop asks
    right after dispatching an update, and on XLA:CPU a second program's gloo collective can then run
    beside the update's own in a different order on each process (a deadlock, seen as 3 runs in 9 of
    bench/multiprocess_soak.py hanging in process_allgather or failing gloo's 30 s context set-up)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax._src import distributed

    client = distributed.global_state.client
    key = f"minillm_jax/on_every_process/{next(_AGREEMENTS)}"
    client.key_value_set(f"{key}/{jax.process_index()}", "1" if flag else "0")
    return all(client.blocking_key_value_get(f"{key}/{i}", AGREEMENT_TIMEOUT_S * 1000) == "1"
               for i in range(jax.process_count()))


def barrier(name: str) -> None:
    """Wait until every process has called `barrier` with this name (every process must, in the same order),
    through the coordination service: no device program beside the compiled steps, and an error after
    AGREEMENT_TIMEOUT_S rather than a hang."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(f"minillm_jax/barrier/{name}/{next(_AGREEMENTS)}",
                                                    AGREEMENT_TIMEOUT_S * 1000)


class StartedTogether:
    """A jitted function whose programs start on every process together. With several processes each new
    input signature is compiled ahead of time (`lower(...).compile()`), then the processes meet at a
    `barrier` before the program's first run: on XLA:CPU a collective's first use opens a gloo context
    that gives the other processes 30 s to arrive (fixed; jax-ml/jax#40831), and compiling one process
    slower than the other (the soak's loaded 2 cores: a round's update) failed or hung runs there. On one
    process it is the jitted function itself. Other attributes (`lower`, ...) are the jitted function's."""

    def __init__(self, jitted, name: str):
        self.jitted, self.name, self.compiled = jitted, name, {}

    def __call__(self, *args):
        if jax.process_count() == 1:
            return self.jitted(*args)
        key = _signature(args)
        program = self.compiled.get(key)
        if program is None:
            program = self.compiled[key] = self.jitted.lower(*args).compile()
            barrier(f"started_together/{self.name}")
        return program(*args)

    def __getattr__(self, name):
        return getattr(self.jitted, name)


def _signature(args) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((type(x).__name__, np.shape(x), str(getattr(x, "dtype", "")), getattr(x, "sharding", None),
                        getattr(x, "weak_type", None)) for x in leaves)


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of `tree` are laid out on (None when they are not on a named mesh)."""
    for leaf in jax.tree.leaves(tree):
        found = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if isinstance(found, Mesh):
            return found
    return None


def describe(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """{parameter path: (shape, sharding spec)} for logging."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        sharding = getattr(value, "sharding", None)
        out[".".join(map(str, path))] = (tuple(np.shape(value)), str(getattr(sharding, "spec", "")))
    return out
