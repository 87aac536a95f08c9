"""Mesh shapes and construction, the one logical-axis rules table, and the shardings
of parameters, train state and batches resolved through it.

Model code speaks only logical axis names (``batch``, ``length``, ``embed`` ...).
This is the only module that spells mesh axis names; everything else asks it to
translate, or names an axis by its constant (:data:`TENSOR` ...).  A mesh shape
(a config's ``mesh``, a planner layout) is resolved in one place,
:func:`resolve_mesh`.  Parameters and activations have separate entries where they differ
(levanter's parameter/compute split): e.g. ``embed`` on a weight is sharded over
``fsdp`` (ZeRO-3 style), but the ``act_embed`` axis of an activation is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

# The mesh axes, outermost first (the last ones are physical neighbours: ICI rings,
# NVLink).  Code elsewhere refers to an axis by these constants, never by its string.
DATA, FSDP, PIPELINE, SEQUENCE, TENSOR = "data", "fsdp", "pipeline", "sequence", "tensor"
MESH_AXES: tuple[str, ...] = (DATA, FSDP, PIPELINE, SEQUENCE, TENSOR)
# The config's default: every device data-parallel.
DEFAULT_MESH: Mapping[str, int] = MappingProxyType({**dict.fromkeys(MESH_AXES, 1), DATA: -1})

# logical name -> mesh axis (or tuple of axes, or None = replicated).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # ---- parameters
    ("layers", PIPELINE),  # scanned layer axis: contiguous blocks of layers per stage
    ("vocab", TENSOR),  # embedding rows / LM-head columns (Megatron vocab-parallel)
    ("embed", FSDP),  # model dim of every weight: FSDP / ZeRO-3
    ("heads", TENSOR),  # q / o: column- / row-parallel attention
    ("kv_heads", TENSOR),
    ("head_dim", None),
    ("mlp", TENSOR),  # gate/up column-parallel, down row-parallel
    ("norm", None),
    ("lora_rank", None),  # LoRA A's last / B's first axis: small, replicated
    ("score", None),  # the reward model's one output column
    # ---- activations
    ("batch", (DATA, FSDP)),
    ("length", SEQUENCE),  # context parallelism
    # Megatron sequence parallelism: the residual stream (norms, dropout, residual adds)
    # is also split over tensor; matmul blocks all-gather in / reduce-scatter out.
    ("res_length", (SEQUENCE, TENSOR)),
    ("act_embed", None),
    ("act_heads", TENSOR),
    ("act_kv_heads", TENSOR),
    ("act_mlp", TENSOR),
    ("act_vocab", TENSOR),
    ("stage", PIPELINE),  # pipeline stage axis of per-stage buffers
)


def mesh_shape(shape: Mapping[str, int]) -> dict[str, int]:
    """All :data:`MESH_AXES` in order, left-out axes 1, names and sizes checked; a
    ``-1`` axis stays ``-1`` (:func:`resolve_mesh` fills it in)."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown[0]!r}; valid axes are {MESH_AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {free}")
    if any(s < 1 and s != -1 for s in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be >= 1 (or -1), got {dict(sizes)}")
    return sizes


def resolve_mesh(
    shape: Mapping[str, int], num_devices: int, *, num_layers: int | None = None
) -> dict[str, int]:
    """The mesh's axis sizes for ``num_devices``: the one place a mesh shape is resolved.

    ``shape`` is ``{'tensor': 8, 'pipeline': 4, ...}`` (a config's ``mesh``); axes
    left out have size 1 and one axis may be ``-1`` to take the remaining devices
    (``data`` in the card's configs).  The product must equal the device count,
    because a silently smaller mesh would idle hardware.  With ``num_layers``, the
    layers must also split evenly into pipeline stages (:func:`layers_per_stage`).
    Returns all :data:`MESH_AXES`, in order.
    """
    sizes = mesh_shape(shape)
    free = [a for a, s in sizes.items() if s == -1]
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh: {num_devices} devices are not divisible by the fixed axes' product "
                f"{fixed} ({dict(sizes)})"
            )
        sizes[free[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ValueError(
            f"mesh: axis sizes {dict(sizes)} multiply to {total}, but there are "
            f"{num_devices} devices"
        )
    if num_layers is not None:
        layers_per_stage(num_layers, axis_size(sizes, "stage"))
    return sizes


def layers_per_stage(num_layers: int, stages: int) -> int:
    """Layers each pipeline stage holds; a one-line error when they do not split evenly."""
    if stages < 1 or num_layers % stages:
        raise ValueError(
            f"mesh: model.num_hidden_layers={num_layers} is not divisible by "
            f"mesh.{PIPELINE}={stages} stages"
        )
    return num_layers // stages


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the 5-axis mesh from ``{'tensor': 8, 'pipeline': 4, ...}`` over ``devices``
    (default: all), sized by :func:`resolve_mesh`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh(shape, len(devices))
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


def param_shardings(mesh: Mesh, boxed_params: Any) -> Any:
    """NamedShardings of a boxed (logically partitioned) parameter tree."""
    return tree_shardings(mesh, nn.get_partition_spec(boxed_params))


def fitted_sharding(s: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """``s`` with each dimension's mesh axes dropped where they do not divide it: a
    quantized kernel's block scales (``[layers, in / block, ...]``) follow the kernel's
    layout where they can and are replicated along a dimension too short to split."""
    spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
    sizes = s.mesh.shape

    def fits(axes, dim: int) -> bool:
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        return dim % math.prod(sizes[a] for a in names) == 0

    return NamedSharding(
        s.mesh,
        PartitionSpec(*(a if fits(a, d) else None for a, d in zip(spec, shape, strict=True))),
    )


def frozen_shardings(params_sharding: Any, abstract_frozen: Any) -> Any:
    """Shardings of a LoRA run's frozen base: each leaf like the kernel it holds (a
    quantized kernel's values exactly so, its scales fitted by :func:`fitted_sharding`)."""
    return jax.tree.map(
        lambda s, sub: jax.tree.map(lambda a: fitted_sharding(s, a.shape), sub),
        params_sharding,
        abstract_frozen,
    )


def state_shardings(
    mesh: Mesh, params_sharding: Any, abstract_state: dict, frozen_sharding: Any = None
) -> dict:
    """Shardings for the train state ``{step, params, opt_state}`` (+ ``frozen``, a LoRA
    run's base weights, when ``frozen_sharding`` is given).

    Optimizer moments mirror the parameters, so an optimizer leaf whose path
    ends with a parameter's path (and has its shape) gets that parameter's
    sharding; counters and other scalars are replicated.
    """
    by_path = {
        tuple(jax.tree_util.keystr((k,)) for k in path): s
        for path, s in jax.tree_util.tree_leaves_with_path(params_sharding)
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = tuple(jax.tree_util.keystr((k,)) for k in path)
        for n in range(len(keys)):
            s = by_path.get(keys[n:])
            if s is not None and len(s.spec) <= leaf.ndim:
                return s
        return replicated

    out = {
        "step": replicated,
        "params": params_sharding,
        "opt_state": jax.tree_util.tree_map_with_path(pick, abstract_state["opt_state"]),
    }
    if frozen_sharding is not None:
        out["frozen"] = frozen_sharding
    return out


def batch_sharding(mesh: Mesh, leading: tuple = ()) -> NamedSharding:
    """A batch field's sharding: ``[*leading, rows, length]`` over ``batch`` and ``length``
    (``leading=(None,)``: the train step's unsharded accumulation axis)."""
    return logical_sharding(mesh, (*leading, "batch", "length"))


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes a logical name maps to (``()`` if replicated), for code that needs
    the axis itself: ``vmap``'s ``spmd_axis_name``, collectives inside ``shard_map``."""
    axes = dict(RULES)[name]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def axis_size(mesh: Mesh | AbstractMesh | Mapping[str, int], name: str) -> int:
    """How many ways ``mesh`` (a mesh or its axis sizes) splits the logical axis ``name``:
    ``stage`` gives the pipeline stages, ``batch`` the data-parallel size."""
    sizes = mesh if isinstance(mesh, Mapping) else mesh.shape
    return math.prod(sizes[a] for a in mesh_axes(name))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical names (no-op outside a mesh)."""
    return nn.with_logical_constraint(x, tuple(names), rules=RULES)
