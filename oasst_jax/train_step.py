"""The one jitted train step (and the eval step), with explicit shardings.

``train_step(state, batch) -> (state, metrics)``: forward, loss and backward for
each micro-batch inside an on-device ``lax.scan`` (gradient accumulation), then
clipping and the AdamW update.  The state is donated; nothing syncs with the
host inside the step; metrics are device scalars the loop reads one step late.

State is a plain dict ``{step, params, opt_state}``; a LoRA run's (``model.lora_rank >
0``, ``oasst_jax/lora.py``) adds ``frozen``, the base weights, and its ``params`` are
only the adapters (and a reward model's score head): gradients, optimizer state and fp32
masters exist for them alone.  The per-micro-batch loss is one seam,
:func:`oasst_jax.objectives.objective_terms` (``sft``, ``rm`` or ``dpo``, by
``StepConfig.objective``): the decoder outputs come from the scanned layers or, with
pipeline stages, from the last stage of the GPipe schedule (a DPO reference's through the
same schedule), so every objective runs on every mesh axis.  Its ``sums`` are additive over
micro-batches, so accumulation divides once per step and weighs every token / prompt / pair of the
global batch equally.  A DPO run's reference log-probs come with the batch
(``reference_logps``, precomputed) or from reference weights: a LoRA run's frozen base
(adapters off), else the state's ``reference`` (the load= weights, never trained).
Dropout randomness is ``fold_in(key(seed), step)`` then per micro-batch and (inside the scanned
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

from oasst_jax import lora, objectives, pipeline_parallel, sharding
from oasst_jax.model import Llama, abstract_params, init_rows
from oasst_jax.objectives import StepConfig, batch_shardings, finish_metrics


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
    reference: Any = None,
):
    """``(numerator, sums)`` of one micro-batch under ``step_cfg.objective`` (module doc);
    ``reference``: an on-the-fly DPO reference's parameter tree (no gradient flows to it)."""
    x_BLD = objectives.trunk(model, params, mb, rng, dropout_rates, deterministic)
    ref_x_BLD = None
    if step_cfg.on_the_fly_reference:
        reference = jax.lax.stop_gradient(reference)
        zero = jnp.zeros((model.cfg.num_hidden_layers,), jnp.float32)
        ref_x_BLD = objectives.trunk(model, reference, mb, rng, zero, True)
    return objectives.objective_terms(model, params, x_BLD, mb, step_cfg, reference, ref_x_BLD)


def _pipelined_loss(
    model: Llama,
    params: Any,
    batch: dict,
    rng: jax.Array,
    dropout_rates: jax.Array,
    deterministic: bool,
    step_cfg: StepConfig,
    layer_specs: Any,
    reference: Any = None,
):
    """Summed loss terms of all micro-batches, the decoder run as a pipeline (an
    on-the-fly DPO reference through the same schedule, without dropout or gradient).

    The objective's tail (:func:`objectives.objective_terms`) runs per micro-batch in a
    checkpointed scan, so only one micro-batch's logits exist at a time (as in the
    unpipelined accumulation).
    """
    cfg = model.cfg
    run = partial(pipeline_parallel.pipeline_hidden, cfg, stages=step_cfg.pipeline_stages,
                  layer_specs=layer_specs)  # fmt: skip
    hidden_MBLD = run(params, batch, rng, dropout_rates, deterministic=deterministic)
    ref_hidden_MBLD = None
    if step_cfg.on_the_fly_reference:
        reference = jax.lax.stop_gradient(reference)
        zero = jnp.zeros((cfg.num_hidden_layers,), jnp.float32)
        ref_hidden_MBLD = run(reference, batch, rng, zero, deterministic=True)

    @jax.checkpoint
    def tail(x_BLD, ref_x_BLD, mb):
        return objectives.objective_terms(model, params, x_BLD, mb, step_cfg, reference, ref_x_BLD)

    def micro(totals, xs):
        return jax.tree.map(jnp.add, totals, tail(*xs)), None

    xs = (hidden_MBLD, ref_hidden_MBLD, batch)
    shapes = jax.eval_shape(tail, *jax.tree.map(lambda x: x[0], xs))
    init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    totals, _ = jax.lax.scan(micro, init, xs)
    return totals


def _pipeline_accumulate(
    model: Llama,
    step_cfg: StepConfig,
    dropout_rates: jax.Array,
    deterministic: bool,
    layer_specs: Any,
) -> Callable:
    """``(params, frozen, batch, rng, reference) -> (grads, num, sums)`` with all
    micro-batches differentiated at once through the pipeline schedule (with respect to
    ``params``)."""

    def loss(params, frozen, batch, rng, reference):
        full = model_params(params, frozen)
        return _pipelined_loss(model, full, batch, rng, dropout_rates, deterministic,
                               step_cfg, layer_specs, reference)  # fmt: skip

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def accumulate(params: Any, frozen: Any, batch: dict, rng: jax.Array, reference: Any):
        (num, sums), grads = grad_fn(params, frozen, batch, rng, reference)
        return grads, num, sums

    return accumulate


