"""AdamW with Megatron-LM's learning-rate schedule and weight-decay rule.

Megatron's ``OptimizerParamScheduler`` counts from step 0, so the first update
uses lr 0; it warms up linearly to ``lr`` at ``lr_warmup_iters`` and then
follows a half cosine down to ``min_lr`` at ``lr_decay_iters`` (default
``train_iters``), staying at ``min_lr`` afterwards.  Weight decay is decoupled
(AdamW) and, as in Megatron's ``get_param_groups``, skipped for every norm
scale (the 1-D parameters of an unstacked model); the embedding and LM head
*are* decayed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def megatron_lr(
    step: jax.Array | int,
    *,
    lr: float,
    min_lr: float,
    warmup_iters: int,
    decay_iters: int,
) -> jax.Array:
    """Learning rate used by update number ``step`` (0-based)."""
    step = jnp.asarray(step, jnp.float32)
    warm = lr * step / max(warmup_iters, 1)
    span = max(decay_iters - warmup_iters, 1)
    progress = jnp.clip((step - warmup_iters) / span, 0.0, 1.0)
    cosine = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step <= warmup_iters, warm, cosine) if warmup_iters > 0 else cosine


def schedule(optim: ml_collections.ConfigDict, train_iters: int) -> optax.Schedule:
    decay_iters = optim.lr_decay_iters or train_iters
    return lambda count: megatron_lr(
        count,
        lr=optim.lr,
        min_lr=optim.min_lr,
        warmup_iters=optim.lr_warmup_iters,
        decay_iters=decay_iters,
    )


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but norm scales."""

    def decayed(path, _) -> bool:
        return not any("norm" in str(getattr(k, "key", k)) for k in path)

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(
    optim: ml_collections.ConfigDict, train_iters: int
) -> optax.GradientTransformation:
    """Clip by global norm -> AdamW, wrapped so a non-finite gradient skips the update.

    ``optax.apply_if_finite`` leaves params and moments untouched on a NaN/Inf
    gradient and counts it (``total_notfinite``), so training never continues
    with NaN parameters.
    """
    chain = []
    if optim.clip_grad > 0:
        chain.append(optax.clip_by_global_norm(optim.clip_grad))
    chain.append(
        optax.adamw(
            learning_rate=schedule(optim, train_iters),
            b1=optim.adam_beta1,
            b2=optim.adam_beta2,
            eps=optim.adam_eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=1_000_000)
