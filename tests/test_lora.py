"""LoRA and QLoRA (oasst_jax/lora.py and its seams in model, train_step, train, checkpoint).

Tolerances: fp32 compute throughout; the base is held in float32 where results are
compared with the plain model (exact: B = 0 adds exactly 0), 1e-5 for sharded vs single
device (reduction order differs), as tests/test_train_step.py.  Quantized bases: the
element-wise bound of symmetric absmax quantization, half a code step times the block's
absmax (int8: 0.5/127; nf4: half NF4's widest code gap, -1 to -0.696: 0.152), plus bf16
rounding.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_diff, tiny_llama
from flax import linen as nn
from test_train_step import _batch, _optim_cfg

from oasst_jax import checkpoint, lora, optim, sharding
from oasst_jax.model import Llama
from oasst_jax.train_step import StepConfig, build_trainer

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _cfg(base_dtype="float32", **kw):
    fields = dict(lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS, lora_base_dtype=base_dtype)
    return tiny_llama(**{"initializer_range": 0.02, **fields, **kw})


def _trainer(cfg, mesh_shape, accum, micro, devices=None, hidden_dropout=0.0, stages=1):
    mesh = sharding.make_mesh(mesh_shape, devices)
    tx = optim.make_optimizer(_optim_cfg(), 10)
    rates = np.full((cfg.num_hidden_layers,), hidden_dropout, np.float32)
    step_cfg = StepConfig(accum, micro, pipeline_stages=stages)
    with jax.set_mesh(mesh):
        t = build_trainer(Llama(cfg), tx, optim.schedule(_optim_cfg(), 10), step_cfg, rates, mesh)
    return t, mesh


def _run(t, mesh, batch, steps=2, state=None):
    with jax.set_mesh(mesh):
        state = t.init_random(jax.random.key(0)) if state is None else state
        b = {k: jax.device_put(v, t.batch_sharding) for k, v in batch.items()}
        losses = []
        for _ in range(steps):
            state, m = t.step(state, b)
            losses.append(float(m["loss"]))
    return state, losses


def _dot_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in a (closed) jaxpr, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out += [tuple(v.aval.shape) for v in eqn.outvars]
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    out += _dot_shapes(getattr(inner, "jaxpr", inner))
    return out


@pytest.fixture(scope="module")
def one_device():
    """A float32-base LoRA trainer on one device, its fresh state and 2 trained steps."""
    cfg = _cfg()
    t, mesh = _trainer(cfg, {}, 1, 4, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        fresh = jax.device_get(t.init_random(jax.random.key(0)))
    state, losses = _run(t, mesh, _batch(1, 4), steps=3)
    return cfg, t, mesh, fresh, jax.device_get(state), losses


def test_b_zero_gives_the_base_models_logits(one_device):
    """A fresh adapter (B = 0) leaves the model the frozen base's: every B is exactly 0, and
    the logits equal the plain model's up to float rounding (two programs, which XLA may
    tile and fuse differently: an exact match there would test the compiler)."""
    cfg, t, mesh, fresh, _, _ = one_device
    tokens = _batch(1, 4)["inputs"][0]
    with jax.set_mesh(mesh):
        ours = jax.jit(Llama(cfg).apply)({"params": t.eval_params(fresh)}, tokens)
        plain = Llama(lora.base_model_config(cfg))
        base = jax.jit(plain.apply)({"params": fresh["frozen"]}, tokens)
    b_leaves = [
        v
        for k, v in jax.tree_util.tree_leaves_with_path(fresh["params"])
        if "lora_b" in jax.tree_util.keystr(k)
    ]
    assert b_leaves and all(not np.any(b) for b in b_leaves)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(base), rtol=1e-6, atol=1e-6)


def test_training_changes_only_adapters_and_no_base_gradient(one_device):
    """Training moves the adapters only (the base bit for bit), the optimizer holds moments
    for the adapters alone, and the step never computes a base kernel's gradient."""
    cfg, t, mesh, fresh, trained, losses = one_device
    assert losses[2] < losses[0]
    assert max_diff(fresh["frozen"], trained["frozen"]) == 0.0
    assert max_diff(fresh["params"], trained["params"]) > 0
    assert set(fresh) == {"step", "params", "frozen", "opt_state"}
    # the optimizer holds moments for the adapters only
    n_adapter = sum(x.size for x in jax.tree.leaves(trained["params"]))
    n_opt = sum(x.size for x in jax.tree.leaves(trained["opt_state"]) if x.ndim)
    assert n_opt == 2 * n_adapter
    # no dot_general of the step produces a base kernel's (per-layer) shape: the weight
    # gradients of q/k/v/o/gate/up/down, embedding and LM head are never computed; the
    # full fine-tuning step, traced the same way, does compute them (the check can fail)
    kernels = {
        tuple(sorted(x.shape[1:] if lora.LAYERS_PATH[0] in jax.tree_util.keystr(p) else x.shape))
        for p, x in jax.tree_util.tree_leaves_with_path(fresh["frozen"])
        if x.ndim >= 3 or (x.ndim == 2 and lora.LAYERS_PATH[0] not in jax.tree_util.keystr(p))
    }
    batch = {k: jax.device_put(v, t.batch_sharding) for k, v in _batch(1, 4).items()}
    with jax.set_mesh(mesh):
        lora_dots = _dot_shapes(t.step.trace(t.abstract_state, batch).jaxpr.jaxpr)
        full, _ = _trainer(lora.base_model_config(cfg), {}, 1, 4, devices=jax.devices()[:1])
        full_dots = _dot_shapes(full.step.trace(full.abstract_state, batch).jaxpr.jaxpr)
    assert not kernels & {tuple(sorted(s)) for s in lora_dots}
    assert kernels <= {tuple(sorted(s)) for s in full_dots}


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_shape,base_dtype,stages",
    [
        ({"fsdp": 2, "sequence": 2, "tensor": 2}, "nf4", 1),
        ({"pipeline": 2, "fsdp": 2, "tensor": 2}, "int8", 2),
    ],
    ids=["fsdp2-seq2-tp2-nf4", "pp2-fsdp2-tp2-int8"],
)
def test_sharded_lora_step_equals_single_device(mesh_shape, base_dtype, stages):
    """Two quantized-base LoRA steps (init included) on fsdp x sequence x tensor (nf4, with
    LoRA and hidden dropout) and on pipeline x fsdp x tensor (int8): the losses and adapters
    of one device (1e-5), adapters and quantized base sharded by their logical axes."""
    cfg = _cfg(base_dtype, lora_dropout=0.0 if stages > 1 else 0.1)
    dropout = 0.0 if stages > 1 else 0.1
    accum, rows = (2, 2) if stages > 1 else (1, 4)
    batch = _batch(accum, rows, seed=7)
    t1, m1 = _trainer(cfg, {}, accum, rows, devices=jax.devices()[:1], hidden_dropout=dropout)
    single, l1 = _run(t1, m1, batch)
    micro = rows if stages > 1 else 2
    t8, m8 = _trainer(cfg, mesh_shape, accum, micro, hidden_dropout=dropout, stages=stages)
    sharded, l8 = _run(t8, m8, batch)
    assert np.allclose(l1, l8, atol=1e-5), (l1, l8)
    assert max_diff(jax.device_get(single["params"]), jax.device_get(sharded["params"])) < 1e-5
    attn = sharded["params"]["decoder"]["layers"]["attn"]
    assert attn["q_lora_a"].sharding.spec == sharding.logical_spec(("layers", "embed", "lora_rank"))
    assert attn["q_lora_b"].sharding.spec == sharding.logical_spec(
        ("layers", "lora_rank", "heads", "head_dim")
    )
    q = sharded["frozen"]["decoder"]["layers"]["attn"]["q"]
    assert q.qvalue.sharding.spec == sharding.logical_spec(("layers", "embed", "heads", "head_dim"))


