"""Model behaviour: packing isolation, sharded equivalence, GQA, remat, dropout, configs."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from oasst_jax.model import (
    Llama,
    LlamaConfig,
    hidden_dropout_rates,
    positions_from_segments,
)
from oasst_jax.sharding import logical_sharding, make_mesh, tree_shardings

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "model"
# vocab 200 pads to 256 (padding exercised); every sharded dim divides by 2.
TINY = tiny_llama()


def _init(cfg: LlamaConfig, seed: int = 0):
    """Boxed (logically annotated) params of ``cfg``."""
    return jax.jit(Llama(cfg).init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]


def _tokens(shape: tuple[int, int], seed: int = 1) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, TINY.vocab_size, shape).astype(np.int32)


def _loss(cfg: LlamaConfig):
    """Mean next-token NLL over the real vocabulary (a scalar to differentiate)."""

    def loss(params, tokens, segment_ids=None):
        logits = Llama(cfg).apply({"params": params}, tokens, segment_ids_BL=segment_ids)
        logp = jax.nn.log_softmax(logits[:, :-1, : cfg.vocab_size])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
        return nll.mean(), logits

    return loss


@pytest.fixture(scope="module")
def tiny_params():
    return _init(TINY)


# ----------------------------------------------------------------------------- (a) packing


def test_positions_restart_per_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_packed_row_equals_sequences_alone(tiny_params):
    params = {"params": nn.meta.unbox(tiny_params)}
    apply = jax.jit(Llama(TINY).apply)
    a, b = _tokens((1, 5), seed=2), _tokens((1, 9), seed=3)
    packed = np.concatenate([a, b], axis=1)
    seg = np.array([[1] * 5 + [2] * 9], np.int32)
    got = apply(params, packed, segment_ids_BL=seg)
    alone_a, alone_b = apply(params, a), apply(params, b)
    v = TINY.vocab_size
    np.testing.assert_allclose(got[:, :5, :v], alone_a[..., :v], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[:, 5:, :v], alone_b[..., :v], atol=1e-5, rtol=0)
    assert (got[..., v:] == jnp.finfo(jnp.float32).min).all()  # padded columns never win


# ----------------------------------------------------------------------------- (b) sharding

EXPECTED_SPECS = {
    ("decoder", "layers", "attn", "q"): P("pipeline", "fsdp", "tensor", None),
    ("decoder", "layers", "attn", "k"): P("pipeline", "fsdp", "tensor", None),
    ("decoder", "layers", "attn", "o"): P("pipeline", "tensor", None, "fsdp"),
    ("decoder", "layers", "mlp", "gate"): P("pipeline", "fsdp", "tensor"),
    ("decoder", "layers", "mlp", "down"): P("pipeline", "tensor", "fsdp"),
    ("decoder", "layers", "attn_norm", "scale"): P("pipeline", None),
    ("embedding",): P("tensor", "fsdp"),
    ("lm_head",): P("fsdp", "tensor"),
}


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_every_parameter_has_a_logical_spec(tiny_params):
    specs = nn.get_partition_spec(tiny_params)
    params = nn.meta.unbox(tiny_params)
    for (path, spec), leaf in zip(
        jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P)),
        jax.tree_util.tree_leaves(params),
        strict=True,
    ):
        assert isinstance(spec, P) and len(spec) == leaf.ndim, jax.tree_util.keystr(path)


@pytest.mark.slow
def test_sharded_forward_and_grads_match_single_device(tiny_params):
    params = nn.meta.unbox(tiny_params)
    tokens = _tokens((4, 16))
    seg = np.repeat(np.array([[1] * 10 + [2] * 6]), 4, axis=0).astype(np.int32)
    step = jax.value_and_grad(_loss(TINY), has_aux=True)
    (ref_loss, ref_logits), ref_grads = jax.jit(step)(params, tokens, seg)

    mesh = make_mesh({"fsdp": 2, "sequence": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        sharded = jax.device_put(params, tree_shardings(mesh, nn.get_partition_spec(tiny_params)))
        batch = logical_sharding(mesh, ("batch", "length"))
        (loss, logits), grads = jax.jit(step)(
            sharded, jax.device_put(tokens, batch), jax.device_put(seg, batch)
        )

    for path, spec in EXPECTED_SPECS.items():
        assert _leaf(sharded, path).sharding.spec == spec, path
    q = _leaf(sharded, ("decoder", "layers", "attn", "q"))
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)  # embed/2, heads/2
    v = TINY.vocab_size
    logit_err = float(jnp.abs(logits[..., :v] - ref_logits[..., :v]).max())
    grad_err = max(
        float(jnp.abs(g - r).max())
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True)
    )
    print(f"sharded vs single device: max logit err {logit_err:.2e}, max grad err {grad_err:.2e}")
    assert abs(float(loss) - float(ref_loss)) <= 1e-5
    assert logit_err <= 1e-5 and grad_err <= 1e-5


# ----------------------------------------------------------------------------- (c) GQA, remat


def test_gqa_equals_mha_with_repeated_kv_heads(tiny_params):
    """Query head h reads kv head h // groups: repeating k/v heads gives plain MHA."""
    params = nn.meta.unbox(tiny_params)
    groups = TINY.num_attention_heads // TINY.num_key_value_heads
    mha_cfg = dataclasses.replace(TINY, num_key_value_heads=TINY.num_attention_heads)
    attn = params["decoder"]["layers"]["attn"]
    mha_attn = {**attn, **{n: jnp.repeat(attn[n], groups, axis=2) for n in ("k", "v")}}
    mha = {**params, "decoder": {"layers": {**params["decoder"]["layers"], "attn": mha_attn}}}
    tokens = _tokens((2, 12))
    got = Llama(TINY).apply({"params": params}, tokens)
    want = Llama(mha_cfg).apply({"params": mha}, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_remat_policies_give_identical_loss_and_grads(tiny_params):
    params = nn.meta.unbox(tiny_params)
    tokens = _tokens((2, 12))
    results = {}
    for policy in ("none", "full", "selective"):
        cfg = dataclasses.replace(TINY, remat_policy=policy)
        step = jax.jit(jax.value_and_grad(lambda p, t, c=cfg: _loss(c)(p, t)[0]))
        results[policy] = step(params, tokens)
    ref_loss, ref_grads = results["none"]
    for policy in ("full", "selective"):
        loss, grads = results[policy]
        assert abs(float(loss) - float(ref_loss)) <= 1e-6, policy
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


# ----------------------------------------------------------------------------- (d) dropout


def test_lima_hidden_dropout_rates():
    np.testing.assert_allclose(hidden_dropout_rates(4, 0.3, lima=True), [0.0, 0.1, 0.2, 0.3])
    np.testing.assert_allclose(hidden_dropout_rates(3, 0.3, lima=False), [0.3, 0.3, 0.3])


def test_dropout_only_when_not_deterministic(tiny_params):
    params = {"params": nn.meta.unbox(tiny_params)}
    model = Llama(TINY)
    tokens = _tokens((2, 12))
    rates = jnp.asarray(hidden_dropout_rates(TINY.num_hidden_layers, 0.3, lima=True))
    base = model.apply(params, tokens)

    def run(rates, deterministic, seed=0):
        return model.apply(
            params,
            tokens,
            dropout_rates=rates,
            deterministic=deterministic,
            rngs={"dropout": jax.random.key(seed)},
        )

    np.testing.assert_array_equal(run(rates, deterministic=True), base)
    np.testing.assert_allclose(run(jnp.zeros_like(rates), deterministic=False), base, atol=1e-6)
    dropped = run(rates, deterministic=False)
    assert float(jnp.abs(dropped - base)[..., : TINY.vocab_size].max()) > 1e-3
    assert not np.array_equal(dropped, run(rates, deterministic=False, seed=1))


# ----------------------------------------------------------------------------- (e) configs

LLAMA2 = {  # hidden, intermediate, layers, heads, kv heads (Touvron et al. 2023)
    "llama2_7b": (4096, 11008, 32, 32, 32),
    "llama2_13b": (5120, 13824, 40, 40, 40),
    "llama2_70b": (8192, 28672, 80, 64, 8),
}


def _load_config(name: str) -> LlamaConfig:
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return LlamaConfig.from_mapping(module.get_config())


@pytest.mark.parametrize("name", sorted(LLAMA2))
def test_model_configs_have_llama2_constants(name):
    cfg = _load_config(name)
    got = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    )
    assert got == LLAMA2[name]
    assert (cfg.vocab_size, cfg.padded_vocab_size) == (32002, 32128)
    assert cfg.max_position_embeddings == 4096 and cfg.head_size == 128
    assert (cfg.rope_theta, cfg.rope_scaling_factor, cfg.rms_norm_eps) == (10000.0, 1.0, 1e-5)


def test_tiny_config_loads():
    cfg = _load_config("tiny")
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # GQA on the small path too


def _param_count(cfg: LlamaConfig) -> int:
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda t: Llama(cfg).init(jax.random.key(0), t), tokens)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes)))


def test_70b_parameter_count_without_allocating():
    base = dataclasses.replace(_load_config("llama2_70b"), vocab_size=32000)
    assert base.padded_vocab_size == 32000
    assert _param_count(base) == 68_976_648_192 == base.num_params()  # Llama-2-70b-hf
    chatml = _load_config("llama2_70b")  # 32002 rows padded to 32128
    assert _param_count(chatml) == 68_976_648_192 + 2 * 128 * 8192 == chatml.num_params()
