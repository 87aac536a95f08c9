"""Sequence parallelism (residual stream split over tensor) and context parallelism (the
sequence split over ``sequence``): same loss and gradients as one device, fp32, 1e-5,
packed rows (segment ids, a padded tail), for the XLA and the Pallas (interpret) paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama
from flax import linen as nn

from oasst_jax.model import RESIDUAL, DecoderLayer, Llama, LlamaConfig
from oasst_jax.sharding import logical_sharding, make_mesh, tree_shardings

ROWS, LENGTH = 2, 32
SEGMENTS = np.array([[1] * 9 + [2] * 13 + [3] * 10, [1] * 20 + [2] * 7 + [0] * 5], np.int32)


def _cfg(implementation: str) -> LlamaConfig:
    return tiny_llama(attention_impl=implementation)


def _loss_and_grads(cfg: LlamaConfig, boxed, mesh):
    """Mean next-token NLL and its gradients, inputs/params placed by the logical rules."""
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (ROWS, LENGTH)).astype(np.int32)

    def loss(params, tokens, segment_ids):
        logits = Llama(cfg).apply({"params": params}, tokens, segment_ids_BL=segment_ids)
        logp = jax.nn.log_softmax(logits[:, :-1, : cfg.vocab_size])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    with jax.set_mesh(mesh):
        params = jax.device_put(
            nn.meta.unbox(boxed), tree_shardings(mesh, nn.get_partition_spec(boxed))
        )
        rows = logical_sharding(mesh, ("batch", "length"))
        return jax.jit(jax.value_and_grad(loss))(
            params, jax.device_put(tokens, rows), jax.device_put(SEGMENTS, rows)
        )


@pytest.mark.parametrize("implementation", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_sequence_and_context_parallel_match_one_device(implementation):
    cfg = _cfg(implementation)
    boxed = jax.jit(Llama(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    want_loss, want_grads = jax.device_get(
        _loss_and_grads(cfg, boxed, make_mesh({}, jax.devices()[:1]))
    )
    for shape in ({"sequence": 2, "tensor": 2, "data": 2}, {"sequence": 4, "tensor": 2}):
        loss, grads = jax.device_get(_loss_and_grads(cfg, boxed, make_mesh(shape)))
        err = max(
            float(np.abs(g - w).max())
            for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True)
        )
        print(f"{implementation} {shape}: loss err {abs(loss - want_loss):.1e}, grad err {err:.1e}")
        assert abs(float(loss) - float(want_loss)) < 1e-5
        assert err < 1e-5


@pytest.mark.slow
def test_residual_stream_is_split_over_tensor():
    """Megatron SP: a layer's output (the residual stream) is sharded along the sequence
    over sequence x tensor, not replicated over tensor."""
    cfg = _cfg("xla")
    mesh = make_mesh({"tensor": 2, "sequence": 2, "data": 2})
    x = jnp.ones((ROWS, LENGTH, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(LENGTH), (ROWS, LENGTH))
    layer = DecoderLayer(cfg)
    params = layer.init(jax.random.key(0), (x, pos, SEGMENTS), 0.0)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda p, x: layer.apply(p, (x, pos, SEGMENTS), 0.0)[0][0])(params, x)
    assert out.sharding.is_equivalent_to(logical_sharding(mesh, RESIDUAL), out.ndim)
    assert out.addressable_shards[0].data.shape == (ROWS // 2, LENGTH // 4, cfg.hidden_size)
