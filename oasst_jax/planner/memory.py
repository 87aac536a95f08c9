"""Analytic per-device memory: parameters, optimizer, gradients, activations.

Two programs are modelled, because the planner answers for both:

``framework="jax"`` -- *this* trainer's jitted step, for the TPU and the GPU compiler.
  * params / optimizer / gradients: every parameter's shard from the logical
    rules (:mod:`oasst_jax.sharding`) -- fp32 master weights, AdamW ``mu`` and
    ``nu`` in fp32, and two fp32 gradient-sized trees alive at once (inside the
    accumulation scan the carry and the micro-batch's fresh gradient; XLA:GPU's
    buffer assignment shows two even for a single micro-batch).
  * activations per layer and micro-batch, for the remat policies of
    :func:`oasst_jax.model.remat_policy`, with ``T`` tokens per device
    (rows / (data*fsdp), length / sequence), ``t`` the tensor size, ``h``
    hidden, ``k`` = kv_heads*head_dim, ``f`` mlp -- the residuals jax's
    autodiff keeps, read off XLA's GPU buffer assignment (bf16 unless fp32):
      - ``full``: the scanned layer input only, ``2Th/r``, where ``r`` is how
        many ways the rules split the residual stream (``res_length``: Megatron
        sequence parallelism over sequence x tensor);
      - ``selective`` (dots without batch dims saved, when the backward needs
        them): the layer input and the attention output projection (``2 x 2Th/r``)
        plus q, k, v, gate, up (``2T(h + 2k + 2f)/t``); the MLP's down projection
        output is needed by nothing and not kept;
      - ``none``: every residual: ``20Th/r`` (bf16 and fp32 copies of the norms'
        inputs and outputs, the residual sums) plus ``T(4h + 6k + 12f)/t`` (q and
        RoPE'd q, k and v with their RoPE'd copies, six ``f``-wide SwiGLU
        tensors), and the XLA attention's probabilities (fp32 and bf16,
        ``6 x heads/t x L`` per token).
    Without pipelining every layer's residuals are alive at the start of the
    backward pass.  With ``pipeline = p`` (GPipe, :mod:`oasst_jax.pipeline_parallel`)
    each of the ``m + p - 1`` checkpointed iterations keeps its stage input and
    the last stage's output (``2 x 2Th/r`` each) and the backward recomputes one
    iteration's ``L/p`` layers with the layer policy.
  * transients: the backward of one layer recomputes its forward (the
    ``none`` set for one layer), the XLA attention's fp32 ``[rows, heads/t, L, L]``
    scores/probabilities/gradient (3 copies; the flash kernels -- ``pallas``, which the
    TPU-topology compile builds as Mosaic and the GPU one as Triton, and cuDNN --
    need none), and the fp32 logits, their softmax and gradient (3 x ``rows*L*V/t*4``).
    The compilers differ here (``platform``):
      - TPU: the terms add up, and two more were found by comparing with the TPU
        compiler's figures: XLA hoists the per-layer fp32 -> bf16 weight casts out
        of the layer scan, so a bf16 copy of the device's weights (2 bytes/param)
        lives through the step, and the AdamW update tree (4 bytes/param) is
        materialised before it is applied (``apply_if_finite`` selects between old
        and new state).  Cross-check (Llama-2-70B, v5p-32, layouts that compile):
        within -10%..+5%.  When a layout does not fit, the TPU compiler's
        "required" figure is larger than a fitted program's peak (it gives up
        before its memory-pressure passes), so expect the model to read ~20%
        below an out-of-memory report.
      - GPU: one fp32 buffer serves the logits, their softmax and gradient in
        turn, beside a one-byte ``[rows, L, V]`` mask (1.25 fp32 copies); they are
        freed before the layers' backward begins, so the transient is the larger
        of the logits and one layer's recompute; the weights are cast to bf16 a
        layer at a time inside the scan (no hoisted copy) and the update tree is
        the second gradient-sized tree. Cross-check against XLA's GPU compiler for abstract
        H100s (``benchmarks/plan.py --gpu-table``, docs/planning-and-performance.md):
        TinyLlama-1.1B with each remat policy, Llama-2-7B FSDP 8 and LoRA, Llama-2-70B QLoRA
        FSDP 8 and TP 8 x PP 4 on 4 x 8 GPUs: within 6%. Not modelled yet: with context
        parallelism (``sequence > 1``) XLA:GPU builds each device's logits over the whole
        sequence, in about three fp32 copies, so a small fsdp 2 x sequence 2 x tensor 2 step
        (512 wide, vocab 32000) reads -58%; gathered FSDP weights are left out too (-12.5%
        on the same model at FSDP 8).

``framework="megatron"`` -- the model card's run (Megatron-LLM, GPUs), after
  Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models".  Their per-layer activation bytes with tensor + sequence
  parallelism are ``sbh/t * (34 + 5as/h)``; selective recompute drops the
  ``5as/h`` softmax term, full recompute keeps only the layer input ``2sbh/t``.
  The ``34`` is GPT's (MHA, 4h GeLU MLP, LayerNorm, dropout); re-derived term by
  term for Llama (GQA, SwiGLU, RMSNorm, bytes per token, all divided by ``t``):
  norm inputs ``2 x 2h``; attention: QKV input ``2h``, q ``2h``, k and v
  ``2 x 2k`` (GQA: kv heads only), output-projection input ``2h``; MLP: fc1
  input ``2h``, the fused gate|up output that SwiGLU saves ``4f``, SwiGLU
  output ``2f``; dropout masks ``2 x h`` only when hidden dropout > 0.  For 70B
  (k = h/8, f = 3.5h) that is ``33.5h`` (``35.5h`` with dropout) vs GPT's 34h.
  The flash kernel keeps no ``s x s`` tensors.  Non-interleaved 1F1B keeps ``p``
  micro-batches in flight on the first stage, so the first stage stores
  ``L/p x p`` layers' worth; the last stage adds the fp32 logits/loss buffer
  ``4sb(h+v)/t``.  State per parameter: bf16 weight 2 + fp32 main gradient 4
  (Megatron accumulates bf16 gradients in fp32) + fp32 master 4 + Adam 8 = 18
  bytes, split over ``t x p`` (no distributed optimizer: not split over data).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
from flax import linen as nn

from oasst_jax import sharding
from oasst_jax.model import Llama, LlamaConfig, abstract_params

GIB = 2**30
ATTN_COPIES = 3  # XLA attention: fp32 scores, probabilities, and their gradient
LOGIT_COPIES = 3  # fp32 logits, softmax, gradient of the logits
GPU_LOGIT_COPIES = 1.25  # XLA:GPU: one fp32 buffer reused, plus a bool [rows, L, V] mask
ATTN_SAVED_BYTES = 6  # remat none: fp32 softmax output + its bf16 cast, per score


@dataclasses.dataclass(frozen=True)
class Layout:
    """One candidate: mesh sizes (all five axes, resolved: :func:`sharding.resolve_mesh`),
    micro batch (rows per data replica), remat."""

    mesh: Mapping[str, int]
    micro_batch_size: int
    remat: str

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def data_parallel(self) -> int:
        return sharding.axis_size(self.mesh, "batch")

    def accumulation(self, global_batch: int) -> int:
        return global_batch // (self.micro_batch_size * self.data_parallel)

    def overrides(self) -> list[str]:
        """The ``--config.*`` flags that select this layout."""
        flags = [f"--config.mesh.{a}={s}" for a, s in self.mesh.items()]
        return [
            *flags,
            f"--config.micro_batch_size={self.micro_batch_size}",
            f"--config.model.remat_policy={self.remat}",
        ]

    def label(self) -> str:
        axes = "x".join(f"{a[:2]}{s}" for a, s in self.mesh.items() if s > 1) or "1"
        return f"{axes} mb{self.micro_batch_size} {self.remat}"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device (the worst device: first/last pipeline stage for Megatron)."""

    params: float
    optimizer: float
    grads: float
    activations: float  # saved for the backward pass, all layers and in-flight micro-batches
    transient: float  # one layer's recompute, attention workspace, logits/loss buffer
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> float:
        return self.params + self.optimizer + self.grads + self.activations + self.transient


