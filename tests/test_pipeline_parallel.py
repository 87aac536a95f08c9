"""Pipeline parallelism: the GPipe schedule gives the unpipelined loss and gradients.

Gradients are read through the real jitted train step with ``optax.sgd(1.0)``
(``grads = params_before - params_after``), so the shardings, the schedule and the
step are all under test.  fp32; 1e-5 (reduction order differs between layouts).
"""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest
from conftest import max_diff

from oasst_jax import optim
from oasst_jax.config import base_config
from oasst_jax.model import Llama, LlamaConfig
from oasst_jax.pipeline_parallel import bubble_fraction
from oasst_jax.sharding import make_mesh
from oasst_jax.train_step import StepConfig, build_trainer

MICRO, ROWS, LENGTH = 4, 2, 16


def _cfg(layers: int, remat: str = "none") -> LlamaConfig:
    return LlamaConfig(
        vocab_size=200,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        dtype="float32",
        remat_policy=remat,
        initializer_range=0.2,
    )


def _batch(micro: int, rows: int, seed: int = 0) -> dict:
    """Packed rows (three segments each), some tokens without loss weight."""
    rs = np.random.RandomState(seed)
    lengths = (6, 7, 3)
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    shape = (micro, rows, LENGTH)
    return {
        "inputs": rs.randint(0, 200, shape).astype(np.int32),
        "targets": rs.randint(0, 200, shape).astype(np.int32),
        "weights": (rs.rand(*shape) > 0.3).astype(np.float32),
        "segment_ids": np.broadcast_to(seg, shape).astype(np.int32),
        "positions": np.broadcast_to(pos, shape).astype(np.int32),
    }


def _steps(cfg, mesh_shape, stages, batches, tx, devices=None, hlo=False):
    """Run the jitted step over ``batches``; returns (initial params, final state, losses, hlo)."""
    mesh = make_mesh(mesh_shape, devices)
    micro, rows = batches[0]["inputs"].shape[:2]
    with jax.set_mesh(mesh):
        trainer = build_trainer(
            Llama(cfg),
            tx,
            lambda step: 1.0,
            StepConfig(micro, rows, pipeline_stages=stages),
            np.zeros(cfg.num_hidden_layers, np.float32),
            mesh,
        )
        state = trainer.init_random(jax.random.key(0))
        params0 = jax.device_get(state["params"])
        text, losses = "", []
        for batch in batches:
            batch = jax.device_put(batch, trainer.batch_sharding)
            if hlo:
                compiled = trainer.step.lower(state, batch).compile()
                text = compiled.as_text()
                state, metrics = compiled(state, batch)
            else:
                state, metrics = trainer.step(state, batch)
            losses.append(float(metrics["loss"]))
    return params0, jax.device_get(state), losses, text


_REFERENCE: dict = {}


def _reference_grads(layers: int):
    """Loss and gradients of the unpipelined step on one device (cached per depth)."""
    if layers not in _REFERENCE:
        p0, state, losses, _ = _steps(
            _cfg(layers), {}, 1, [_batch(MICRO, ROWS)], optax.sgd(1.0), jax.devices()[:1]
        )
        _REFERENCE[layers] = losses[0], jax.tree.map(np.subtract, p0, state["params"])
    return _REFERENCE[layers]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_shape, stages, layers, remat",
    [
        ({"pipeline": 4, "data": 2}, 4, 4, "none"),
        ({"pipeline": 2, "tensor": 2, "fsdp": 2}, 2, 8, "selective"),
    ],
    ids=["pipeline4-4layers", "pipeline2xtensor2xfsdp2-8layers-remat"],
)
def test_pipeline_matches_unpipelined_loss_and_grads(mesh_shape, stages, layers, remat):
    want_loss, want_grads = _reference_grads(layers)
    p0, state, losses, hlo = _steps(
        _cfg(layers, remat), mesh_shape, stages, [_batch(MICRO, ROWS)], optax.sgd(1.0), hlo=True
    )
    grads = jax.tree.map(np.subtract, p0, state["params"])
    loss_err, grad_err = abs(losses[0] - want_loss), max_diff(grads, want_grads)
    print(f"{mesh_shape} {layers} layers: loss err {loss_err:.1e}, grad err {grad_err:.1e}")
    assert loss_err < 1e-5 and grad_err < 1e-5
    # Stages hand activations on by collective permutes; without fsdp/tensor nothing is
    # all-gathered (stage weights stay on their stage).
    assert re.search(r" collective-permute(-start)?\(", hlo)
    if set(mesh_shape) == {"pipeline", "data"}:
        assert not re.search(r" all-gather(-start)?\(", hlo)


@pytest.mark.slow
def test_full_train_step_pipeline2_equals_pipeline1():
    """Two AdamW steps (card optimizer settings) on the same 8 devices."""
    oc = base_config().optim
    oc.lr, oc.lr_warmup_iters = 1e-4, 1
    tx = optim.make_optimizer(oc, train_iters=10)
    batches = [_batch(2, 8, seed=s) for s in (1, 2)]
    cfg = _cfg(4)
    _, want, want_losses, _ = _steps(cfg, {"data": 8}, 1, batches, tx)
    _, got, losses, _ = _steps(cfg, {"pipeline": 2, "data": 4}, 2, batches, tx)
    np.testing.assert_allclose(losses, want_losses, atol=1e-5)
    assert max_diff(got["params"], want["params"]) < 1e-5


def _eval(cfg, mesh_shape, stages, batch, devices=None):
    """Eval-step (loss sum, token count) and its compiled HLO."""
    mesh = make_mesh(mesh_shape, devices)
    with jax.set_mesh(mesh):
        trainer = build_trainer(
            Llama(cfg),
            optax.sgd(1.0),
            lambda step: 1.0,
            StepConfig(1, batch["inputs"].shape[0], pipeline_stages=stages),
            np.zeros(cfg.num_hidden_layers, np.float32),
            mesh,
        )
        params = trainer.init_random(jax.random.key(0))["params"]
        compiled = trainer.eval.lower(params, batch).compile()
        return jax.device_get(compiled(params, batch)), compiled.as_text()


def test_eval_step_runs_the_pipeline():
    """Eval under pipeline=4 equals one device, and no layer is gathered across stages."""
    batch = jax.tree.map(lambda x: x[0], _batch(1, ROWS))
    cfg = _cfg(8)
    want, _ = _eval(cfg, {}, 1, batch, jax.devices()[:1])
    got, hlo = _eval(cfg, {"pipeline": 4, "data": 2}, 4, batch)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not re.search(r" all-gather(-start)?\(", hlo)


def test_bubble_fraction():
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(4, 32) == pytest.approx(3 / 35)
