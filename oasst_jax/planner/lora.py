"""The planner's LoRA / QLoRA terms: a frozen base stored in its own dtype plus small
trainable adapters, so ``plan`` answers "does 70B QLoRA fit one 8-GPU host / a v5p-8?".

Per device (same logical rules as full training, :mod:`oasst_jax.sharding`):

* the frozen base: the LoRA target projections in ``base_dtype`` -- bf16 2 bytes,
  int8 1 byte and nf4 half a byte, each plus one fp32 scale per 64 inputs
  (:func:`oasst_jax.lora.quantize_kernel`'s blocks) -- and every other weight (embedding,
  LM head, norms, untargeted projections) in bf16; no fp32 master, no gradient, no
  optimizer state for any of it;
* adapters ``A [in, r]`` (rank replicated, input axes as the base kernel's input) and
  ``B [r, out]`` (output axes as the base kernel's output) per target and layer: fp32
  master, AdamW ``mu``/``nu``, the accumulated and the fresh gradient, the update tree,
  and the bf16 casts -- tiny next to the base;
* activations, one layer's recompute, attention workspace and logits as for full
  training (:func:`oasst_jax.planner.memory.activation_terms`): the backward still
  carries activation gradients through every frozen layer; with ``selective`` or
  ``none`` remat each adapter's ``B`` output is a saved dot output too, beside its base
  projection's, where the backward needs the sum (every target but ``down_proj``, whose
  output only joins the residual add): ``2T`` x its output width per layer (measured
  against XLA's GPU compiler on Llama-2-7B, rank 64, all targets: within 2%);
* a quantized base adds one layer's targets dequantized to bf16 (the scan dequantizes
  a layer at a time).

Time: the frozen base needs no weight gradients, so its matmuls cost ``4N`` per token
instead of ``6N``; FSDP only all-gathers the base (in its storage dtype) for the
forward and the backward, with no gradient reduce-scatter; data parallelism
all-reduces only the adapters' gradients (neglected).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from oasst_jax import sharding
from oasst_jax.model import LlamaConfig
from oasst_jax.planner.memory import (
    Layout,
    MemoryEstimate,
    activation_terms,
    param_table,
    residual_split,
    sharded_elements,
)

# PEFT's names for Llama's projections (the config's ``lora.targets``)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BLOCK = 64
BASE_BYTES = {"bfloat16": 2.0, "int8": 1.0 + 4.0 / NF4_BLOCK, "nf4": 0.5 + 4.0 / NF4_BLOCK}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    targets: tuple[str, ...]
    base_dtype: str

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"lora.targets: unknown {unknown}; choose from {list(TARGETS)}")
        if self.base_dtype not in BASE_BYTES:
            raise ValueError(f"lora.base_dtype: {self.base_dtype!r} not in {list(BASE_BYTES)}")

    @classmethod
    def from_config(cls, cfg) -> LoraSpec | None:
        """The train config's ``lora`` section, or None when LoRA is off (rank 0 or absent)."""
        lora = cfg.get("lora") if hasattr(cfg, "get") else None
        if lora is None or not lora.get("rank", 0):
            return None
        targets = lora.targets
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return cls(int(lora.rank), tuple(targets), str(lora.get("base_dtype", "bfloat16")))

    def bytes_per_base_param(self, cfg: LlamaConfig, mesh, table: Sequence) -> float:
        """Mean stored bytes per frozen parameter on a device (targets in ``base_dtype``,
        the rest bf16): what FSDP all-gathers per parameter."""
        everything = sharded_elements(base_only(table), mesh)
        targets = sharded_elements(tables(cfg, self)[0], mesh)
        return (targets * BASE_BYTES[self.base_dtype] + (everything - targets) * 2) / everything


def base_only(table: Sequence) -> list:
    """A parameter table without adapter entries (a LoRA model's table has them, named
    by the ``lora_rank`` logical axis)."""
    return [(shape, names) for shape, names in table if "lora_rank" not in names]


Names = tuple[str, ...]
Dims = tuple[int, ...]