def _scan_accumulate(
    model: Llama, step_cfg: StepConfig, dropout_rates: jax.Array, deterministic: bool
) -> Callable:
    """``(params, frozen, batch, rng, reference) -> (grads, num, sums)`` summed over the
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
        lambda params, frozen, mb, rng, ref: loss_fn(model_params(params, frozen), mb, rng,
                                                      reference=ref),
        has_aux=True,
    )  # fmt: skip

    def accumulate(params: Any, frozen: Any, batch: dict, rng: jax.Array, reference: Any):
        def micro(carry, xs):
            grads, num, sums = carry
            mb, i = xs
            (n, s), g = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i), reference)
            add = partial(jax.tree.map, jnp.add)
            return (add(grads, g), num + n, add(sums, s)), None

        first = jax.tree.map(lambda x: x[0], batch)
        (_, sums_shape), _ = jax.eval_shape(grad_fn, params, frozen, first, rng, reference)
        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.float32(0), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                    sums_shape))  # fmt: skip
        idx = jnp.arange(step_cfg.accumulation_steps)
        (grads, num, sums), _ = jax.lax.scan(micro, init, (batch, idx))
        return grads, num, sums

    return accumulate


def reference_params(state: dict, step_cfg: StepConfig) -> Any:
    """An on-the-fly DPO reference's parameter tree (else None): a LoRA run's frozen base
    with its adapters off (zero), or the state's ``reference`` (the load= weights)."""
    if not step_cfg.on_the_fly_reference:
        return None
    if "frozen" in state:
        return model_params(jax.tree.map(jnp.zeros_like, state["params"]), state["frozen"])
    return state["reference"]


