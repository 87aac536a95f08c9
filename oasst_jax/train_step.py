"""The one jitted train step (and the eval step), with explicit shardings.

``train_step(state, batch) -> (state, metrics)``: forward, loss and backward for
each micro-batch inside an on-device ``lax.scan`` (gradient accumulation), then
clipping and the AdamW update.  The state is donated; nothing syncs with the
host inside the step; metrics are device scalars the loop reads one step late.

State is a plain dict ``{step, params, opt_state}``; a LoRA run's (``model.lora_rank >
0``, ``oasst_jax/lora.py``) adds ``frozen``, the base weights, and its ``params`` are
only the adapters: gradients, optimizer state and fp32 masters exist for them alone.
The per-micro-batch loss is one seam, :func:`_microbatch_loss` (logits of the full
parameter tree -> loss terms).  Dropout randomness is
``fold_in(key(seed), step)`` then per micro-batch and (inside the scanned
layers) per layer, so a resumed run draws exactly the same masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from oasst_jax import lora, pipeline_parallel, sharding
from oasst_jax.loss import loss_sum_and_count, token_cross_entropy
from oasst_jax.model import Llama, abstract_params, init_rows


@dataclasses.dataclass(frozen=True)
class StepConfig:
    accumulation_steps: int
    micro_batch_size: int
    loss_normalization: str = "global_token_mean"
    seed: int = 0
    # > 1: the micro-batches flow through this many stages of a GPipe schedule
    # (oasst_jax/pipeline_parallel.py); the mesh's pipeline axis size.
    pipeline_stages: int = 1


def init_state(params: Any, tx: optax.GradientTransformation, frozen: Any = None) -> dict:
    """Step 0; ``frozen`` (a LoRA run's base) is kept beside the trained ``params``."""
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if frozen is not None:
        state["frozen"] = frozen
    return state


def model_params(params: Any, frozen: Any) -> Any:
    """The model's whole parameter tree: ``params`` alone, or a LoRA run's adapters merged
    into its frozen base (a restructuring; nothing is copied)."""
    return params if frozen is None else lora.merge(params, frozen)


def _microbatch_loss(
    model: Llama,
    params: Any,
    mb: dict,
    rng: jax.Array,
    dropout_rates: jax.Array,
    deterministic: bool,
    step_cfg: StepConfig,
):
    logits = model.apply(
        {"params": params},
        mb["inputs"],
        positions_BL=mb["positions"],
        segment_ids_BL=mb["segment_ids"],
        dropout_rates=dropout_rates,
        deterministic=deterministic,
        rngs={"dropout": rng},
    )
    return _loss_terms(logits, mb, step_cfg)


def _loss_terms(logits: jax.Array, mb: dict, step_cfg: StepConfig):
    """``(numerator, (denominator, loss tokens))`` of one micro-batch's logits."""
    nll = token_cross_entropy(logits, mb["targets"])
    num, den = loss_sum_and_count(
        nll,
        mb["weights"],
        normalization=step_cfg.loss_normalization,
        micro_batch_size=step_cfg.micro_batch_size,
    )
    return num, (den, jnp.sum(mb["weights"]))


def _pipelined_loss(
    model: Llama,
    params: Any,
    batch: dict,
    rng: jax.Array,
    dropout_rates: jax.Array,
    deterministic: bool,
    step_cfg: StepConfig,
    layer_specs: Any,
):
    """Summed loss terms of all micro-batches, the decoder run as a pipeline.

    The head and loss run per micro-batch in a checkpointed scan, so only one
    micro-batch's logits exist at a time (as in the unpipelined accumulation).
    """
    cfg = model.cfg
    hidden_MBLD = pipeline_parallel.pipeline_hidden(
        cfg,
        params,
        batch,
        rng,
        dropout_rates,
        stages=step_cfg.pipeline_stages,
        layer_specs=layer_specs,
        deterministic=deterministic,
    )

    @jax.checkpoint
    def head(x_BLD, mb):
        logits = model.apply({"params": params}, x_BLD, method=Llama.head)
        return _loss_terms(logits, mb, step_cfg)

    def micro(totals, xs):
        return jax.tree.map(jnp.add, totals, head(*xs)), None

    zero = jnp.float32(0)
    totals, _ = jax.lax.scan(micro, (zero, (zero, zero)), (hidden_MBLD, batch))
    return totals


def _pipeline_accumulate(
    model: Llama,
    step_cfg: StepConfig,
    dropout_rates: jax.Array,
    deterministic: bool,
    layer_specs: Any,
) -> Callable:
    """``(params, frozen, batch, rng) -> (grads, num, den, tokens)`` with all micro-batches
    differentiated at once through the pipeline schedule (with respect to ``params``)."""

    def loss(params, frozen, batch, rng):
        full = model_params(params, frozen)
        return _pipelined_loss(
            model, full, batch, rng, dropout_rates, deterministic, step_cfg, layer_specs
        )

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def accumulate(params: Any, frozen: Any, batch: dict, rng: jax.Array):
        (num, (den, tokens)), grads = grad_fn(params, frozen, batch, rng)
        return grads, num, den, tokens

    return accumulate


def _scan_accumulate(
    model: Llama, step_cfg: StepConfig, dropout_rates: jax.Array, deterministic: bool
) -> Callable:
    """``(params, frozen, batch, rng) -> (grads, num, den, tokens)`` summed over the
    micro-batches, one at a time in a ``lax.scan`` (so only one micro-batch's activations
    live at once); gradients with respect to ``params`` only."""
    loss_fn = partial(
        _microbatch_loss,
        model,
        dropout_rates=dropout_rates,
        deterministic=deterministic,
        step_cfg=step_cfg,
    )
    grad_fn = jax.value_and_grad(
        lambda params, frozen, mb, rng: loss_fn(model_params(params, frozen), mb, rng),
        has_aux=True,
    )

    def accumulate(params: Any, frozen: Any, batch: dict, rng: jax.Array):
        def micro(carry, xs):
            grads, num, den, tokens = carry
            mb, i = xs
            (n, (d, t)), g = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i))
            grads = jax.tree.map(jnp.add, grads, g)
            return (grads, num + n, den + d, tokens + t), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
        idx = jnp.arange(step_cfg.accumulation_steps)
        (grads, num, den, tokens), _ = jax.lax.scan(micro, init, (batch, idx))
        return grads, num, den, tokens

    return accumulate