def param_table(cfg: LlamaConfig) -> list[tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """(shape, logical axis names) of every parameter, traced abstractly (nothing allocated)."""
    boxed = abstract_params(Llama(cfg))
    specs = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    return [
        (tuple(s.shape), tuple(spec))
        for s, spec in zip(
            jax.tree.leaves(shapes),
            jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
            strict=True,
        )
    ]


def axis_size(names: str | tuple[str, ...] | None, mesh: Mapping[str, int]) -> int:
    if names is None:
        return 1
    names = (names,) if isinstance(names, str) else names
    return math.prod(mesh.get(n, 1) for n in names)


def sharded_elements(table, mesh: Mapping[str, int]) -> float:
    """Elements per device: each dim divided (rounded up) by the mesh axes its rule names."""
    total = 0
    for shape, names in table:
        spec = sharding.logical_spec(names)
        total += math.prod(-(-d // axis_size(a, mesh)) for d, a in zip(shape, spec, strict=False))
    return float(total)


def residual_split(mesh: Mapping[str, int]) -> int:
    """How many ways the rules split a residual-stream token: the ``res_length`` rule
    (Megatron sequence parallelism: sequence x tensor) or, without it, ``length``."""
    for name in ("res_length", "length"):
        spec = sharding.logical_spec((name,))[0]
        if spec is not None or name == "length":
            return axis_size(spec, mesh)
    return 1


def activation_bytes_per_token(cfg: LlamaConfig, remat: str, t: int, res: int) -> float:
    """This trainer's saved bytes per token per layer, per the docstring.

    Per token of the *unsharded* micro-batch on this device's rows: residual
    stream terms divide by ``res`` (see :func:`residual_split`), head and MLP
    terms by ``sequence x tensor`` -- the caller passes ``t`` as that product.
    """
    h, f = cfg.hidden_size, cfg.intermediate_size
    k = cfg.num_key_value_heads * cfg.head_size
    if remat == "full":
        return 2 * h / res
    if remat == "selective":
        return 2 * (2 * h / res + (h + 2 * k + 2 * f) / t)
    return 20 * h / res + (4 * h + 6 * k + 12 * f) / t


def activation_terms(
    cfg: LlamaConfig,
    layout: Layout,
    seq: int,
    global_batch: int,
    platform: str = "tpu",
    extra_per_token: float = 0.0,
) -> tuple[float, float]:
    """``(saved activations, transients)`` bytes per device of one step: what does not
    depend on which parameters are trained (so LoRA, :mod:`oasst_jax.planner.lora`,
    shares it, adding its adapters' saved outputs as ``extra_per_token`` per layer).
    Transients here: one layer's recompute, XLA attention, logits (``platform``: how the
    compiler overlaps them, module docstring)."""
    m = layout.mesh
    t, sp, p = m[sharding.TENSOR], m[sharding.SEQUENCE], m[sharding.PIPELINE]
    rows = layout.micro_batch_size  # rows per data replica = rows per device
    tokens = rows * seq
    res = residual_split(m)
    per_token = activation_bytes_per_token(cfg, layout.remat, t * sp, res)
    per_layer = (per_token + (extra_per_token if layout.remat != "full" else 0.0)) * tokens
    heads = -(-cfg.num_attention_heads // t)
    xla_attention = cfg.attention_impl == "xla"  # the flash kernels keep no L x L tensor
    if layout.remat == "none" and xla_attention:  # fp32 + bf16 probabilities per layer
        per_layer += ATTN_SAVED_BYTES * rows * heads * (seq / sp) * seq
    if p > 1:  # GPipe: stage inputs + last-stage outputs per iteration, one stage recomputed
        iterations = layout.accumulation(global_batch) + p - 1
        acts = 2 * iterations * 2 * cfg.hidden_size * tokens / res
        acts += per_layer * cfg.num_hidden_layers / p
    else:
        acts = per_layer * cfg.num_hidden_layers
    recompute = activation_bytes_per_token(cfg, "none", t * sp, res) * tokens
    attn = 0.0
    if xla_attention:
        attn = ATTN_COPIES * rows * heads * (seq / sp) * seq * 4
    logits = rows * (seq / sp) * cfg.padded_vocab_size / t * 4
    if platform == "gpu":
        return acts, max(recompute, GPU_LOGIT_COPIES * logits) + attn
    return acts, recompute + attn + LOGIT_COPIES * logits


def jax_memory(
    cfg: LlamaConfig,
    layout: Layout,
    seq: int,
    global_batch: int,
    table=None,
    platform: str = "tpu",
) -> MemoryEstimate:
    """This trainer's step on ``layout`` compiled for ``platform`` (module docstring)."""
    table = param_table(cfg) if table is None else table
    n = sharded_elements(table, layout.mesh)
    pbytes = 4 if cfg.param_dtype == "float32" else 2
    acts, transient = activation_terms(cfg, layout, seq, global_batch, platform)
    if platform != "gpu":  # the TPU compiler's weight-cast copy and update tree
        cast = n * 2 if cfg.dtype == "bfloat16" and pbytes == 4 else 0.0
        transient += cast + n * 4
    return MemoryEstimate(
        params=n * pbytes,
        optimizer=2 * n * pbytes,
        grads=2 * n * 4,
        activations=acts,
        transient=transient,
    )


def megatron_param_counts(cfg: LlamaConfig, t: int, p: int) -> tuple[float, float]:
    """Parameters per GPU on the (first, last) pipeline stage: layers/p split over t,
    plus the embedding (first) or LM head + final norm (last), vocab-parallel."""
    layers = cfg.num_params(include_embedding=False) - cfg.hidden_size
    per_stage = layers / p / t
    vocab = cfg.padded_vocab_size * cfg.hidden_size / t
    return per_stage + vocab, per_stage + vocab + cfg.hidden_size


def megatron_bytes_per_token(cfg: LlamaConfig, remat: str, dropout: bool, seq: int) -> float:
    """Korthikanti et al.'s per-layer activation bytes per token, re-derived for Llama
    (before dividing by ``t``): ``33.5h`` for 70B selective, ``2h`` full recompute."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    k = cfg.num_key_value_heads * cfg.head_size
    if remat == "full":
        return 2 * h
    norms = 2 * 2 * h
    attention = 2 * h + 2 * h + 2 * 2 * k + 2 * h
    mlp = 2 * h + 4 * f + 2 * f
    masks = 2 * h if dropout else 0
    extra = 0.0
    if remat == "none" and cfg.attention_impl != "pallas":  # softmax terms: 5as bytes/token
        extra = 5.0 * cfg.num_attention_heads * seq
    return norms + attention + mlp + masks + extra


def megatron_memory(
    cfg: LlamaConfig, layout: Layout, seq: int, global_batch: int, dropout: bool = False
) -> MemoryEstimate:
    """Megatron-LLM with TP + SP + 1F1B PP and no distributed optimizer (module docstring)."""
    t, p = layout.mesh[sharding.TENSOR], layout.mesh[sharding.PIPELINE]
    b = layout.micro_batch_size
    first, last = megatron_param_counts(cfg, t, p)
    per_layer = megatron_bytes_per_token(cfg, layout.remat, dropout, seq) * seq * b / t
    layers = cfg.num_hidden_layers / p
    in_flight = min(p, layout.accumulation(global_batch))
    h, v = cfg.hidden_size, cfg.padded_vocab_size
    stage_first = first * 18 + per_layer * layers * in_flight
    logits = 4 * seq * b * (h + v) / t
    stage_last = last * 18 + per_layer * layers + logits
    worst_first = stage_first >= stage_last
    n = first if worst_first else last
    return MemoryEstimate(
        params=n * 2,
        optimizer=n * 12,
        grads=n * 4,
        activations=per_layer * layers * (in_flight if worst_first else 1),
        transient=0.0 if worst_first else logits,
        notes=(
            f"per layer {per_layer / 2**20:.0f} MiB x {layers:g} layers x "
            f"{in_flight if worst_first else 1} micro-batches in flight "
            f"({'first' if worst_first else 'last'} stage is the fuller one)",
        ),
    )
