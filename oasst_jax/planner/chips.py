"""Accelerator table: peak bf16 FLOP/s, HBM and link bandwidths, with sources.

The planner's time model needs three numbers per chip (peak dense bf16 FLOP/s,
HBM capacity, the bandwidth a collective along one mesh axis can use) and its
memory verdict needs the HBM capacity.  Bandwidths are in bytes/s *per
direction* for the link a ring collective uses:

* GPUs: ``intra_bw`` is NVLink (a ring inside one 8-GPU node), ``inter_bw`` is
  the per-GPU InfiniBand NIC (rail-optimised: one NIC per GPU), used by any
  mesh axis whose devices span nodes.
* TPUs: ICI is a torus; a mesh axis laid along one torus dimension uses the
  two links of that dimension, so ``intra_bw`` = per-chip bidirectional ICI /
  (2 x torus dimensions) x 2 directions of the ring = bidi / dims.  There is no
  ``inter_bw`` inside one slice (every axis is ICI), so it equals ``intra_bw``.

GPU chips also name the XLA target description their programs are compiled for without a
GPU (``target``: a ``GpuTargetConfigProto`` in text form under ``planner/gpu_targets/``,
from openxla/xla ``xla/backends/gpu/target_config/specs/``); a GPU topology ``h100:N`` is
``N`` GPUs on hosts of ``node_size`` (:func:`gpu_topology`), and :func:`gpu_devices` makes
its compile-only devices through jax's CUDA plugin (the ``gpu-aot`` extra; jax is imported
only there, so the table stays light).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.resources
import re

GB = 1e9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # 'gpu' | 'tpu'
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float
    intra_bw: float  # bytes/s per direction for a collective inside a node / along an ICI ring
    inter_bw: float  # bytes/s per direction across nodes (GPU) -- = intra_bw for TPU slices
    node_size: int  # devices sharing the fast domain (NVLink node; whole slice for TPU)
    target: str = ""  # GPU: XLA target description file in planner/gpu_targets/


CHIPS: dict[str, Chip] = {
    # NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s dense BF16 (1979 with sparsity), 80 GB HBM3,
    # NVLink 4 900 GB/s bidirectional (450 GB/s each way); ConnectX-7 NDR 400 Gb/s = 50 GB/s
    # per GPU per direction (DGX H100: 8 NICs for 8 GPUs).
    "h100": Chip("h100", "gpu", 989e12, 80 * GB, 450 * GB, 50 * GB, 8, "h100_sxm.txtpb"),
    # NVIDIA H200 SXM datasheet: same compute as H100, 141 GB HBM3e; NVLink 900 GB/s; NDR IB.
    "h200": Chip("h200", "gpu", 989e12, 141 * GB, 450 * GB, 50 * GB, 8, "h200.txtpb"),
    # NVIDIA A100 SXM4 80GB datasheet: 312 TFLOP/s BF16, 80 GB HBM2e, NVLink 3 600 GB/s
    # bidirectional; HDR InfiniBand 200 Gb/s = 25 GB/s per GPU (DGX A100: 8 NICs).
    "a100": Chip("a100", "gpu", 312e12, 80 * GB, 300 * GB, 25 * GB, 8, "a100_sxm_80.txtpb"),
    # Cloud TPU v4 docs: 275 TFLOP/s BF16, 32 GiB HBM2 at 1200 GB/s; 3D torus, 6 ICI links
    # of 50 GB/s per direction (Jouppi et al. 2023, "TPU v4") = 600 GB/s bidi per chip.
    "v4": Chip("v4", "tpu", 275e12, 32 * GIB, 600 * GB / 3, 600 * GB / 3, 4096),
    # Cloud TPU v5e docs: 197 TFLOP/s BF16, 16 GB HBM2 at 819 GB/s, 400 GB/s bidirectional
    # ICI per chip, 2D torus.
    "v5e": Chip("v5e", "tpu", 197e12, 16 * GB, 400 * GB / 2, 400 * GB / 2, 256),
    # Cloud TPU v5p docs: 459 TFLOP/s BF16, 95 GiB HBM at 2765 GB/s, 1200 GB/s bidirectional
    # ICI per chip, 3D torus.
    "v5p": Chip("v5p", "tpu", 459e12, 95 * GIB, 1200 * GB / 3, 1200 * GB / 3, 8960),
    # Cloud TPU v6e (Trillium) docs: 918 TFLOP/s BF16, 32 GB HBM at 1640 GB/s, 800 GB/s
    # bidirectional ICI per chip (2x v5e), 2D torus.
    "v6e": Chip("v6e", "tpu", 918e12, 32 * GB, 800 * GB / 2, 800 * GB / 2, 256),
}

# ``jax.Device.device_kind`` of the abstract TPU devices -> table key.
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}


def chip(name: str) -> Chip:
    """Look a chip up by table key (``h100``) or topology prefix (``v5p:2x4x4``)."""
    key = name.split(":")[0].lower()
    if key not in CHIPS:
        raise ValueError(f"plan: unknown chip {name!r}; known: {sorted(CHIPS)}")
    return CHIPS[key]


def gpu_topology(text: str) -> tuple[Chip, int, int]:
    """``(chip, hosts, GPUs per host)`` of a GPU topology: ``h100:8`` (one host),
    ``h100:32`` (4 hosts of 8: counts above a node fill whole nodes) or ``h100:4x8``."""
    name, _, shape = text.partition(":")
    c = chip(text)
    if c.platform != "gpu":
        raise ValueError(f"plan: {text!r} is not a GPU topology")
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape)
    hosts, per_host = (int(m.group(1) or 1), int(m.group(2))) if m else (0, 0)
    if m and not m.group(1) and per_host > c.node_size and per_host % c.node_size == 0:
        hosts, per_host = per_host // c.node_size, c.node_size
    if hosts < 1 or not 1 <= per_host <= c.node_size:
        raise ValueError(
            f"plan: bad GPU topology {text!r}; use {name}:N (N <= {c.node_size} GPUs on one "
            f"host, or a multiple of {c.node_size}) or {name}:HOSTSxGPUS, e.g. {name}:4x8"
        )
    return c, hosts, per_host


class CompileRefused(ValueError):
    """A compile-only client or backend compiler refused (not for lack of memory)."""


GPU_AOT_EXTRA = "pip install -e '.[gpu-aot]'"
# the CUDA plugin's two wheels per CUDA major version; each must be jax's own version
CUDA_PLUGINS = {
    "cuda13": ("jax-cuda13-plugin", "jax-cuda13-pjrt"),
    "cuda12": ("jax-cuda12-plugin", "jax-cuda12-pjrt"),
}


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_cuda_plugin(versions: dict[str, str | None], jax_version: str) -> str:
    """The CUDA plugin to compile with, given installed ``{distribution: version}``; a
    ``ValueError`` naming the extra when none is installed whole or it is not jax's own
    version (the plugin's compiler is built against one jaxlib: another fails obscurely)."""
    for dists in CUDA_PLUGINS.values():
        found = {d: versions.get(d) for d in dists}
        if not any(found.values()):
            continue
        bad = {d: v for d, v in found.items() if v != jax_version}
        if bad:
            have = ", ".join(f"{d} {v or 'missing'}" for d, v in bad.items())
            raise ValueError(
                f"plan: a GPU topology compiles with jax's CUDA plugin at jax's version "
                f"{jax_version}, but {have} is installed: {GPU_AOT_EXTRA}"
            )
        return dists[0]
    raise ValueError(
        "plan: a GPU topology compiles with XLA's GPU compiler, which needs jax's CUDA "
        f"plugin (no GPU needed): {GPU_AOT_EXTRA}"
    )


def target_config(chip: Chip) -> str:
    """The chip's ``GpuTargetConfigProto`` text (package data, from openxla/xla's specs)."""
    if not chip.target:
        raise ValueError(f"plan: no XLA target description for {chip.name}")
    return (importlib.resources.files(__package__) / "gpu_targets" / chip.target).read_text()


def target_memory_bytes(text: str) -> int:
    """``device_memory_size`` of a target description: the HBM the compiler plans for."""
    return int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))


def gpu_devices(topology: str) -> list:
    """Compile-only ``jax.Device``s of a GPU topology (:func:`gpu_topology`): the CUDA
    plugin's topology ``1xHOSTSxGPUS`` (one slice; devices of host ``i`` have process index
    ``i``).  ``ValueError`` naming the ``gpu-aot`` extra when the plugin is missing or not
    jax's version, :class:`CompileRefused` when its client refuses the topology."""
    import jax
    import jax.experimental.topologies as topologies

    chip, hosts, per_host = gpu_topology(topology)
    versions = {d: installed_version(d) for dists in CUDA_PLUGINS.values() for d in dists}
    check_cuda_plugin(versions, jax.__version__)
    shape = f"1x{hosts}x{per_host}"
    try:
        topo = topologies.get_topology_desc(
            platform="cuda", target_config=target_config(chip), topology=shape
        )
    except (NotImplementedError, RuntimeError) as e:  # JaxRuntimeError is a RuntimeError
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CompileRefused(
            f"the CUDA compile-only client refused {hosts} host(s) x {per_host} "
            f"{chip.name} (topology {shape}): {first}"
        ) from None
    return list(topo.devices)
