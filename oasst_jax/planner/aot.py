"""Ahead-of-time compile of the real train step on real or abstract devices.

Nothing is allocated: the state and batch are ``jax.ShapeDtypeStruct``s that
carry their ``NamedSharding``s, the step is the trainer's own jitted step
(:func:`oasst_jax.train_step.build_trainer`, same shardings and donation), and
``lower(...).compile()`` runs the backend compiler for the target devices:

* abstract TPU devices from ``jax.experimental.topologies`` (libtpu, the ``plan``
  extra): the real TPU compiler, whose ``memory_analysis()`` is the HBM the
  program will use.  The compiler checks only its *temporaries* against HBM
  (``RESOURCE_EXHAUSTED``, turned into a result carrying the bytes it asked
  for), so a program whose arguments + temporaries exceed HBM can still
  compile: the fit verdict compares the whole peak with the chip's HBM.
* abstract NVIDIA GPUs (:func:`gpu_devices`, the ``gpu-aot`` extra): XLA's GPU
  compiler through the CUDA PJRT plugin's compile-only client, given the
  chip's target description (``planner/gpu_targets/``), the same route as
  jax's ``tests/deviceless_aot_test.py``.  Its buffer assignment is the device
  program's; the compile does no autotuning (no device to time on), so
  temporaries may differ a little from a compile on a real GPU.
* emulated CPU devices: proves the step compiles and shards as intended, but
  the CPU backend schedules and frees buffers differently (about 3x the TPU's
  temporaries for 70B), so its memory figures are *not predictive*.

With ``attention_impl='pallas'`` a TPU compile builds the project's Mosaic flash
kernel and a GPU compile the kernels a run on that GPU would pick -- Mosaic GPU on
Hopper with jax >= 0.11, Triton on older GPUs or jax (``LlamaConfig.attention_backend``:
the dispatch would otherwise pick the kernel from the running CPU platform); a
CPU compile uses the XLA attention instead, since the interpreted kernel says
nothing about any device.  The report counts the kernel calls found in the
compiled program, names their families and says which attention was compiled.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from oasst_jax import optim, sharding
from oasst_jax.attention import gpu_backend
from oasst_jax.config import micro_steps, model_config
from oasst_jax.data import pipeline
from oasst_jax.model import Llama, LlamaConfig, hidden_dropout_rates
from oasst_jax.planner.chips import CompileRefused
from oasst_jax.planner.memory import Layout
from oasst_jax.train_step import StepConfig, build_trainer

_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Per-device bytes of one compiled step (``temp``/``peak`` from the compiler)."""

    backend: str  # 'tpu' | 'gpu' | 'cpu'
    device_kind: str
    mesh: dict[str, int]
    param_bytes: int  # from the state's shardings
    optimizer_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int  # compiler temporaries: grads/accumulators, activations, workspace
    peak_bytes: int  # arguments + outputs - aliased + temporaries (or the OOM request)
    capacity_bytes: int | None  # what the compiler has: TPU OOM message, GPU target's memory
    fits: bool | None  # False: the compiler refused; None: compare ``peak_bytes`` with the HBM
    compile_s: float
    attention_impl: str
    kernel_calls: dict[str, int]  # Pallas kernels in the program by name
    kernel_kinds: tuple[str, ...] = ()  # their families: 'Mosaic', 'Triton', 'Mosaic GPU'
    error: str = ""


def tpu_devices(topology: str) -> list[jax.Device]:
    """Abstract devices of a TPU slice, e.g. ``v5p:2x4x4`` (needs libtpu: the ``plan`` extra)."""
    from jax.experimental import topologies

    # several planners (or tests) may hold libtpu at once; none of them drives hardware
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except RuntimeError as e:  # libtpu missing, or a topology it does not know
        first = str(e).strip().splitlines()[0][:300]
        raise ValueError(
            f"plan: no TPU topology {topology!r} ({first}); TPU compiles need libtpu: "
            "pip install -e '.[plan]'"
        ) from None
    return list(desc.devices)


def ordered_devices(devices: list[jax.Device], sizes: tuple[int, ...]) -> list[jax.Device]:
    """Devices ordered so the mesh's last axes are physical neighbours (ICI rings), as
    ``mesh_utils.create_device_mesh`` does; flat order where it has no rule for the shape."""
    from jax.experimental import mesh_utils

    try:
        return list(mesh_utils.create_device_mesh(sizes, devices).flat)
    except (ValueError, NotImplementedError, AssertionError):
        return list(devices)