def make_train_step(
    model: Llama,
    tx: optax.GradientTransformation,
    lr_schedule: Callable,
    step_cfg: StepConfig,
    dropout_rates: jax.Array,
    layer_specs: Any,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Build the (unjitted) step; ``batch`` holds :data:`oasst_jax.data.pipeline.BATCH_FIELDS`,
    each ``[accumulation, rows, length]``.

    ``layer_specs`` are the decoder's logical partition specs (the pipeline schedule
    lays its stage buffers out by them).
    """
    deterministic = not (bool(np.any(np.asarray(dropout_rates) > 0)) or model.cfg.lora_dropout > 0)
    if step_cfg.pipeline_stages > 1:
        accumulate = _pipeline_accumulate(
            model, step_cfg, dropout_rates, deterministic, layer_specs
        )
    else:
        accumulate = _scan_accumulate(model, step_cfg, dropout_rates, deterministic)

    def step_fn(state: dict, batch: dict) -> tuple[dict, dict]:
        params = state["params"]
        rng = jax.random.fold_in(jax.random.key(step_cfg.seed), state["step"])
        grads, num, den, tokens = accumulate(params, state.get("frozen"), batch, rng)
        scale = jnp.where(den > 0, 1.0 / jnp.maximum(den, 1e-9), 0.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        loss = num * scale
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {
            **state,  # a LoRA run's frozen base passes through
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": opt_state,
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_norm": optax.global_norm(jax.tree.map(jnp.subtract, new_params, params)),
            "param_norm": optax.global_norm(new_params),
            "lr": lr_schedule(state["step"]),
            "loss_tokens": tokens,
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        return new_state, metrics

    return step_fn


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """True when no floating-point leaf of ``tree`` holds NaN/Inf: one on-device reduction
    (each device checks its own shards), so only a boolean comes back to the host."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def make_eval_step(
    model: Llama, step_cfg: StepConfig, layer_specs: Any = None
) -> Callable[[Any, dict], tuple[jax.Array, jax.Array, jax.Array]]:
    """``(params, batch [rows, length]) -> (numerator, denominator, loss tokens)``.

    The loss terms of one micro-batch as the train step computes them (same
    ``loss_normalization`` and ``micro_batch_size``), so an evaluation that sums
    them over its micro-batches and divides normalises its loss as training does.
    With pipeline stages the batch goes through the schedule as one micro-batch:
    the plain scan over a stage-sharded layer stack would make XLA all-gather
    every layer onto every device (the whole model, for 70B).
    """
    cfg = model.cfg
    pipeline_stages = step_cfg.pipeline_stages

    def logits_fn(params: Any, batch: dict) -> jax.Array:
        if pipeline_stages == 1:
            return model.apply(
                {"params": params},
                batch["inputs"],
                positions_BL=batch["positions"],
                segment_ids_BL=batch["segment_ids"],
            )
        hidden_1BLD = pipeline_parallel.pipeline_hidden(
            cfg,
            params,
            jax.tree.map(lambda x: x[None], batch),
            jax.random.key(0),
            jnp.zeros((cfg.num_hidden_layers,), jnp.float32),
            stages=pipeline_stages,
            layer_specs=layer_specs,
            deterministic=True,
        )
        return model.apply({"params": params}, hidden_1BLD[0], method=Llama.head)

    def eval_fn(params: Any, batch: dict):
        num, (den, tokens) = _loss_terms(logits_fn(params, batch), batch, step_cfg)
        return num, den, tokens

    return eval_fn