@pytest.mark.parametrize("kind,bound", [("int8", 0.5 / 127), ("nf4", 0.152)])
def test_quantized_base_error_bound(kind, bound):
    """Every dequantized weight is within ``bound`` x its block's absmax of the bf16
    weight (symmetric absmax quantization: half a code step), plus bf16's rounding."""
    w = jax.random.normal(jax.random.key(1), (2, 128, 4, 16), jnp.float32) * 0.02
    w = w.astype(jnp.bfloat16).astype(jnp.float32)
    q = lora.quantize_kernel(w, kind, 1)
    assert q.scale.shape == (2, 128 // lora.QUANT_BLOCK, 4, 16)
    from oasst_jax.model import as_weight

    err = np.abs(np.asarray(as_weight(q, jnp.float32)) - np.asarray(w))
    blocks = np.abs(np.asarray(w)).reshape(2, 2, 64, 4, 16).max(axis=2, keepdims=True)
    limit = np.broadcast_to(blocks, (2, 2, 64, 4, 16)).reshape(w.shape) * (bound + 2**-8)
    assert np.all(err <= limit)
    rel_rms = float(np.sqrt(np.mean(err**2)) / np.std(np.asarray(w)))
    assert rel_rms < {"int8": 0.01, "nf4": 0.12}[kind], rel_rms


@pytest.mark.slow
def test_qlora_loss_curve_follows_lora():
    """20 steps on one fixed batch: the nf4 base's losses stay within 0.15 (nats) of the
    float32 base's at every step, and both fall."""
    batch = _batch(1, 4, seed=11)
    curves = {}
    for kind in ("float32", "nf4"):
        cfg = _cfg(kind, initializer_range=0.2)
        t, mesh = _trainer(cfg, {}, 1, 4, devices=jax.devices()[:1])
        _, curves[kind] = _run(t, mesh, batch, steps=20)
    a, b = np.array(curves["float32"]), np.array(curves["nf4"])
    assert a[-1] < a[0] - 0.5 and b[-1] < b[0] - 0.5, (a, b)
    assert np.max(np.abs(a - b)) < 0.15, (a, b)


def test_merge_weights_is_base_plus_scaled_ba(one_device):
    """``merge_weights``: each target is base + (alpha / r) B A; the merged plain model
    gives the adapted model's logits."""
    cfg, _, _, _, trained, _ = one_device
    merged = lora.merge_weights(trained["frozen"], trained["params"], cfg)
    layers, adapters = merged["decoder"]["layers"], trained["params"]["decoder"]["layers"]
    base = trained["frozen"]["decoder"]["layers"]
    for _, (module, kernel), _ in lora.adapter_pairs(cfg):
        a = adapters[module][f"{kernel}_lora_a"]
        b = adapters[module][f"{kernel}_lora_b"]
        r = cfg.lora_rank
        for i in range(cfg.num_hidden_layers):
            ba = (a[i].reshape(-1, r) @ b[i].reshape(r, -1)).reshape(base[module][kernel][i].shape)
            want = base[module][kernel][i] + cfg.lora_alpha / r * ba
            np.testing.assert_allclose(layers[module][kernel][i], want, rtol=1e-6, atol=1e-7)
    # and the merged plain model gives the adapted model's logits
    tokens = _batch(1, 4)["inputs"][0]
    adapted = lora.merge(trained["params"], trained["frozen"])
    ours = jax.jit(Llama(cfg).apply)({"params": adapted}, tokens)
    plain = jax.jit(Llama(lora.base_model_config(cfg)).apply)({"params": merged}, tokens)
    assert max_diff(ours, plain) < 1e-4


# ------------------------------------------------------------------ the loop


def _loop_cfg(sample_data, workdir, load, **kw):
    from test_cli_train import _tiny_cfg

    cfg = _tiny_cfg(sample_data, workdir, **{"eval_interval": 0, "save_interval": 0, **kw})
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.1
    cfg.lora.base_dtype = "nf4"
    cfg.load = load
    return cfg


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """Two different random bases for configs/tiny.py's model, as orbax checkpoints."""
    from oasst_jax.config import load_config, model_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    mcfg = model_config(cfg)
    root = tmp_path_factory.mktemp("bases")
    out = []
    for seed in (0, 1):
        params = nn.meta.unbox(
            Llama(mcfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
        )
        checkpoint.save_weights(str(root / f"base{seed}"), jax.device_get(params), mcfg)
        out.append(str(root / f"base{seed}"))
    return out


@pytest.mark.slow
def test_resume_is_bit_exact_and_refuses_another_base(sample_data, tiny_base, tmp_path):
    """An nf4-base LoRA run of 4 steps, and the same run resumed from its step-2 checkpoint
    (alone in a new workdir; what a run stopped after step 2 saves): identical losses.  The
    checkpoint holds the adapters alone (a quarter of the base's bytes at most) and records
    the base; resuming over another base is refused in one line, nothing deleted."""
    import shutil

    from test_cli_train import _metrics

    from oasst_jax.cli.train import run

    run(_loop_cfg(sample_data, tmp_path / "a", tiny_base[0], train_iters=4, save_interval=2))
    ckpt = tmp_path / "b" / "checkpoints"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "2", ckpt / "2")
    first = _loop_cfg(sample_data, tmp_path / "b", tiny_base[0], train_iters=4)
    meta = checkpoint.load_json_item(str(ckpt), "meta", 2)
    assert meta[lora.BASE_META]["path"] == tiny_base[0]
    # adapter-only: the saved params are the adapters alone
    reader_dir = ckpt / "2" / "params"
    saved = checkpoint.ParamReader(str(ckpt), 2)
    assert saved.shape(("decoder", "layers", "attn", "q_lora_a")) == (4, 128, 4)
    with pytest.raises(ValueError, match="NOT_FOUND"):
        saved.shape(("decoder", "layers", "attn", "q"))
    assert _dir_bytes(reader_dir) < _dir_bytes(os.path.join(tiny_base[0], "0", "params")) / 4
    run(first)
    a = [r["loss"] for r in _metrics(tmp_path / "a")]
    b = [r["loss"] for r in _metrics(tmp_path / "b")]
    assert a[2:] == b and len(a) == 4  # identical floats, steps 3 and 4
    other = _loop_cfg(sample_data, tmp_path / "b", tiny_base[1], train_iters=6)
    with pytest.raises(ValueError, match="was trained on another base") as e:
        run(other)
    assert "\n" not in str(e.value) and tiny_base[0] in str(e.value)
    assert sorted(os.listdir(ckpt)) == ["2", "4"]  # nothing set aside or deleted


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_lora_config_errors_are_one_line():
    """A bad ``lora.targets`` or ``lora.base_dtype`` is refused in one line naming it."""
    from oasst_jax.config import base_config, model_config

    cfg = base_config()
    cfg.model = dict(dataclasses.asdict(tiny_llama()))
    cfg.lora.rank = 4
    cfg.lora.targets = "q_proj,qkv"
    with pytest.raises(ValueError, match="lora: targets='q_proj,qkv' names 'qkv'"):
        model_config(cfg)
    cfg.lora.targets, cfg.lora.base_dtype = "q_proj", "int4"
    with pytest.raises(ValueError, match="lora: base_dtype='int4'"):
        model_config(cfg)
