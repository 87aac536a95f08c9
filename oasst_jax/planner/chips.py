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
"""

from __future__ import annotations

import dataclasses

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


CHIPS: dict[str, Chip] = {
    # NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s dense BF16 (1979 with sparsity), 80 GB HBM3,
    # NVLink 4 900 GB/s bidirectional (450 GB/s each way); ConnectX-7 NDR 400 Gb/s = 50 GB/s
    # per GPU per direction (DGX H100: 8 NICs for 8 GPUs).
    "h100": Chip("h100", "gpu", 989e12, 80 * GB, 450 * GB, 50 * GB, 8),
    # NVIDIA H200 SXM datasheet: same compute as H100, 141 GB HBM3e; NVLink 900 GB/s; NDR IB.
    "h200": Chip("h200", "gpu", 989e12, 141 * GB, 450 * GB, 50 * GB, 8),
    # NVIDIA A100 SXM4 80GB datasheet: 312 TFLOP/s BF16, 80 GB HBM2e, NVLink 3 600 GB/s
    # bidirectional; HDR InfiniBand 200 Gb/s = 25 GB/s per GPU (DGX A100: 8 NICs).
    "a100": Chip("a100", "gpu", 312e12, 80 * GB, 300 * GB, 25 * GB, 8),
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
