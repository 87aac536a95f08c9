"""Loss (oasst_jax/loss.py): only assistant targets count, and ``microbatch_mean`` leaves
an empty micro-batch out instead of dividing by zero."""

import jax.numpy as jnp
import numpy as np

from oasst_jax.loss import loss_sum_and_count, token_cross_entropy


def test_loss_only_counts_assistant_targets():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 6, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 6)))
    weights = jnp.asarray([[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]], jnp.float32)
    changed = jnp.where(weights > 0, targets, (targets + 3) % 11)  # new prompt/system targets
    for norm in ("global_token_mean", "microbatch_mean"):
        a = loss_sum_and_count(
            token_cross_entropy(logits, targets), weights, normalization=norm, micro_batch_size=1
        )
        b = loss_sum_and_count(
            token_cross_entropy(logits, changed), weights, normalization=norm, micro_batch_size=1
        )
        assert float(a[0] / a[1]) == float(b[0] / b[1])


def test_microbatch_mean_skips_empty_microbatch():
    nll = jnp.ones((4, 3))
    w = jnp.asarray([[1, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], jnp.float32)
    num, den = loss_sum_and_count(nll, w, normalization="microbatch_mean", micro_batch_size=2)
    assert float(den) == 1.0 and float(num) == 1.0  # second micro-batch left out, no NaN
