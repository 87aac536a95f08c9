"""Mesh construction and the one logical-axis rules table.

Model code speaks only logical axis names (``batch``, ``length``, ``embed`` ...).
This is the only module that spells mesh axis names; everything else asks it to
translate.  Parameters and activations have separate entries where they differ
(levanter's parameter/compute split): e.g. ``embed`` on a weight is sharded over
``fsdp`` (ZeRO-3 style), but the ``act_embed`` axis of an activation is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "pipeline", "sequence", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # ---- parameters
    ("layers", "pipeline"),  # scanned layer axis: contiguous blocks of layers per stage
    ("vocab", "tensor"),  # embedding rows / LM-head columns (Megatron vocab-parallel)
    ("embed", "fsdp"),  # model dim of every weight: FSDP / ZeRO-3
    ("heads", "tensor"),  # q / o: column- / row-parallel attention
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),  # gate/up column-parallel, down row-parallel
    ("norm", None),
    # ---- activations
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),  # context parallelism
    # Megatron sequence parallelism: the residual stream (norms, dropout, residual adds)
    # is also split over tensor; matmul blocks all-gather in / reduce-scatter out.
    ("res_length", ("sequence", "tensor")),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("stage", "pipeline"),  # pipeline stage axis of per-stage buffers
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the 5-axis mesh from ``{'tensor': 8, 'pipeline': 4, ...}``.

    Axes left out have size 1; one axis may be ``-1`` to take the remaining
    devices (``data`` in the card's configs).  The product must equal the
    device count, because a silently smaller mesh would idle hardware.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown[0]!r}; valid axes are {MESH_AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {free}")
    if any(s < 1 and s != -1 for s in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be >= 1 (or -1), got {dict(sizes)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh: {len(devices)} devices are not divisible by the fixed axes' product "
                f"{fixed} ({dict(sizes)})"
            )
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(
            f"mesh: axis sizes {dict(sizes)} multiply to {total}, but there are "
            f"{len(devices)} devices"
        )
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_spec(names: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for a tuple of logical names under :data:`RULES`."""
    return nn.logical_to_mesh_axes(tuple(names), RULES)


def logical_sharding(mesh: Mesh, names: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(names))


def tree_shardings(mesh: Mesh, logical_tree):
    """Map a pytree of logical PartitionSpecs (from ``nn.get_partition_spec``) to NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, RULES)


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes a logical name maps to (``()`` if replicated), for code that needs
    the axis itself: ``vmap``'s ``spmd_axis_name``, collectives inside ``shard_map``."""
    axes = dict(RULES)[name]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def axis_size(mesh: Mesh, name: str) -> int:
    """How many ways ``mesh`` splits the logical axis ``name`` (e.g. pipeline stages)."""
    return math.prod(mesh.shape[a] for a in mesh_axes(name))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical names (no-op outside a mesh)."""
    return nn.with_logical_constraint(x, tuple(names), rules=RULES)
