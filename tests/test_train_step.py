"""The jitted train and eval steps (oasst_jax/train_step.py): sharded == single-device,
gradient accumulation == one big batch, the eval step normalises as the train step, and
the on-device finiteness check.  Tolerances: fp32 everywhere, 1e-5 for sharded vs single
device (reduction order differs), 1e-6 for accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_diff, tiny_llama

from oasst_jax import optim, sharding
from oasst_jax.config import base_config
from oasst_jax.model import Llama, hidden_dropout_rates
from oasst_jax.sft_feed import eval_metrics
from oasst_jax.train_step import StepConfig, build_trainer

TINY = tiny_llama(initializer_range=0.02)


def _optim_cfg():
    c = base_config().optim
    c.lr, c.min_lr, c.lr_warmup_iters, c.weight_decay = 1e-2, 1e-3, 1, 0.1
    return c


def _batch(accum: int, rows: int, length: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    seg = np.ones((accum, rows, length), np.int32)
    seg[..., length // 2 :] = 2  # two packed samples per row
    pos = np.concatenate([np.arange(length // 2)] * 2)[None, None].repeat(accum, 0).repeat(rows, 1)
    return {
        "inputs": rng.integers(0, TINY.vocab_size, (accum, rows, length)).astype(np.int32),
        "targets": rng.integers(0, TINY.vocab_size, (accum, rows, length)).astype(np.int32),
        "weights": (rng.random((accum, rows, length)) > 0.4).astype(np.float32),
        "segment_ids": seg,
        "positions": pos.astype(np.int32),
    }


def _train(mesh_shape, batch, steps=2, micro=2, devices=None, hidden_dropout=0.0):
    mesh = sharding.make_mesh(mesh_shape, devices)
    model = Llama(TINY)
    tx = optim.make_optimizer(_optim_cfg(), 10)
    accum = batch["inputs"].shape[0]
    rates = hidden_dropout_rates(TINY.num_hidden_layers, hidden_dropout, True)
    with jax.set_mesh(mesh):
        t = build_trainer(
            model, tx, optim.schedule(_optim_cfg(), 10), StepConfig(accum, micro), rates, mesh
        )
        state = t.init_random(jax.random.key(0))
        b = {k: jax.device_put(v, t.batch_sharding) for k, v in batch.items()}
        losses = []
        for _ in range(steps):
            state, m = t.step(state, b)
            losses.append(float(m["loss"]))
        return jax.device_get(state["params"]), losses, state


@pytest.mark.slow
def test_sharded_step_equals_single_device():
    batch = _batch(accum=1, rows=4)
    single, l1, _ = _train({}, batch, micro=4, devices=jax.devices()[:1], hidden_dropout=0.1)
    sharded, l8, state = _train(
        {"fsdp": 2, "sequence": 2, "tensor": 2}, batch, micro=2, hidden_dropout=0.1
    )
    assert np.allclose(l1, l8, atol=1e-5), (l1, l8)
    assert max_diff(single, sharded) < 1e-5
    q = state["params"]["decoder"]["layers"]["attn"]["q"]
    assert q.sharding.spec == sharding.logical_spec(("layers", "embed", "heads", "head_dim"))


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch():
    big = _batch(accum=1, rows=8, seed=3)
    split = {k: v.reshape(4, 2, *v.shape[2:]) for k, v in big.items()}
    one, l1, _ = _train({}, big, steps=1, micro=8, devices=jax.devices()[:1])
    acc, l4, _ = _train({}, split, steps=1, micro=2, devices=jax.devices()[:1])
    assert abs(l1[0] - l4[0]) < 1e-6
    assert max_diff(one, acc) < 1e-6


def test_eval_normalizes_like_the_train_step():
    """An evaluation's micro-batch terms, summed then divided, give the train step's loss
    on the same global batch: under ``microbatch_mean``, Megatron's val loss, the mean of
    the per-micro-batch means (one device: the terms are the step's own ``_loss_terms``)."""
    batch = _batch(accum=2, rows=4, seed=5)
    batch["weights"][0, :2] = 0  # an empty micro-batch: left out of the mean
    batch["weights"][1, 2:, 4:] = 0  # and one with fewer loss tokens than the others
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    tx, sched = optim.make_optimizer(_optim_cfg(), 10), optim.schedule(_optim_cfg(), 10)
    zero = np.zeros(TINY.num_hidden_layers, np.float32)
    with jax.set_mesh(mesh):
        t = build_trainer(Llama(TINY), tx, sched, StepConfig(2, 2, "microbatch_mean"), zero, mesh)
        state = t.init_random(jax.random.key(0))
        terms = [t.eval(state["params"], {k: v[i] for k, v in batch.items()}) for i in range(2)]
        got = eval_metrics(terms)
        _, m = t.step(state, {k: jax.device_put(v, t.batch_sharding) for k, v in batch.items()})
    assert got["val_loss"] == pytest.approx(float(m["loss"]), rel=1e-6)
    assert got["val_loss_tokens"] == float(batch["weights"].sum()) == float(m["loss_tokens"])
    assert sum(float(d) for _, d, _ in terms) == 3  # a mean of 4 micro-batches, one empty


def test_all_finite_sees_one_nan_in_a_sharded_tree():
    from oasst_jax.train_step import all_finite

    mesh = sharding.make_mesh({"fsdp": 8})
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    x = np.zeros((16, 4), np.float32)
    tree = {"a": jax.device_put(x, shard), "step": jnp.int32(3)}
    assert bool(all_finite(tree))
    x[13, 2] = np.nan  # on the last device only
    assert not bool(all_finite({**tree, "a": jax.device_put(x, shard)}))
