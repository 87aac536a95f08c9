"""Step-time model: compute at a stated fraction of peak plus the main collectives.

* FLOPs: :meth:`oasst_jax.model.LlamaConfig.flops_per_token` (the trainer's MFU
  formula) x tokens per step.  Recompute adds hardware FLOPs (not model FLOPs):
  full remat one more forward (+2N per token), selective the attention forward.
* Compute: hardware FLOPs / (devices x peak x efficiency).
* Tensor parallel: 2 all-reduces of the ``[T, h]`` bf16 activations per layer
  forward and 2 backward (3 + 2 with full recompute), ring cost
  ``2 (t-1)/t x bytes / bw``, on the critical path (not overlapped).
* Context parallel (``sequence``): all-gather of k and v per layer, forward and backward.
* FSDP: all-gather of the bf16 weights for forward and again for backward and a
  reduce-scatter of the fp32 gradients, every micro-batch; data parallel: an
  all-reduce of the fp32 gradients (this trainer: every micro-batch, since the
  accumulator is replicated over ``data``; Megatron: once per step).  XLA
  overlaps these with compute, so only their excess over compute is exposed.
* Pipeline (Megatron 1F1B, and this trainer's GPipe schedule): bubble
  ``(p-1)/(m+p-1)`` of the step, plus the activation sends between stages.
Bandwidths come from :mod:`oasst_jax.planner.chips`: an axis whose devices fit
in one NVLink node uses NVLink, otherwise InfiniBand; every TPU axis uses ICI.
"""

from __future__ import annotations

import dataclasses
import math

from oasst_jax.model import LlamaConfig
from oasst_jax.planner.chips import Chip
from oasst_jax.planner.memory import Layout
from oasst_jax.sharding import DATA, FSDP, MESH_AXES, PIPELINE, SEQUENCE, TENSOR

EFFICIENCY = 0.6  # matmul FLOP/s reached on the chip, a fraction of peak (stated in the output)


@dataclasses.dataclass(frozen=True)
class TimeEstimate:
    flops_per_step: float  # model FLOPs (the MFU numerator)
    compute_s: float
    tp_s: float
    cp_s: float
    fsdp_dp_exposed_s: float
    pp_send_s: float
    bubble_s: float
    step_s: float
    mfu: float

    def terms(self) -> dict[str, float]:
        return {
            "compute": self.compute_s,
            "tensor-parallel collectives": self.tp_s,
            "context-parallel k/v gathers": self.cp_s,
            "FSDP/DP collectives (exposed)": self.fsdp_dp_exposed_s,
            "pipeline sends": self.pp_send_s,
            "pipeline bubble": self.bubble_s,
        }

    def dominant(self) -> str:
        terms = sorted(self.terms().items(), key=lambda kv: -kv[1])
        return ", ".join(f"{k} {v / self.step_s:.0%}" for k, v in terms if v > 0.01 * self.step_s)


def axis_bandwidth(chip: Chip, mesh: dict[str, int], axis: str) -> float:
    """Bytes/s per direction for a ring over ``axis`` (later mesh axes are innermost)."""
    inner = math.prod(mesh[a] for a in MESH_AXES[MESH_AXES.index(axis) + 1 :])
    return chip.intra_bw if inner * mesh[axis] <= chip.node_size else chip.inter_bw


def ring(bytes_: float, n: int, bw: float, all_reduce: bool = False) -> float:
    """Ring all-gather / reduce-scatter (or all-reduce = both) of ``bytes_`` (full size)."""
    if n <= 1:
        return 0.0
    return (2 if all_reduce else 1) * (n - 1) / n * bytes_ / bw


def hardware_flops_per_token(
    cfg: LlamaConfig, seq: int, remat: str, frozen_base: bool = False
) -> float:
    """FLOPs the step executes per token; a frozen (LoRA) base skips its weight
    gradients: ``4N`` instead of ``6N`` for the matmul weights."""
    model = cfg.flops_per_token(seq)
    attn = 12 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_size
    if frozen_base:
        model = attn + (model - attn) * 4 / 6
    if remat == "full":
        return model + (model - attn) / 3 + attn / 3
    if remat == "selective":
        return model + attn / 3
    return model


def estimate_time(
    cfg: LlamaConfig,
    layout: Layout,
    chip: Chip,
    seq: int,
    global_batch: int,
    params_per_device: float,
    framework: str = "jax",
    efficiency: float = EFFICIENCY,
    frozen_base_bytes: float | None = None,
) -> TimeEstimate:
    """Step time of ``layout`` (see the module docstring for each term).

    ``frozen_base_bytes``: LoRA -- the base is frozen and stored at this many bytes per
    parameter (:mod:`oasst_jax.planner.lora`): no weight gradients, FSDP all-gathers the
    stored base for the forward and the backward, nothing is reduced but the adapters'
    (neglected).  The MFU numerator stays the trainer's ``6N`` formula.
    """
    frozen = frozen_base_bytes is not None
    m = dict(layout.mesh)
    n = layout.devices
    t, sp, p, f, d = (m[a] for a in (TENSOR, SEQUENCE, PIPELINE, FSDP, DATA))
    micro = layout.accumulation(global_batch)
    tokens_step = global_batch * seq
    flops = cfg.flops_per_token(seq) * tokens_step
    megatron = framework == "megatron"
    compute = hardware_flops_per_token(cfg, seq, layout.remat, frozen) * tokens_step
    compute /= n * chip.peak_flops * efficiency
    tokens_dev = layout.micro_batch_size * seq / sp  # per device per micro-batch
    act = 2 * tokens_dev * cfg.hidden_size  # one bf16 [T, h] activation
    layers = cfg.num_hidden_layers / p
    reduces = 6 if layout.remat == "full" else 4
    tp = micro * layers * reduces * ring(act, t, axis_bandwidth(chip, m, TENSOR), True)
    kv = 2 * 2 * tokens_dev * sp * cfg.num_key_value_heads * cfg.head_size / t
    cp = micro * layers * 2 * ring(kv, sp, axis_bandwidth(chip, m, SEQUENCE))
    stage_bw = axis_bandwidth(chip, m, PIPELINE)
    if megatron:
        exposed = ring(4 * params_per_device, d, axis_bandwidth(chip, m, DATA), True)
        send = micro * 2 * act / t / stage_bw if p > 1 else 0.0
    else:
        if frozen:  # all-gathers of the stored base only
            gathers = 2 * frozen_base_bytes * params_per_device * f
            per_micro = ring(gathers, f, axis_bandwidth(chip, m, FSDP))
        else:
            per_micro = ring(8 * params_per_device * f, f, axis_bandwidth(chip, m, FSDP))
            per_micro += ring(4 * params_per_device, d, axis_bandwidth(chip, m, DATA), True)
        exposed = micro * max(0.0, per_micro - compute / micro)
        # GPipe: the stage buffer (and its gradient) rotates once per iteration
        send = 2 * (micro + p - 1) * act / t / stage_bw if p > 1 else 0.0
    busy = compute + tp + cp + send
    bubble = busy * (p - 1) / micro  # = total x (p-1)/(m+p-1)
    step = compute + tp + cp + exposed + send + bubble
    return TimeEstimate(
        flops_per_step=flops,
        compute_s=compute,
        tp_s=tp,
        cp_s=cp,
        fsdp_dp_exposed_s=exposed,
        pp_send_s=send,
        bubble_s=bubble,
        step_s=step,
        mfu=flops / (step * n * chip.peak_flops),
    )