def make_train_step(
    model: Llama,
    tx: optax.GradientTransformation,
    lr_schedule: Callable,
    step_cfg: StepConfig,
    dropout_rates: jax.Array,
    layer_specs: Any,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Build the (unjitted) step; ``batch`` holds :func:`batch_fields`, each with a leading
    accumulation axis (``[accumulation, rows, length]``, rm/dpo slots ``[accumulation, S]``).

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
        reference = reference_params(state, step_cfg)
        grads, num, sums = accumulate(params, state.get("frozen"), batch, rng, reference)
        den = sums["den"]
        scale = jnp.where(den > 0, 1.0 / jnp.maximum(den, 1e-9), 0.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        objective = finish_metrics(num, sums, step_cfg)
        loss = objective["loss"]
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
            **objective,
            "grad_norm": grad_norm,
            "update_norm": optax.global_norm(jax.tree.map(jnp.subtract, new_params, params)),
            "param_norm": optax.global_norm(new_params),
            "lr": lr_schedule(state["step"]),
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


def _eval_trunk(
    model: Llama, step_cfg: StepConfig, layer_specs: Any, params: Any, batch: dict
) -> jax.Array:
    """Decoder outputs ``[B, L, D]`` of one micro-batch without dropout.  With pipeline
    stages the batch goes through the schedule as one micro-batch: the plain scan over a
    stage-sharded layer stack would make XLA all-gather every layer onto every device
    (the whole model, for 70B)."""
    key, zero = jax.random.key(0), jnp.zeros((model.cfg.num_hidden_layers,), jnp.float32)
    if step_cfg.pipeline_stages == 1:
        return objectives.trunk(model, params, batch, key, zero, True)
    stacked = jax.tree.map(lambda x: x[None], batch)
    return pipeline_parallel.pipeline_hidden(
        model.cfg, params, stacked, key, zero, stages=step_cfg.pipeline_stages,
        layer_specs=layer_specs, deterministic=True,
    )[0]  # fmt: skip


def _eval_terms(
    model: Llama, step_cfg: StepConfig, layer_specs: Any, params: Any, batch: dict,
    reference: Any = None,
):  # fmt: skip
    """``(numerator, sums)`` of one micro-batch without dropout (:func:`_eval_trunk`)."""
    trunk = partial(_eval_trunk, model, step_cfg, layer_specs)
    ref_x_BLD = trunk(reference, batch) if step_cfg.on_the_fly_reference else None
    x_BLD = trunk(params, batch)
    return objectives.objective_terms(model, params, x_BLD, batch, step_cfg, reference, ref_x_BLD)


def make_sequence_logps(model: Llama, step_cfg: StepConfig, layer_specs: Any = None) -> Callable:
    """``(params, batch) -> [S]``: each slot's summed reply log-probs of one rm/dpo
    micro-batch without dropout (:func:`_eval_trunk`), what a DPO reference pre-pass
    stores."""

    def logps_fn(params: Any, batch: dict) -> jax.Array:
        x_BLD = _eval_trunk(model, step_cfg, layer_specs, params, batch)
        logits = model.apply({"params": params}, x_BLD, method=Llama.head)
        return objectives.sequence_logps(logits, batch, step_cfg)

    return logps_fn


def make_eval_step(
    model: Llama, step_cfg: StepConfig, layer_specs: Any = None
) -> Callable[[Any, dict], tuple[jax.Array, jax.Array, jax.Array]]:
    """``(params, batch [rows, length]) -> (numerator, denominator, loss tokens)``.

    The loss terms of one micro-batch as the train step computes them (same
    ``loss_normalization`` and ``micro_batch_size``), so an evaluation that sums
    them over its micro-batches and divides normalises its loss as training does.
    """

    def eval_fn(params: Any, batch: dict):
        num, sums = _eval_terms(model, step_cfg, layer_specs, params, batch)
        return num, sums["den"], sums["loss_tokens"]

    return eval_fn


def make_preference_eval_step(
    model: Llama, step_cfg: StepConfig, layer_specs: Any = None
) -> Callable:
    """``(params, batch, reference) -> (numerator, sums)`` of one rm/dpo micro-batch
    (no dropout): summed over an evaluation's micro-batches and passed to
    :func:`finish_metrics`, the val metrics weigh prompts / pairs as training does."""
    return partial(_eval_terms, model, step_cfg, layer_specs)


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
    # sft: make_eval_step's (params, batch); rm/dpo: make_preference_eval_step's
    # (params, batch, eval_reference(state))
    eval: Callable[..., Any]
    # what ``eval`` takes: the state's whole model tree (a LoRA run: adapters + frozen base)
    eval_params: Callable[[dict], Any]
    step_cfg: StepConfig
    # a LoRA run: the base weights ``load`` is read into (its dtype, its shardings), and
    # the random base of a run without ``load`` (PRNG key -> base); else None
    abstract_base: Any = None
    random_base: Callable[[jax.Array], Any] | None = None
    # dpo: make_sequence_logps's (params, batch) -> [S], the reference pre-pass; else None
    sequence_logps: Callable[[Any, dict], jax.Array] | None = None


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
            # only the trained leaves of a full init are used: XLA drops the rest of it
            adapters = lora.split(init_params(key))[0]
            return init_state(adapters, tx, lora.freeze(base, cfg))

        def random_base(key: jax.Array) -> Any:
            return jax.tree.map(lambda x: x.astype(base_dtype), lora.split(init_params(key))[1])

        def init_random(key: jax.Array) -> dict:
            return from_base(random_base(key), key)

        def from_base_seeded(base: Any) -> dict:
            # the key is made inside the trace: an eager one needs a concrete device,
            # which an abstract (AOT, TPU-topology) mesh does not have
            return from_base(base, jax.random.key(step_cfg.seed))

        init_from_params = jax.jit(from_base_seeded, out_shardings=s_shard)

        def eval_params(state: dict) -> Any:
            return lora.merge(state["params"], state["frozen"])
    else:
        p_shard = eval_shard = all_shard
        keep_reference = step_cfg.on_the_fly_reference

        def fresh(p: Any) -> dict:
            # an on-the-fly DPO reference: the starting weights, kept apart, never trained
            return {**init_state(p, tx), "reference": p} if keep_reference else init_state(p, tx)

        abs_state = jax.eval_shape(fresh, nn.meta.unbox(boxed))
        s_shard = sharding.state_shardings(mesh, p_shard, abs_state)
        if keep_reference:
            s_shard["reference"] = p_shard
        init_from_params = jax.jit(fresh, out_shardings=s_shard)

        def init_random(key: jax.Array) -> dict:
            return fresh(init_params(key))

        def eval_params(state: dict) -> Any:
            return state["params"]

        random_base = None

    b_shard = batch_shardings(mesh, step_cfg, leading=(None,))
    step = jax.jit(
        make_train_step(model, tx, lr_schedule, step_cfg, dropout_rates, layer_specs),
        in_shardings=(s_shard, b_shard),
        out_shardings=(s_shard, None),
        donate_argnums=(0,),
    )
    if step_cfg.objective == "sft":
        eval_fn = jax.jit(
            make_eval_step(model, step_cfg, layer_specs),
            in_shardings=(eval_shard, sharding.batch_sharding(mesh)),
        )
    else:  # the reference (None, or a tree) comes sharded as the state holds it
        eval_fn = jax.jit(make_preference_eval_step(model, step_cfg, layer_specs))
    logps_fn = None
    if step_cfg.objective == "dpo":
        logps_fn = jax.jit(make_sequence_logps(model, step_cfg, layer_specs))
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
        step_cfg=step_cfg,
        abstract_base=abstract_base,
        random_base=None if random_base is None else jax.jit(random_base, out_shardings=base_shard),
        sequence_logps=logps_fn,
    )
