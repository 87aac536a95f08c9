"""Preference losses (reward model, DPO) and the per-sequence reductions they start from.

Pure, static-shaped, jit-able functions; no model code.  They read the batch layout of
:mod:`oasst_jax.data.ranked_batches`: ``S`` sequence slots per batch, each a prefix plus one
reply, with per-token ``sequence_ids`` (``S`` on padding) and per-slot ``sequence_row``,
``sequence_last``, ``sequence_group``, ``sequence_rank``, ``sequence_valid``.

Reward model (upstream Open-Assistant ``model_training/losses.py``, ``RMLoss``; recipe.md
is silent on it, the formula is the trainer issue's): for every prompt, over every ordered
pair ``(i, j)`` of its replies with ``i`` ranked better, ``-log sigma(r_i - r_j) +
beta * (r_i^2 + r_j^2) / 2`` (``beta = 0.001``); the mean over the prompt's pairs, then the
mean over prompts.  Like upstream's ``torch.combinations`` over the best-first list, "better"
is the position in that list (``sequence_rank``), so tied ranks still form a pair.

DPO (Rafailov et al., TRL's ``loss_type="sigmoid"``): ``-log sigma(beta * ((log pi(y_w|x) -
log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))``, ``beta = 0.1``, the
log-probabilities summed over the reply's loss tokens; the mean over pairs.

Both return ``(loss, metrics)``; padding slots and groups without a pair are left out of
every mean, and a batch with none gives 0 (not NaN).  ``metrics["num_prompts"]`` /
``["num_pairs"]`` are the denominators, so gradient accumulation can weight micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from oasst_jax.loss import token_cross_entropy

RM_BETA = 0.001  # upstream RMLoss's default
DPO_BETA = 0.1  # TRL's default


def sequence_logps(
    logits_BLV: jax.Array,
    targets_BL: jax.Array,
    weights_BL: jax.Array,
    sequence_ids_BL: jax.Array,
    num_sequences: int,
) -> jax.Array:
    """Summed target log-probabilities per sequence slot, ``[S]`` fp32: ``sum_t w_t log
    p(target_t)`` over the tokens of each slot.  ``sequence_ids`` out of ``[0, S)`` (the
    layout's padding id ``S``) are dropped; ``num_sequences`` is static."""
    logp_BL = -token_cross_entropy(logits_BLV, targets_BL) * weights_BL.astype(jnp.float32)
    return jax.ops.segment_sum(
        logp_BL.reshape(-1), sequence_ids_BL.reshape(-1), num_segments=num_sequences
    )


def last_token(values_BL: jax.Array, rows_S: jax.Array, last_S: jax.Array) -> jax.Array:
    """``values[row, last]`` per slot (``[S, ...]``): the reward model's score, or its
    final hidden state, at the last token of each sequence."""
    return values_BL[rows_S, last_S]


def _pair_mask(group_S: jax.Array, rank_S: jax.Array, valid_S: jax.Array) -> jax.Array:
    """``[S, S]``: slot ``a`` better than slot ``b`` of the same group, both valid."""
    valid = valid_S.astype(bool)
    same = group_S[:, None] == group_S[None, :]
    return same & (rank_S[:, None] < rank_S[None, :]) & valid[:, None] & valid[None, :]


def rm_loss(
    scores_S: jax.Array,
    group_S: jax.Array,
    rank_S: jax.Array,
    valid_S: jax.Array,
    *,
    num_groups: int,
    beta: float = RM_BETA,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Upstream's K-wise reward-model loss (module doc) and its metrics: ``accuracy`` (pairs
    with ``r_i > r_j``), ``margin`` (mean ``r_i - r_j``), both over all pairs of the batch."""
    scores_S = scores_S.astype(jnp.float32)
    pairs = _pair_mask(group_S, rank_S, valid_S)
    diff = scores_S[:, None] - scores_S[None, :]
    l2 = 0.5 * (scores_S[:, None] ** 2 + scores_S[None, :] ** 2)
    per_pair = jnp.where(pairs, -jax.nn.log_sigmoid(diff) + beta * l2, 0.0)
    w = pairs.astype(jnp.float32)
    group_sum = jax.ops.segment_sum(per_pair.sum(1), group_S, num_segments=num_groups)
    group_pairs = jax.ops.segment_sum(w.sum(1), group_S, num_segments=num_groups)
    has_pairs = group_pairs > 0
    group_mean = jnp.where(has_pairs, group_sum / jnp.maximum(group_pairs, 1.0), 0.0)
    num_prompts = has_pairs.sum().astype(jnp.float32)
    num_pairs = w.sum()
    loss = group_mean.sum() / jnp.maximum(num_prompts, 1.0)
    metrics = {
        "accuracy": jnp.sum(pairs & (diff > 0)) / jnp.maximum(num_pairs, 1.0),
        "margin": jnp.sum(jnp.where(pairs, diff, 0.0)) / jnp.maximum(num_pairs, 1.0),
        "num_prompts": num_prompts,
        "num_pairs": num_pairs,
    }
    return loss, metrics


def pair_values(
    values_S: jax.Array,
    group_S: jax.Array,
    rank_S: jax.Array,
    valid_S: jax.Array,
    *,
    num_pairs: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(chosen [P], rejected [P], pair_valid [P])`` from per-slot values of a DPO batch
    (``group`` = pair index, ``rank`` 0 chosen / 1 rejected)."""
    valid = valid_S.astype(jnp.float32)
    values_S = values_S.astype(jnp.float32)
    chosen = jax.ops.segment_sum(values_S * valid * (rank_S == 0), group_S, num_segments=num_pairs)
    rejected = jax.ops.segment_sum(
        values_S * valid * (rank_S == 1), group_S, num_segments=num_pairs
    )
    both = jax.ops.segment_sum(valid, group_S, num_segments=num_pairs) == 2
    return chosen, rejected, both


def dpo_loss(
    policy_chosen_P: jax.Array,
    policy_rejected_P: jax.Array,
    reference_chosen_P: jax.Array,
    reference_rejected_P: jax.Array,
    valid_P: jax.Array,
    *,
    beta: float = DPO_BETA,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sigmoid DPO loss (module doc) from summed reply log-probabilities, with TRL's
    metrics: ``rewards_chosen``/``rewards_rejected`` (``beta`` times the log-ratio),
    ``reward_accuracy`` (chosen reward > rejected), ``reward_margin``, ``logps_chosen``,
    ``logps_rejected``; all means over valid pairs."""
    valid_P = valid_P.astype(bool)
    n = valid_P.sum().astype(jnp.float32)
    chosen = beta * (policy_chosen_P - reference_chosen_P).astype(jnp.float32)
    rejected = beta * (policy_rejected_P - reference_rejected_P).astype(jnp.float32)
    per_pair = -jax.nn.log_sigmoid(chosen - rejected)

    def mean(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(valid_P, x, 0.0)) / jnp.maximum(n, 1.0)

    metrics = {
        "rewards_chosen": mean(chosen),
        "rewards_rejected": mean(rejected),
        "reward_accuracy": mean((chosen > rejected).astype(jnp.float32)),
        "reward_margin": mean(chosen - rejected),
        "logps_chosen": mean(policy_chosen_P.astype(jnp.float32)),
        "logps_rejected": mean(policy_rejected_P.astype(jnp.float32)),
        "num_pairs": n,
    }
    return mean(per_pair), metrics
