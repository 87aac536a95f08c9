"""Pipeline parallelism: a GPipe schedule over the ``pipeline`` mesh axis, inside the jitted step.

Why this layout: parameters keep their ``[layers, ...]`` shape with ``layers``
sharded over ``pipeline`` in contiguous blocks, so checkpoints, optimizer state,
eval and the unpipelined step are unchanged.  Inside the step the stack is only
*viewed* as ``[stages, layers_per_stage, ...]``: a free reshape, because every
device already holds exactly its stage's block of layers.

The schedule (the shape of MaxText's pipeline; no host orchestration): a
per-stage activation buffer ``[stages, rows, length, embed]`` sharded over
``pipeline``.  Each of the ``m + p - 1`` iterations runs all stages at once (the
stage function ``vmap``-ed over the stage axis with ``spmd_axis_name``, so each
device runs only its own stage), then shifts the buffer one stage on
(``jnp.roll`` of the sharded axis, which XLA lowers to a collective permute) and
feeds the next micro-batch's embeddings into stage 0.  The last stage's output
of iteration ``t`` is micro-batch ``t - (p - 1)``; the other slots of the first
and last ``p - 1`` iterations are the bubble.

Memory: GPipe keeps all ``m`` micro-batches in flight, which for 70B would hold
every layer's activations of the whole global batch.  So when the model uses
rematerialisation, each iteration is checkpointed as a whole: the backward pass
keeps only the iteration's stage inputs (``[m + p - 1, rows, length, embed]``
per device) and recomputes the stage, with the layer's own remat policy inside.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from oasst_jax import sharding
from oasst_jax.model import DecoderStack, LlamaConfig, embed_tokens

# Logical axes of the rotating per-stage activation buffer.
STAGE_ACTIVATION = ("stage", "batch", "res_length", "act_embed")


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle share of a GPipe schedule: ``(p - 1) / (m + p - 1)``."""
    return (stages - 1) / (microbatches + stages - 1)


def _stage_spec(spec: PartitionSpec) -> tuple:
    """``('layers', *rest)`` of a scanned weight -> ``('stage', None, *rest)``."""
    return ("stage", None, *tuple(spec)[1:])


def stage_view(layer_params: Any, layer_specs: Any, stages: int) -> Any:
    """``[layers, ...]`` leaves -> ``[stages, layers_per_stage, ...]``, a stage per device group."""

    def view(w: Any, spec: PartitionSpec) -> Any:
        def one(x: jax.Array) -> jax.Array:
            return x.reshape(stages, x.shape[0] // stages, *x.shape[1:])

        if not isinstance(w, jax.Array):  # a LoRA run's quantized kernel: values + scales
            return jax.tree.map(one, w)
        return sharding.constrain(one(w), _stage_spec(spec))

    return jax.tree.map(
        lambda spec, w: view(w, spec),
        layer_specs,
        layer_params,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def pipeline_hidden(
    cfg: LlamaConfig,
    params: dict,
    batch: dict,
    rng: jax.Array,
    dropout_rates: jax.Array,
    *,
    stages: int,
    layer_specs: Any,
    deterministic: bool,
) -> jax.Array:
    """Decoder outputs ``[micro, rows, length, embed]`` (before the final norm).

    ``batch`` holds ``inputs``, ``positions`` and ``segment_ids`` as
    ``[micro, rows, length]``.  ``layer_specs`` are the logical PartitionSpecs of
    ``params['decoder']`` (``nn.get_partition_spec`` of the boxed parameters).
    Each (micro-batch, stage) pair gets its own dropout key, and ``nn.scan``
    splits it per layer, so masks stay independent per layer and micro-batch.
    """
    lps = sharding.layers_per_stage(cfg.num_hidden_layers, stages)
    micro = batch["inputs"].shape[0]
    stage_cfg = dataclasses.replace(cfg, num_hidden_layers=lps)
    stage_params = stage_view(params["decoder"], layer_specs, stages)
    rates = jnp.asarray(dropout_rates, jnp.float32).reshape(stages, lps)
    stage_ids = jnp.arange(stages)

    def run_stage(p, x_BLD, pos_BL, seg_BL, rates_l, key):
        return DecoderStack(stage_cfg).apply(
            {"params": p}, x_BLD, pos_BL, seg_BL, rates_l, deterministic, rngs={"dropout": key}
        )

    all_stages = jax.vmap(run_stage, spmd_axis_name=sharding.mesh_axes("stage") or None)

    def iteration(buffer_SBLD: jax.Array, t: jax.Array):
        mb_ids = jnp.clip(t - stage_ids, 0, micro - 1)  # micro-batch in each stage
        x0_BLD = embed_tokens(cfg, params["embedding"], batch["inputs"][jnp.minimum(t, micro - 1)])
        shifted = jnp.roll(buffer_SBLD, 1, axis=0)
        x_SBLD = jnp.where((stage_ids == 0)[:, None, None, None], x0_BLD[None], shifted)
        x_SBLD = sharding.constrain(x_SBLD, STAGE_ACTIVATION)
        keys = jax.vmap(lambda i, s: jax.random.fold_in(jax.random.fold_in(rng, i), s))(
            mb_ids, stage_ids
        )
        out_SBLD = all_stages(
            stage_params,
            x_SBLD,
            batch["positions"][mb_ids],
            batch["segment_ids"][mb_ids],
            rates,
            keys,
        )
        out_SBLD = sharding.constrain(out_SBLD, STAGE_ACTIVATION)
        return out_SBLD, out_SBLD[-1]

    if cfg.remat_policy != "none":
        iteration = jax.checkpoint(
            iteration, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False
        )
    rows, length = batch["inputs"].shape[1:]
    buffer = jnp.zeros((stages, rows, length, cfg.hidden_size), cfg.dtype)
    buffer = sharding.constrain(buffer, STAGE_ACTIVATION)
    _, last_TBLD = jax.lax.scan(iteration, buffer, jnp.arange(micro + stages - 1))
    return last_TBLD[stages - 1 :]
