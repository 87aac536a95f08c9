"""Optimizer (oasst_jax/optim.py): the Megatron learning-rate schedule and the
weight-decay mask."""

import math

import pytest

from oasst_jax import optim


def test_megatron_schedule_matches_formula():
    lr, min_lr, warm, total = 1e-5, 1e-6, 100, 12000

    def expected(step):
        if step <= warm:
            return lr * step / warm
        progress = (step - warm) / (total - warm)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))

    for step in (0, 50, 100, 101, 6000, 12000, 12500):
        got = float(
            optim.megatron_lr(step, lr=lr, min_lr=min_lr, warmup_iters=warm, decay_iters=total)
        )
        want = expected(min(step, total))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-13), step
    assert (
        float(optim.megatron_lr(0, lr=lr, min_lr=min_lr, warmup_iters=warm, decay_iters=total)) == 0
    )


def test_weight_decay_skips_norm_scales_only():
    params = {
        "embedding": 1,
        "lm_head": 1,
        "final_norm": {"scale": 1},
        "decoder": {"layers": {"attn_norm": {"scale": 1}, "mlp": {"up": 1}}},
    }
    mask = optim.decay_mask(params)
    assert mask["embedding"] and mask["lm_head"] and mask["decoder"]["layers"]["mlp"]["up"]
    assert not mask["final_norm"]["scale"] and not mask["decoder"]["layers"]["attn_norm"]["scale"]