def _bits(dtype: Any) -> int:
    """Storage bits of one element: 4 for int4/nf4-style sub-byte types (packed on TPU)."""
    dt = jnp.dtype(dtype)
    if jnp.issubdtype(dt, jnp.integer):
        return jnp.iinfo(dt).bits
    if jnp.issubdtype(dt, jnp.floating):
        return jnp.finfo(dt).bits
    return dt.itemsize * 8


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct``s."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * _bits(leaf.dtype) // 8
    return total


def parse_oom(message: str) -> tuple[int, int, bool] | None:
    """``(requested, capacity, temporaries_only)`` bytes from an XLA:TPU ``RESOURCE_EXHAUSTED``.

    Two forms exist: "Used X of Y hbm" (everything) and "the total memory required
    for HLO temporaries (X) exceeds available HBM (Y)" (temporaries only: the
    compiler checks them alone, so arguments must be added to get the peak).
    """
    num = r"([\d.]+)([KMGT])"
    m = re.search(rf"[Uu]sed {num} of {num} hbm", message)
    temps_only = m is None
    if m is None:
        m = re.search(rf"HLO temporaries \({num}\) exceeds available HBM \({num}\)", message)
    if m is None:
        return None
    used = float(m.group(1)) * _UNITS[m.group(2)]
    cap = float(m.group(3)) * _UNITS[m.group(4)]
    return int(used), int(cap), temps_only


# custom-call targets of Pallas kernels on each platform -> the kernel family they build
KERNEL_TARGETS = {
    "tpu": {"tpu_custom_call": "Mosaic"},
    "gpu": {"__gpu$xla.gpu.triton": "Triton", "mosaic_gpu_v2": "Mosaic GPU"},
}


# The kernel function in a Mosaic GPU call's serialized module: jax's Mosaic GPU lowering
# names it ``{kernel_name}_mosaic_gpu``, a NUL-terminated entry of the module's string table
# (printed ``\00``), beside the dialect's own ``stable_mosaic_gpu``.
_MOSAIC_GPU_FUNC = re.compile(r"\\00(?!stable_mosaic_gpu\\00)([A-Za-z_]\w*)_mosaic_gpu(?=\\00)")


def _kernel_name(line: str, target: str) -> str:
    """A kernel's name from its custom-call line: Mosaic (TPU) and Triton calls carry it in
    their config (``kernel_name``/``name``); a Mosaic GPU call carries only a serialized
    module, whose kernel function bears the name.  Not the call's ``op_name`` scope: that is
    only ``mpmd_map`` when jax keeps one frame per location
    (``JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS=0``), and the module is the same in a
    lowering's text and a compiled program's."""
    if target == "mosaic_gpu_v2":
        m = _MOSAIC_GPU_FUNC.search(line)
        return m.group(1) if m else target
    names = re.findall(r'\b(?:kernel_)?name\s*=\s*"([\w.$-]+)"', line)
    return names[-1] if names else target


def kernel_calls(program_text: str, backend: str) -> dict[str, int]:
    """Pallas kernel calls in an HLO/StableHLO text by kernel name (Mosaic custom calls on
    TPU; Triton or Mosaic GPU custom calls on GPU): proof that the kernel, not a fallback,
    is what the compiler built (a refused program counts from its lowering)."""
    targets = KERNEL_TARGETS.get(backend, {})
    calls: dict[str, int] = {}
    for line in program_text.splitlines() if targets else ():
        for target in targets:
            if target in line:
                name = _kernel_name(line, target)
                calls[name] = calls.get(name, 0) + line.count(target)
    return calls


def kernel_kinds(program_text: str, backend: str) -> tuple[str, ...]:
    """The kernel families in the program (``('Mosaic GPU', 'Triton')``: a Hopper program at
    head dim 128 runs Triton's dk/dv beside Mosaic GPU's forward and dq)."""
    targets = KERNEL_TARGETS.get(backend, {})
    return tuple(sorted(kind for target, kind in targets.items() if target in program_text))


def abstract_batch(cfg: ml_collections.ConfigDict, accum: int, batch_sharding) -> dict:
    rows = cfg.global_batch_size // accum
    shape = pipeline.batch_shape(rows, cfg.seq_length, accumulation=accum)
    return {
        k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding)
        for k, dt in pipeline.BATCH_DTYPES.items()
    }


