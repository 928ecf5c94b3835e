"""Device mesh and logical-axis sharding: one rules table maps model axis names to mesh axes.

The mesh has three axes, `data` (pure data parallel), `fsdp` (data parallel with parameters,
gradients and optimizer state sharded) and `tensor` (Megatron-style model parallel). The same
code runs on 1 CPU, 8 fake CPU devices, a GPU host or a TPU pod: only the mesh shape changes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sorted_jax.core.errors import UsageError, UserError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

# Logical axis -> mesh axes. Parameters shard their `embed` axis over fsdp (ZeRO-3 style) and
# their head/mlp/vocab axes over tensor; activations shard the batch over data+fsdp.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
)


class MeshError(UserError):
    """A mesh shape or batch size that the devices cannot provide."""


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one -1 meaning "all remaining devices"."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise MeshError(f"mesh shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"mesh shape entries must be positive, with at most one -1: {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise MeshError(f"mesh shape {shape}: {known} does not divide the {num_devices} "
                            "available devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise MeshError(f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs "
                        f"{math.prod(shape)} devices, but {num_devices} are available; use -1 "
                        "for one axis to take the rest")
    return shape  # type: ignore[return-value]


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_mesh_shape(shape, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(resolved), MESH_AXES)


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the batch axis is split."""
    axes = mesh_axes_of("batch", rules)
    return math.prod(mesh.shape[a] for a in axes)


def mesh_axes_of(logical: str, rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes a logical axis name maps to under `rules` (empty: replicated)."""
    for name, target in rules:
        if name == logical:
            if target is None:
                return ()
            return (target,) if isinstance(target, str) else tuple(target)
    return ()


def spec_for(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """Mesh PartitionSpec for one array; mesh axes that do not divide a dim are dropped.

    Dropping (replicating) instead of failing lets e.g. 1 kv head live on a tensor=2 mesh.
    Each mesh axis is used at most once per array.
    """
    used: set[str] = set()
    out = []
    for name, dim in zip(logical_axes, shape, strict=True):
        axes = [] if name is None else [a for a in mesh_axes_of(name, rules) if a not in used]
        chosen: list[str] = []
        for a in axes:
            size = math.prod(mesh.shape[x] for x in [*chosen, a])
            if mesh.shape[a] > 1 and dim % size == 0:
                chosen.append(a)
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` / plain abstract arrays.

    Leaves without logical names (step counters, optimizer scalars) are replicated.
    """
    def one(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            spec = spec_for(leaf.names, value.shape, mesh, rules)
        else:
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_tree,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
    axes = mesh_axes_of("batch", rules)
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def check_batch_size(global_batch: int, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                     grad_accum: int = 1) -> None:
    dp = data_parallel_size(mesh, rules)
    if global_batch % grad_accum:
        raise MeshError(f"batch size {global_batch} is not divisible by grad_accum="
                        f"{grad_accum}")
    micro = global_batch // grad_accum
    if micro % dp:
        raise MeshError(f"micro-batch size {micro} (batch {global_batch} / grad_accum "
                        f"{grad_accum}) is not divisible by the data-parallel size {dp} "
                        f"(mesh {dict(mesh.shape)}); change the batch size or the mesh")


def axes_in_context(logical: str, dim: int, rules: Rules | None = None) -> tuple[str, ...]:
    """Mesh axes of the mesh in context (`jax.set_mesh`) that split a `dim`-sized `logical` axis.

    Axes of size 1, axes not in the mesh and axes that would not divide `dim` are left out, as
    `spec_for` does for parameters. Rules default to the flax logical rules in context.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    if rules is None:
        rules = tuple(nn.get_logical_axis_rules()) or DEFAULT_RULES
    chosen: list[str] = []
    for a in mesh_axes_of(logical, tuple(rules)):
        if a in mesh.axis_names and mesh.shape[a] > 1 and dim % math.prod(
                mesh.shape[x] for x in [*chosen, a]) == 0:
            chosen.append(a)
    return tuple(chosen)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """While tracing: the model's `with_logical_constraint` calls bind to this mesh."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def rules_from_config(rules: Any) -> Rules:
    """Rules from a config (lists from JSON/ml_collections) as a tuple of tuples."""
    out = []
    for name, target in rules:
        if isinstance(target, list):
            target = tuple(target)
        out.append((str(name), target))
    return tuple(out)


def parse_mesh(text: str, flag: str = "--mesh") -> Mesh:
    """A (data, fsdp, tensor) mesh from a command line's "1,-1,1"; a shape without -1 that
    needs fewer devices than there are uses the first ones."""
    try:
        shape = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} must be three integers data,fsdp,tensor, got {text!r}") from None
    devices = jax.devices()
    if len(shape) == 3 and -1 not in shape and math.prod(shape) < len(devices):
        devices = devices[:math.prod(shape)]
    return make_mesh(shape, devices)