@dataclasses.dataclass(frozen=True)
class CompiledTrainer:
    """Everything the loop (and the planner) needs: shardings and the jitted functions."""

    param_shardings: Any  # of the trained params (a LoRA run: the adapters)
    state_shardings: dict
    batch_sharding: NamedSharding  # [accumulation, rows, length]
    abstract_state: dict  # ShapeDtypeStructs carrying their shardings
    init_random: Callable[[jax.Array], dict]  # PRNG key -> fresh state
    # loaded weights (a LoRA run: the base, as ``abstract_base``) -> fresh optimizer, step 0
    init_from_params: Callable[[Any], dict]
    step: Callable[[dict, dict], tuple[dict, dict]]
    eval: Callable[[Any, dict], tuple[jax.Array, jax.Array, jax.Array]]  # make_eval_step
    # what ``eval`` takes: the state's whole model tree (a LoRA run: adapters + frozen base)
    eval_params: Callable[[dict], Any]
    # a LoRA run: the base weights ``load`` is read into (its dtype, its shardings), and
    # the random base of a run without ``load`` (PRNG key -> base); else None
    abstract_base: Any = None
    random_base: Callable[[jax.Array], Any] | None = None


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def build_trainer(
    model: Llama,
    tx: optax.GradientTransformation,
    lr_schedule: Callable,
    step_cfg: StepConfig,
    dropout_rates: jax.Array,
    mesh: Mesh,
) -> CompiledTrainer:
    """Shardings from the logical rules and the jitted init/step/eval functions.

    With ``model.cfg.lora_rank > 0`` the state is a LoRA run's: adapters trained, the
    base frozen in ``model.cfg.lora_base_dtype`` and sharded like its kernels.
    Call (and use the results) inside ``jax.set_mesh(mesh)`` so the model's
    activation constraints resolve against this mesh.
    """
    cfg = model.cfg
    boxed = abstract_params(model)
    layer_specs = nn.get_partition_spec(boxed)["decoder"]
    all_shard = sharding.param_shardings(mesh, boxed)
    tokens_shape = (init_rows(), 8)

    def init_params(key: jax.Array) -> Any:
        # tokens made inside the trace: an eager array would need a concrete device,
        # which an abstract (AOT, TPU-topology) mesh does not have
        return nn.meta.unbox(model.init(key, jnp.zeros(tokens_shape, jnp.int32))["params"])

    abstract_base = None
    if cfg.lora_rank:
        p_shard, base_shard = lora.split(all_shard)
        abs_adapters, abs_base = lora.split(nn.meta.unbox(boxed))
        base_dtype = jnp.float32 if cfg.lora_base_dtype == "float32" else jnp.bfloat16
        abstract_base = _with_shardings(
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, base_dtype), abs_base),
            base_shard,
        )
        abs_frozen = jax.eval_shape(partial(lora.freeze, cfg=cfg), abs_base)
        f_shard = sharding.frozen_shardings(base_shard, abs_frozen)
        abs_state = jax.eval_shape(lambda p, f: init_state(p, tx, f), abs_adapters, abs_frozen)
        s_shard = sharding.state_shardings(mesh, p_shard, abs_state, f_shard)
        eval_shard = lora.merge(p_shard, f_shard)

        def from_base(base: Any, key: jax.Array) -> dict:
            # only the adapters of a full init are used: XLA drops the rest of it
            adapters = lora.split(init_params(key))[0]
            return init_state(adapters, tx, lora.freeze(base, cfg))

        def random_base(key: jax.Array) -> Any:
            return jax.tree.map(lambda x: x.astype(base_dtype), lora.split(init_params(key))[1])

        def init_random(key: jax.Array) -> dict:
            return from_base(random_base(key), key)

        seed_key = jax.random.key(step_cfg.seed)
        from_base_jit = jax.jit(from_base, out_shardings=s_shard)

        def init_from_params(base: Any) -> dict:
            return from_base_jit(base, seed_key)

        def eval_params(state: dict) -> Any:
            return lora.merge(state["params"], state["frozen"])
    else:
        p_shard = eval_shard = all_shard
        abs_state = jax.eval_shape(lambda p: init_state(p, tx), nn.meta.unbox(boxed))
        s_shard = sharding.state_shardings(mesh, p_shard, abs_state)
        init_from_params = jax.jit(lambda p: init_state(p, tx), out_shardings=s_shard)

        def init_random(key: jax.Array) -> dict:
            return init_state(init_params(key), tx)

        def eval_params(state: dict) -> Any:
            return state["params"]

        random_base = None

    b_shard = sharding.batch_sharding(mesh, leading=(None,))
    step = jax.jit(
        make_train_step(model, tx, lr_schedule, step_cfg, dropout_rates, layer_specs),
        in_shardings=(s_shard, b_shard),
        out_shardings=(s_shard, None),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(
        make_eval_step(model, step_cfg, layer_specs),
        in_shardings=(eval_shard, sharding.batch_sharding(mesh)),
    )
    return CompiledTrainer(
        param_shardings=p_shard,
        state_shardings=s_shard,
        batch_sharding=b_shard,
        abstract_state=_with_shardings(abs_state, s_shard),
        init_random=jax.jit(init_random, out_shardings=s_shard),
        init_from_params=init_from_params,
        step=step,
        eval=eval_fn,
        eval_params=eval_params,
        abstract_base=abstract_base,
        random_base=None if random_base is None else jax.jit(random_base, out_shardings=base_shard),
    )
