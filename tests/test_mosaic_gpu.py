"""The Mosaic GPU (Hopper) flash kernels: run in jax's GPU interpret mode on CPU against
the XLA reference (values and gradients, the odd shapes of test_attention's Triton tests:
lengths that are not whole blocks, many short packed samples, trailing padding, rows with
nothing to attend, a context-parallel query offset), compiled for an H100 without one
(ptxas: no spill, registers within the launch's per-thread share, shared memory within
227 KiB, wgmma), and the backend chooser.

GPU interpret mode simulates every warpgroup, barrier and TMA copy on the CPU, so the
shapes are the smallest the kernels take (64-row tiles, head dim 64 or 128).  It needs
jax >= 0.11 (CI's Python 3.12 stage); on older jax the kernel tests skip, saying so.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from oasst_jax import sharding
from oasst_jax.attention import dot_product_attention, gpu_backend, mosaic_gpu, ptxas, xla
from oasst_jax.attention.flash import flash_attention

needs_interpret = pytest.mark.skipif(
    bool(mosaic_gpu.unavailable()), reason=mosaic_gpu.unavailable() or "-"
)
needs_compiler = pytest.mark.skipif(
    bool(mosaic_gpu.unavailable() or ptxas.unavailable()),
    reason=mosaic_gpu.unavailable() or ptxas.unavailable() or "-",
)
BF16_TOL = 2e-2  # test_attention's: relative to the reference's largest magnitude
KERNELS = ("mosaic_flash_fwd", "mosaic_flash_dq", "mosaic_flash_dkv")
H100_SHARED_OPTIN = 232448  # bytes of shared memory one block may ask for (227 KiB)
REGISTER_FILE = 65536  # 32-bit registers an SM has, shared by a block's threads


def _inputs(b, q_len, kv_len, heads, kv_heads, dim, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, q_len, heads, dim), jnp.float32)
    k = jax.random.normal(ks[1], (b, kv_len, kv_heads, dim), jnp.float32)
    v = jax.random.normal(ks[2], (b, kv_len, kv_heads, dim), jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v))


def _short_segments(length: int, seed: int = 0) -> np.ndarray:
    """One packed row as the pipeline writes it: a long first sample (whole blocks inside
    it: the unmasked path), samples of 1..12 tokens across block edges, then padding."""
    rng = np.random.default_rng(seed)
    long_len, pad = int(0.45 * length), length // 10
    short = rng.integers(1, 13, length).cumsum()
    short = short[short < length - long_len - pad]
    lengths = np.diff(np.concatenate([[0], short, [length - long_len - pad]]))
    ids = np.repeat(np.arange(2, 2 + len(lengths)), lengths)
    return np.concatenate([np.ones(long_len), ids, np.zeros(pad)]).astype(np.int32)[None]


def _loss_and_grads(attend, q, k, v):
    """Output and d(sum(out * w))/d(q, k, v) for a fixed non-uniform ``w``, jitted."""

    def loss(q, k, v):
        out = attend(q, k, v)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return (out.astype(jnp.float32) * w).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, *grads)


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1.0))


def _check(q, k, v, *, causal, q_seg=None, kv_seg=None, offset=0):
    """Kernel (interpret mode) vs the fp32 XLA reference on the same rounded inputs, within
    BF16_TOL or 1.5x XLA's own low-precision error, like test_attention's bf16 test."""
    kernel = lambda q, k, v: flash_attention(
        q, k, v, q_seg, kv_segment_ids=kv_seg, q_offset=offset, causal=causal,
        softmax_scale=None, block_sizes=None, backend="mosaic_gpu", interpret=True,
    )  # fmt: skip
    static_offset = offset if isinstance(offset, int) else int(offset)
    reference = lambda q, k, v: xla.dot_product_attention(
        q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal,
        q_offset=static_offset,
    )  # fmt: skip
    got = _loss_and_grads(kernel, q, k, v)
    exact = _loss_and_grads(reference, *(x.astype(jnp.float32) for x in (q, k, v)))
    low = _loss_and_grads(reference, q, k, v)
    for name, g, ref, want in zip(("out", "dq", "dk", "dv"), got, low, exact, strict=True):
        assert g.dtype == q.dtype and g.shape == ref.shape, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        err = _rel_err(g, want)
        assert err <= max(BF16_TOL, 1.5 * _rel_err(ref, want)), f"{name}: {err:.2e}"
    return got


@needs_interpret
@pytest.mark.slow  # ~20 s: every warpgroup, barrier and TMA copy simulated
def test_causal_gqa_packed_short_segments_bf16():
    """GQA 4:2 without repeating k/v, bf16, 200 tokens (not whole 128-row tiles), a long
    sample then many short ones across block edges, trailing padding, and rows whose id
    no key has (output 0)."""
    q, k, v = _inputs(1, 200, 200, 4, 2, 64, jnp.bfloat16, seed=1)
    kv_seg = _short_segments(200)
    q_seg = kv_seg.copy()
    q_seg[:, 170:176] = 10**6  # before the padding: nothing to attend
    out = _check(q, k, v, causal=True, q_seg=q_seg, kv_seg=kv_seg)[0]
    np.testing.assert_array_equal(np.asarray(out[:, 170:176], np.float32), 0.0)


@needs_interpret
def test_full_mha_head_dim_128_fp16():
    """Non-causal, no segments, fp16, head dim 128, 100 tokens: padded keys hidden by kv_len."""
    q, k, v = _inputs(1, 100, 100, 2, 2, 128, jnp.float16, seed=2)
    _check(q, k, v, causal=False)


@needs_interpret
def test_query_offset_with_kv_segments():
    """A context-parallel shard: 72 queries at traced offset 100 against 200 gathered keys,
    packed ids, head dim 40 (padded to 64)."""
    q, _, _ = _inputs(1, 72, 72, 4, 1, 40, jnp.bfloat16, seed=3)
    _, k, v = _inputs(1, 200, 200, 4, 1, 40, jnp.bfloat16, seed=4)
    kv_seg = _short_segments(200, seed=5)
    _check(q, k, v, causal=True, q_seg=kv_seg[:, 100:172], kv_seg=kv_seg, offset=jnp.int32(100))


@pytest.fixture(scope="module")
def h100_mesh():
    from oasst_jax.planner import chips

    return sharding.make_mesh({"data": 1}, chips.gpu_devices("h100:1"))


def _compiled_kernels(mesh, head_dim, heads, kv_heads, *, packed, causal, dtype=jnp.bfloat16):
    """ptxas figures of the Mosaic GPU kernels of one fwd+bwd program compiled for sm_90a."""
    rep = NamedSharding(mesh, PartitionSpec())
    q = jax.ShapeDtypeStruct((1, 512, heads, head_dim), dtype, sharding=rep)
    kv = jax.ShapeDtypeStruct((1, 512, kv_heads, head_dim), dtype, sharding=rep)
    seg = jax.ShapeDtypeStruct((1, 512), jnp.int32, sharding=rep) if packed else None

    def loss(q, k, v, seg):
        out = dot_product_attention(
            q, k, v, segment_ids=seg, causal=causal, implementation="pallas",
            backend="mosaic_gpu", interpret=False,
        )  # fmt: skip
        return out.astype(jnp.float32).sum()

    def lower():
        with jax.set_mesh(mesh):
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower()

    _, kernels = ptxas.compile_mosaic_with_resources(lower, KERNELS)
    return {r.kernel: r for r in kernels}


@needs_compiler
@pytest.mark.parametrize(
    "head_dim,heads,kv_heads,packed,causal,dtype",
    [
        pytest.param(64, 8, 2, True, True, jnp.bfloat16, id="d64-gqa-packed"),
        pytest.param(128, 8, 1, True, True, jnp.bfloat16, id="d128-gqa-packed"),
        pytest.param(128, 4, 4, False, False, jnp.float16, id="d128-mha-full-fp16"),
    ],
)
def test_kernels_compile_for_h100_within_budget(
    h100_mesh, head_dim, heads, kv_heads, packed, causal, dtype
):
    """No spill; registers within the launch's share (``65536 / threads``: 168 at two
    compute warpgroups + one memory warpgroup) and the setmaxnreg split within the
    register file; shared memory within 227 KiB; every kernel on wgmma.  At head dim 128
    dk/dv is the Triton kernel (mosaic_gpu.backward), checked by test_pallas_gpu."""
    kernels = _compiled_kernels(
        h100_mesh, head_dim, heads, kv_heads, packed=packed, causal=causal, dtype=dtype
    )
    expected = KERNELS if head_dim <= mosaic_gpu.TRITON_DKV_ABOVE else KERNELS[:2]
    assert sorted(kernels) == sorted(expected)
    for name, r in kernels.items():
        assert not r.problems(), (name, r.problems())
        assert 0 < r.threads and r.registers * r.threads <= REGISTER_FILE, (name, r)
        assert 0 < r.shared_bytes <= H100_SHARED_OPTIN, (name, r)
        assert r.wgmma, name
    for wgs, regs in mosaic_gpu.COMPUTE_REGISTERS.items():
        assert 128 * (wgs * regs + mosaic_gpu.MEMORY_REGISTERS) <= REGISTER_FILE


def _device(capability: str):
    return types.SimpleNamespace(compute_capability=capability, device_kind="test GPU")


def test_backend_chooser():
    """Mosaic GPU on Hopper for the shapes it takes when jax has it; Triton otherwise."""
    hopper = "mosaic_gpu" if not mosaic_gpu.unavailable() else "gpu"
    assert gpu_backend(_device("9.0"), 128, jnp.bfloat16) == hopper
    assert gpu_backend(_device("9.0"), 64, jnp.float16) == hopper
    assert gpu_backend(_device("8.0"), 128, jnp.bfloat16) == "gpu"  # A100: no TMA/wgmma
    assert gpu_backend(_device("9.0"), 128, jnp.float32) == "gpu"  # fp32: Triton's IEEE dots
    assert gpu_backend(_device("9.0"), 256, jnp.bfloat16) == "gpu"


def test_unsupported_inputs_are_refused():
    assert mosaic_gpu.padded_head_dim(40) == 64 and mosaic_gpu.padded_head_dim(80) == 128
    with pytest.raises(ValueError, match="head dim 256 > 128"):
        mosaic_gpu.padded_head_dim(256)
    with pytest.raises(ValueError, match="float32 inputs"):
        mosaic_gpu.default_blocks(64, jnp.float32)


def test_model_config_takes_the_backend():
    from oasst_jax.model import LlamaConfig

    assert LlamaConfig(attention_backend="mosaic_gpu").attention_backend == "mosaic_gpu"
    with pytest.raises(ValueError, match="attention_backend='cuda'"):
        LlamaConfig(attention_backend="cuda")