def target_model_config(model_cfg: LlamaConfig, device: jax.Device) -> LlamaConfig:
    """The model as compiled for ``device``: the Pallas kernel is built for its TPU (Mosaic)
    or GPU target, not interpreted, rather than for the CPU host this runs on -- on a GPU
    the kernels a run on that GPU picks (:func:`oasst_jax.attention.gpu_backend`: Mosaic
    GPU on Hopper when the installed jax has it and it takes the head dim and dtype, else
    Triton; a compile-only device reports its target's compute capability).  On CPU the
    XLA attention stands in, as interpreting the kernel would only slow the compile."""
    if model_cfg.attention_impl != "pallas":
        return model_cfg
    if device.platform == "tpu":
        return dataclasses.replace(model_cfg, attention_backend="tpu")
    if device.platform == "gpu":
        backend = gpu_backend(device, model_cfg.head_size, model_cfg.dtype)
        return dataclasses.replace(model_cfg, attention_backend=backend)
    return dataclasses.replace(model_cfg, attention_impl="xla")


def compile_step(
    cfg: ml_collections.ConfigDict, layout: Layout, devices: list[jax.Device]
) -> CompileReport:
    """Lower and compile ``cfg``'s train step for ``devices`` in ``layout``: its mesh sizes
    (already resolved for ``devices``), micro batch and remat policy stand in for the config's."""
    model_cfg = dataclasses.replace(model_config(cfg), remat_policy=layout.remat)
    model_cfg = target_model_config(model_cfg, devices[0])
    sizes = dict(layout.mesh)
    accum = micro_steps(cfg.global_batch_size, layout.micro_batch_size, layout.data_parallel)
    order = tuple(sizes[a] for a in sharding.MESH_AXES)
    mesh = sharding.make_mesh(sizes, ordered_devices(devices, order))
    tx = optim.make_optimizer(cfg.optim, cfg.train_iters)
    rates = hidden_dropout_rates(model_cfg.num_hidden_layers, cfg.hidden_dropout, cfg.lima_dropout)
    stages = sharding.axis_size(sizes, "stage")
    step_cfg = StepConfig(accum, layout.micro_batch_size, cfg.loss_normalization, cfg.seed, stages)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        trainer = build_trainer(
            Llama(model_cfg), tx, optim.schedule(cfg.optim, cfg.train_iters), step_cfg, rates, mesh
        )
        state = trainer.abstract_state
        lowered = trainer.step.lower(state, abstract_batch(cfg, accum, trainer.batch_sharding))
        base = dict(
            backend=devices[0].platform,
            device_kind=devices[0].device_kind,
            mesh=sizes,
            # a LoRA run's frozen base counts as parameters
            param_bytes=shard_bytes(state["params"]) + shard_bytes(state.get("frozen", {})),
            optimizer_bytes=shard_bytes(state["opt_state"]),
            attention_impl=model_cfg.attention_impl,
        )
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 -- an OOM is a result, a refusal one line
            oom = parse_oom(str(e))
            if oom is None:
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                raise CompileRefused(
                    f"XLA's {base['backend'].upper()} compiler refused "
                    f"{layout.label()} on {len(devices)} x {base['device_kind']}: "
                    f"{first or type(e).__name__}"
                ) from e
            requested, capacity, temps_only = oom
            text = lowered.as_text()
            base["kernel_calls"] = kernel_calls(text, base["backend"])
            base["kernel_kinds"] = kernel_kinds(text, base["backend"])
            state_bytes = base["param_bytes"] + base["optimizer_bytes"]
            return CompileReport(
                **base,
                argument_bytes=state_bytes,
                output_bytes=0,
                alias_bytes=0,
                temp_bytes=requested if temps_only else 0,
                peak_bytes=requested + state_bytes if temps_only else requested,
                capacity_bytes=capacity,
                fits=False,
                compile_s=time.perf_counter() - t0,
                error=str(e).strip().splitlines()[0][:300],
            )
    text = compiled.as_text()
    base["kernel_calls"] = kernel_calls(text, base["backend"])
    base["kernel_kinds"] = kernel_kinds(text, base["backend"])
    mem = compiled.memory_analysis()
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return CompileReport(
        **base,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        peak_bytes=int(peak),
        capacity_bytes=None,
        fits=None,  # the caller compares peak with the chip's HBM
        compile_s=time.perf_counter() - t0,
    )


def cpu_devices(n: int) -> list[jax.Device]:
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise ValueError(
            f"plan: the mesh needs {n} devices but only {len(devices)} CPU devices exist; "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts"
        )
    return devices[:n]
