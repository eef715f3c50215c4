"""The device mesh (`data`, `fsdp`, `tensor`) and the rule tables mapping logical axis names onto it.

Parameters carry logical names (`vocab`, `embed`, `heads`, ...; see `models/transformer.py`). Training
shards weights over `fsdp` and `tensor`; sampling keeps weights whole along `fsdp` (each decode step
would otherwise all-gather every weight) and shards only over `tensor`.
"""

from __future__ import annotations

import math
from typing import Sequence

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


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = TRAIN_RULES) -> nnx.Module:
    """Place every parameter of `model` by the rules (in place) and return it."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    values = jax.tree.map(lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    placed = jax.device_put(values, jax.tree.map(lambda s: s, shardings))
    nnx.update(model, placed)
    return model


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = TRAIN_RULES) -> NamedSharding:
    """Leading axis over the batch mesh axes, the rest replicated."""
    batch = dict(rules)["batch"]
    return NamedSharding(mesh, PartitionSpec(batch, *([None] * (ndim - 1))))


def describe(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """{parameter path: (shape, sharding spec)} for logging."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        sharding = getattr(value, "sharding", None)
        out[".".join(map(str, path))] = (tuple(np.shape(value)), str(getattr(sharding, "spec", "")))
    return out