def projection_shapes(cfg: LlamaConfig) -> dict[str, tuple[Dims, Names, Dims, Names]]:
    """PEFT name -> (input dims, their logical names, output dims, their names) of one
    layer's kernel, as :mod:`oasst_jax.model` lays them out."""
    d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_size
    h, k = cfg.num_attention_heads, cfg.num_key_value_heads
    kv = ((d,), ("embed",), (k, dh), ("kv_heads", "head_dim"))
    return {
        "q_proj": ((d,), ("embed",), (h, dh), ("heads", "head_dim")),
        "k_proj": kv,
        "v_proj": kv,
        "o_proj": ((h, dh), ("heads", "head_dim"), (d,), ("embed",)),
        "gate_proj": ((d,), ("embed",), (f,), ("mlp",)),
        "up_proj": ((d,), ("embed",), (f,), ("mlp",)),
        "down_proj": ((f,), ("mlp",), (d,), ("embed",)),
    }


def tables(cfg: LlamaConfig, spec: LoraSpec) -> tuple[list, list]:
    """(base target kernels, adapters) as ``(shape, logical names)`` tables, layer axis first,
    for :func:`oasst_jax.planner.memory.sharded_elements`."""
    layers, shapes = cfg.num_hidden_layers, projection_shapes(cfg)
    base, adapters = [], []
    for name in spec.targets:
        in_dims, in_names, out_dims, out_names = shapes[name]
        base.append(((layers, *in_dims, *out_dims), ("layers", *in_names, *out_names)))
        adapters.append(((layers, *in_dims, spec.rank), ("layers", *in_names, None)))
        adapters.append(((layers, spec.rank, *out_dims), ("layers", None, *out_names)))
    return base, adapters


def adapter_params(cfg: LlamaConfig, spec: LoraSpec) -> int:
    """Trainable parameters (all devices): ``r (in + out)`` per target and layer."""
    _, adapters = tables(cfg, spec)
    total = 0
    for shape, _ in adapters:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def adapter_outputs_per_token(cfg: LlamaConfig, spec: LoraSpec, t: int, res: int) -> float:
    """Bytes per token per layer of the adapters' saved ``B`` outputs (bf16; module
    docstring): head and MLP widths split ``t`` ways, the attention output ``res`` ways."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    k = cfg.num_key_value_heads * cfg.head_size
    width = {"q_proj": h / t, "k_proj": k / t, "v_proj": k / t, "o_proj": h / res}
    width.update(gate_proj=f / t, up_proj=f / t)
    return 2 * sum(width.get(target, 0.0) for target in spec.targets)


def lora_memory(
    cfg: LlamaConfig,
    layout: Layout,
    seq: int,
    global_batch: int,
    spec: LoraSpec,
    table: Sequence | None = None,
    platform: str = "tpu",
) -> MemoryEstimate:
    """Per-device bytes of a LoRA / QLoRA step on ``layout`` (module docstring)."""
    table = param_table(cfg) if table is None else table
    base_t, adapters_t = tables(cfg, spec)
    everything = sharded_elements(base_only(table), layout.mesh)
    targets = sharded_elements(base_t, layout.mesh)
    adapters = sharded_elements(adapters_t, layout.mesh)
    frozen = everything * spec.bytes_per_base_param(cfg, layout.mesh, table)
    m = layout.mesh
    saved = adapter_outputs_per_token(
        cfg, spec, m[sharding.TENSOR] * m[sharding.SEQUENCE], residual_split(m)
    )
    acts, transient = activation_terms(cfg, layout, seq, global_batch, platform, saved)
    layers_here = cfg.num_hidden_layers / layout.mesh[sharding.PIPELINE]
    dequant = 2 * targets / layers_here if spec.base_dtype != "bfloat16" else 0.0
    return MemoryEstimate(
        params=frozen + adapters * 4,
        optimizer=2 * adapters * 4,
        grads=2 * adapters * 4,
        activations=acts,
        transient=transient + dequant + adapters * (4 + 2),
        notes=(
            f"frozen base {frozen / 2**30:.2f} GiB ({spec.base_dtype} targets "
            f"{', '.join(spec.targets)}; the rest bf16), adapters rank {spec.rank}: "
            f"{adapter_params(cfg, spec) / 1e6:.1f}M trainable parameters",
        ),
    )
