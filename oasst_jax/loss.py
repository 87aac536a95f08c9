"""Next-token cross-entropy on assistant tokens, and the two normalisations.

The logits stay sharded over the vocabulary (``tensor`` axis): the target
logit is picked with a masked sum and the normaliser with ``logsumexp``, both
reductions over the sharded axis, so XLA all-reduces ``[B, L]`` scalars and
never gathers the full vocabulary on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in fp32."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    vocab = jnp.arange(logits_BLV.shape[-1])
    target_logit = jnp.sum(jnp.where(vocab == targets_BL[..., None], logits_BLV, 0.0), axis=-1)
    return jax.nn.logsumexp(logits_BLV, axis=-1) - target_logit


def loss_sum_and_count(
    nll_BL: jax.Array, weights_BL: jax.Array, *, normalization: str, micro_batch_size: int
) -> tuple[jax.Array, jax.Array]:
    """``(numerator, denominator)`` of this micro-step's share of the step loss.

    The step loss is ``sum(numerators) / sum(denominators)`` over the micro-steps
    of gradient accumulation, so gradients can be accumulated as sums.

    * ``global_token_mean`` (default): every loss token of the global batch
      weighs the same -> ``(sum(nll * w), sum(w))``.
    * ``microbatch_mean`` (Megatron-LLM exactly): each micro-batch of
      ``micro_batch_size`` rows is averaged over its own tokens, then micro-batches
      are averaged -> ``(sum_g mean_g, #groups)``.  A micro-batch with no loss
      token is left out instead of producing Megatron's 0/0 = NaN.
    """
    weights_BL = weights_BL.astype(jnp.float32)
    if normalization == "global_token_mean":
        return jnp.sum(nll_BL * weights_BL), jnp.sum(weights_BL)
    if normalization == "microbatch_mean":
        rows = nll_BL.shape[0]
        groups = (nll_BL * weights_BL).reshape(rows // micro_batch_size, -1).sum(-1)
        counts = weights_BL.reshape(rows // micro_batch_size, -1).sum(-1)
        nonempty = counts > 0
        means = jnp.where(nonempty, groups / jnp.maximum(counts, 1.0), 0.0)
        return jnp.sum(means), jnp.sum(nonempty.astype(jnp.float32))
    raise ValueError(
        f"loss_normalization={normalization!r}; choose global_token_mean or microbatch_mean"
    )
