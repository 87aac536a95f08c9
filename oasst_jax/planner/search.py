"""Layout search: enumerate meshes x micro-batch sizes x remat policies, prune, rank.

The global batch is fixed (it is part of the recipe); a layout is valid when
every sharded dimension divides evenly (kv heads, MLP width and padded vocab by
``tensor``, layers by ``pipeline``, the model dimension by ``fsdp``, the
sequence by ``sequence``) and ``global_batch`` is a whole number of
``micro_batch x data x fsdp`` micro-steps.  The analytic memory model prunes
layouts over the chip's HBM (with headroom for what it does not model); the
rest are ranked by the time model's step time.  Compiling the best few for the
real topology is the caller's job (the compiler's verdict outranks the model).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

from oasst_jax import sharding
from oasst_jax.model import REMAT_POLICIES, LlamaConfig
from oasst_jax.planner.chips import Chip
from oasst_jax.planner.lora import LoraSpec, lora_memory
from oasst_jax.planner.memory import (
    Layout,
    MemoryEstimate,
    jax_memory,
    param_table,
    sharded_elements,
)
from oasst_jax.planner.timing import TimeEstimate, estimate_time

MICRO_BATCHES = (1, 2, 4, 8)
HEADROOM = 0.9  # keep 10% of HBM for what the model leaves out (fragmentation, workspaces)


@dataclasses.dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    time: TimeEstimate
    capacity: float  # HBM x headroom

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.capacity


def factorisations(n: int, k: int) -> Iterator[tuple[int, ...]]:
    """Ordered ``k``-tuples of positive integers whose product is ``n``."""
    if k == 1:
        yield (n,)
        return
    for first in range(1, n + 1):
        if n % first == 0:
            for rest in factorisations(n // first, k - 1):
                yield (first, *rest)


def valid(cfg: LlamaConfig, layout: Layout, seq: int, global_batch: int) -> bool:
    m = layout.mesh
    try:  # names, device count, layers per pipeline stage
        sharding.resolve_mesh(m, layout.devices, num_layers=cfg.num_hidden_layers)
    except ValueError:
        return False
    t = m[sharding.TENSOR]
    return (
        cfg.num_key_value_heads % t == 0
        and cfg.intermediate_size % t == 0
        and cfg.padded_vocab_size % t == 0
        and cfg.hidden_size % m[sharding.FSDP] == 0
        and seq % m[sharding.SEQUENCE] == 0
        and global_batch % (layout.micro_batch_size * layout.data_parallel) == 0
    )


def enumerate_layouts(
    cfg: LlamaConfig,
    devices: int,
    seq: int,
    global_batch: int,
    micro_batches: tuple[int, ...] = MICRO_BATCHES,
    remats: tuple[str, ...] = REMAT_POLICIES,
) -> list[Layout]:
    """Every valid layout for ``devices`` (the recipe's global batch held fixed)."""
    out = []
    for sizes in factorisations(devices, len(sharding.MESH_AXES)):
        mesh = dict(zip(sharding.MESH_AXES, sizes, strict=True))
        for mb, remat in itertools.product(micro_batches, remats):
            layout = Layout(mesh, mb, remat)
            if valid(cfg, layout, seq, global_batch):
                out.append(layout)
    return out


def model_layout(
    cfg: LlamaConfig,
    layout: Layout,
    chip: Chip,
    seq: int,
    global_batch: int,
    efficiency: float,
    table: list,
    lora: LoraSpec | None = None,
) -> tuple[MemoryEstimate, TimeEstimate]:
    """This trainer's analytic memory (as ``chip``'s compiler lays it out) and step time
    for ``layout``: full training, or a frozen base with LoRA adapters when ``lora`` is given."""
    per_device = sharded_elements(table, layout.mesh)
    if lora is None:
        memory = jax_memory(cfg, layout, seq, global_batch, table, chip.platform)
        base_bytes = None
    else:
        memory = lora_memory(cfg, layout, seq, global_batch, lora, table, chip.platform)
        base_bytes = lora.bytes_per_base_param(cfg, layout.mesh, table)
    time = estimate_time(
        cfg,
        layout,
        chip,
        seq,
        global_batch,
        per_device,
        efficiency=efficiency,
        frozen_base_bytes=base_bytes,
    )
    return memory, time


def rank(
    cfg: LlamaConfig,
    layouts: list[Layout],
    chip: Chip,
    seq: int,
    global_batch: int,
    efficiency: float,
    lora: LoraSpec | None = None,
) -> list[Candidate]:
    """Model every layout; those that fit (with headroom) first, fastest first."""
    table = param_table(cfg)
    capacity = chip.hbm_bytes * HEADROOM
    out = []
    for layout in layouts:
        memory, time = model_layout(cfg, layout, chip, seq, global_batch, efficiency, table, lora)
        out.append(Candidate(layout, memory, time, capacity))
    return sorted(out, key=lambda c: (not c.fits, c.time.step_s if c.fits else c.memory.total))
