"""Pallas flash attention vs the XLA reference (CPU, interpret mode).

Errors are measured relative to the reference's largest magnitude, so one
tolerance serves outputs and gradients of different scales: fp32 1e-5; bf16
2e-2 (bf16 inputs, both sides compared with the fp32 reference on the same
rounded inputs, the kernel must not be worse than XLA's own bf16 path by more
than that).  The GPU (Triton) kernel is the default on CPU; the TPU (Mosaic)
kernel runs a subset under Mosaic interpret mode, and both are lowered for
their real platforms to catch lowering errors that interpret mode cannot see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama
from jax.sharding import AbstractDevice, AbstractMesh, Mesh, NamedSharding, PartitionSpec

from oasst_jax import sharding
from oasst_jax.attention import BlockSizes, bounds, dot_product_attention, pallas_gpu, xla
from oasst_jax.attention.blocks import KernelConfig, MaskOperands
from oasst_jax.attention.flash import _flash, flash_attention
from oasst_jax.model import Llama

FP32_TOL = 1e-5
BF16_TOL = 2e-2
GPU_BLOCKS = BlockSizes.uniform(32)
# Different tiles per kernel, so padding to the largest (64) and the dq/dkv
# loop bounds are exercised with unequal block counts.
GPU_MIXED = BlockSizes(
    block_q=64, block_k=32, block_q_dkv=32, block_k_dkv=64, block_q_dq=64, block_k_dq=32
)
TPU_BLOCKS = BlockSizes.uniform(128)  # 128 lanes is the smallest legal TPU key tile
H100_KIND = "NVIDIA H100 80GB HBM3"


def _segments(length: int, batch: int = 1) -> np.ndarray:
    """Three packed samples of different lengths per row (ids 1, 2, 3)."""
    a, b = length // 4, length // 2
    row = np.array([1] * a + [2] * b + [3] * (length - a - b), np.int32)
    return np.tile(row, (batch, 1))


def _inputs(b: int, length: int, heads: int, kv_heads: int, dim: int, dtype, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, length, heads, dim), jnp.float32)
    k = jax.random.normal(ks[1], (b, length, kv_heads, dim), jnp.float32)
    v = jax.random.normal(ks[2], (b, length, kv_heads, dim), jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v))


def _loss_and_grads(impl: str, q, k, v, seg, causal: bool, **kw):
    """Attention output and d(sum(out * w))/d(q, k, v) for a fixed non-uniform ``w``."""

    def loss(q, k, v):
        out = dot_product_attention(
            q, k, v, segment_ids=seg, causal=causal, implementation=impl, **kw
        )
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return (out.astype(jnp.float32) * w).sum(), out

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = grad_fn(q, k, v)
    return (out, *grads)


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1.0))


def _assert_matches(got, want, tol: float) -> None:
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        err = _rel_err(g, w)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


CASES = [
    # (length, heads, kv_heads, dim, packed, blocks, softmax_scale)
    pytest.param(128, 8, 2, 32, False, GPU_BLOCKS, None, id="gqa"),
    pytest.param(128, 8, 2, 64, True, GPU_BLOCKS, None, id="gqa-packed"),
    pytest.param(100, 4, 4, 32, True, GPU_BLOCKS, None, id="mha-packed-len100"),
    pytest.param(150, 8, 2, 32, False, GPU_MIXED, 0.3, id="gqa-len150-mixed-blocks-scale0.3"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("length,heads,kv_heads,dim,packed,blocks,scale", CASES)
def test_gpu_kernel_fp32(length, heads, kv_heads, dim, packed, blocks, scale, causal):
    q, k, v = _inputs(2 if packed else 1, length, heads, kv_heads, dim, jnp.float32)
    seg = _segments(length, q.shape[0]) if packed else None
    want = _loss_and_grads("xla", q, k, v, seg, causal, softmax_scale=scale)
    got = _loss_and_grads("pallas", q, k, v, seg, causal, softmax_scale=scale, block_sizes=blocks)
    _assert_matches(got, want, FP32_TOL)


@pytest.mark.parametrize(
    "backend,blocks,causal,packed",
    [
        ("gpu", GPU_BLOCKS, True, True),
        ("gpu", GPU_MIXED, False, False),
        ("tpu", TPU_BLOCKS, True, True),
    ],
)
def test_bf16(backend, blocks, causal, packed):
    # 4 query heads on 2 KV heads: GQA, and a wrong query -> KV head map shows (an
    # interpreted kernel's time follows its grid, heads included)
    q, k, v = _inputs(1, 200, 4, 2, 64, jnp.bfloat16, seed=1)
    seg = _segments(200) if packed else None
    exact = _loss_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)), seg, causal)
    kernel = _loss_and_grads("pallas", q, k, v, seg, causal, block_sizes=blocks, backend=backend)
    xla_bf16 = _loss_and_grads("xla", q, k, v, seg, causal)
    names = ("out", "dq", "dk", "dv")
    for name, got, ref, want in zip(names, kernel, xla_bf16, exact, strict=True):
        assert got.dtype == jnp.bfloat16, name
        err = _rel_err(got, want)
        assert err <= max(BF16_TOL, 1.5 * _rel_err(ref, want)), f"{name}: {err:.2e}"


@pytest.mark.parametrize(
    "length,heads,kv_heads,causal,packed",
    [(200, 4, 2, True, True), (200, 4, 4, False, False)],
    ids=["gqa-causal-packed-len200", "mha-full-len200"],
)
def test_tpu_kernel_fp32(length, heads, kv_heads, causal, packed):
    q, k, v = _inputs(1, length, heads, kv_heads, 64, jnp.float32, seed=2)
    seg = _segments(length) if packed else None
    want = _loss_and_grads("xla", q, k, v, seg, causal)
    got = _loss_and_grads("pallas", q, k, v, seg, causal, block_sizes=TPU_BLOCKS, backend="tpu")
    _assert_matches(got, want, FP32_TOL)


def _offset_loss_and_grads(attend, q, k, v):
    """Like :func:`_loss_and_grads` for an ``attend(q, k, v)`` closure."""

    def loss(q, k, v):
        out = attend(q, k, v)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return (out * w).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, *grads)


OFFSET_CASES = [
    # (backend, q_len, kv_len, q_offset, causal, packed, traced offset)
    pytest.param("gpu", 48, 160, 70, True, True, True, id="gpu-causal-packed-traced"),
    pytest.param("gpu", 48, 160, 112, True, False, False, id="gpu-causal-last-rows"),
    pytest.param("gpu", 48, 160, 70, False, True, True, id="gpu-full-packed-traced"),
    pytest.param("tpu", 100, 300, 150, True, True, True, id="tpu-causal-packed-traced"),
    pytest.param("tpu", 100, 300, 150, False, False, False, id="tpu-full", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("backend,q_len,kv_len,offset,causal,packed,traced", OFFSET_CASES)
def test_query_offset_and_kv_segments(backend, q_len, kv_len, offset, causal, packed, traced):
    """A slice of queries at ``q_offset`` against all keys (one context-parallel shard):
    kernel == XLA reference in output and dq/dk/dv.  Lengths are not whole blocks
    and the offset is not block-aligned, so the offset block bounds are exercised."""
    q, _, _ = _inputs(2, q_len, 4, 1, 32, jnp.float32, seed=6)
    _, k, v = _inputs(2, kv_len, 4, 1, 32, jnp.float32, seed=7)
    kv_seg = _segments(kv_len, 2) if packed else None
    q_seg = kv_seg[:, offset : offset + q_len] if packed else None
    kw = dict(segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal)
    blocks = GPU_BLOCKS if backend == "gpu" else TPU_BLOCKS
    q_offset = jnp.int32(offset) if traced else offset
    kernel = lambda q, k, v: flash_attention(
        q, k, v, q_seg, kv_segment_ids=kv_seg, q_offset=q_offset, causal=causal,
        softmax_scale=None, block_sizes=blocks, backend=backend, interpret=True,
    )  # fmt: skip
    reference = lambda q, k, v: xla.dot_product_attention(q, k, v, q_offset=offset, **kw)
    got = _offset_loss_and_grads(kernel, q, k, v)
    want = _offset_loss_and_grads(reference, q, k, v)
    _assert_matches(got, want, FP32_TOL)


def _short_segments(length: int, batch: int, long: float = 0.4, seed: int = 0) -> np.ndarray:
    """Packed rows as the data pipeline writes them, with every block-skipping case:
    one sample over the first ``long`` of the row (whole blocks inside one sample: the
    unmasked path), then samples of 1..12 tokens crossing block edges, then ~10 %
    trailing padding (id 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        long_len, pad = int(long * length), length // 10
        short = np.minimum(rng.integers(1, 13, length), length - long_len - pad).cumsum()
        short = short[short <= length - long_len - pad]
        lengths = np.diff(np.concatenate([[0], short, [length - long_len - pad]]))
        ids = np.repeat(np.arange(2, 2 + len(lengths)), lengths)
        rows.append(np.concatenate([np.ones(long_len), ids, np.zeros(pad)]))
    return np.stack(rows).astype(np.int32)


PACKED_ROW_CASES = [
    # (backend, blocks, causal, length): lengths not whole blocks; the first sample
    # covers 80 % (GPU) / 85 % (TPU), so causal blocks wholly inside it exist
    pytest.param("gpu", GPU_MIXED, True, 160, id="gpu-causal"),
    pytest.param("gpu", GPU_MIXED, False, 160, id="gpu-full"),
    pytest.param("tpu", TPU_BLOCKS, True, 300, id="tpu-causal", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("backend,blocks,causal,length", PACKED_ROW_CASES)
def test_packed_rows_with_short_segments_and_masked_rows(backend, blocks, causal, length):
    """Many short samples crossing block edges, trailing padding, and query rows whose
    id no key has (nothing to attend: zeros, zero gradients): kernel == XLA."""
    q, k, v = _inputs(2, length, 2, 1, 32, jnp.float32, seed=8)
    kv_seg = _short_segments(length, 2, long=0.8 if backend == "gpu" else 0.86)
    unattending = slice(length - length // 10 - 4, length - length // 10)  # before padding
    q_seg = kv_seg.copy()
    q_seg[:, unattending] = 10**6
    kernel = lambda q, k, v: flash_attention(
        q, k, v, q_seg, kv_segment_ids=kv_seg, causal=causal, softmax_scale=None,
        block_sizes=blocks, backend=backend, interpret=True,
    )  # fmt: skip
    reference = lambda q, k, v: xla.dot_product_attention(
        q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal
    )
    got = _offset_loss_and_grads(kernel, q, k, v)
    _assert_matches(got, _offset_loss_and_grads(reference, q, k, v), FP32_TOL)
    np.testing.assert_array_equal(got[0][:, unattending], 0.0)


def _touched_and_full(elem: np.ndarray, bq: int, bk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block pair of a boolean ``[b, lq, lk]`` element mask: any / all True."""
    b, lq, lk = elem.shape
    blocks = elem.reshape(b, lq // bq, bq, lk // bk, bk)
    return blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))


def _check_bounds(bnd: np.ndarray, touched: np.ndarray, full: np.ndarray) -> None:
    """Every attending block lies in ``[lo, hi)`` and every block of the unmasked run is full."""
    idx = np.arange(touched.shape[-1])
    lo, full_lo, full_hi, hi = (bnd[..., f, None] for f in range(bounds.N_FIELDS))
    assert (lo <= full_lo).all() and (full_lo <= full_hi).all() and (full_hi <= hi).all()
    assert not (touched & ((idx < lo) | (idx >= hi))).any(), "an attending block is skipped"
    unmasked = (idx >= full_lo) & (idx < full_hi)
    assert not (unmasked & ~full).any(), "a partly masked block takes the unmasked path"


def _kernel_tiles(dim: int) -> dict[str, tuple[int, int]]:
    """(block_q, block_k) of each GPU kernel at the default tiles, plus uniform 128."""
    b = pallas_gpu.default_blocks(dim)
    return {
        "128x128": (128, 128),
        "fwd": (b.block_q, b.block_k),
        "dq": (b.block_q_dq, b.block_k_dq),
        "dkv": (b.block_q_dkv, b.block_k_dkv),
    }


def _kernel_visits(seg: np.ndarray, offset: int, tiles: dict) -> dict:
    """Per tile pair: fwd/dq bounds, dk/dv bounds and the blocks each visits per row, as
    the kernels compute them (causal), in one compiled call."""
    cfg = KernelConfig(
        causal=True,
        scale=1.0,
        blocks=GPU_BLOCKS,  # unused: the tiles come in as arguments
        kv_len=None,
        has_segments=True,
        interpret=True,
        backend="gpu",
    )
    q_seg = seg[:, offset:]
    mask = MaskOperands(jnp.asarray(q_seg), jnp.asarray(seg), jnp.full((1,), offset, jnp.int32))
    dims = (q_seg.shape[1], seg.shape[1])

    def visits(m, bq: int, bk: int):
        rest = (*dims, bq, bk, cfg, seg.shape[0])
        kv_b, q_b = bounds.kv_loop_bounds(m, *rest), bounds.q_loop_bounds(m, *rest)
        count = lambda b: jnp.stack([bounds.visited_blocks(row) for row in b])
        return kv_b, q_b, count(kv_b), count(q_b)

    run = lambda m: {name: visits(m, *t) for name, t in tiles.items()}

    return jax.tree.map(np.asarray, jax.jit(run)(mask))


def _assert_visits_are_exact(seg: np.ndarray, offset: int) -> dict[str, np.ndarray]:
    """Each kernel's bounds (:func:`_check_bounds`) visit exactly the attending blocks;
    returns the blocks visited per row for each tile pair."""
    pos = np.arange(seg.shape[1])
    causal = (pos[offset:, None] >= pos[None, :])[None]
    elem = causal & (seg[:, offset:, None] == seg[:, None, :])
    tiles = _kernel_tiles(128)
    visited = {}
    for name, (kv_b, q_b, kv_n, q_n) in _kernel_visits(seg, offset, tiles).items():
        touched, full = _touched_and_full(elem, *tiles[name])
        _check_bounds(kv_b, touched, full)
        _check_bounds(q_b, touched.swapaxes(1, 2), full.swapaxes(1, 2))
        want = touched.sum(axis=(1, 2))
        np.testing.assert_array_equal(kv_n, want, name)
        np.testing.assert_array_equal(q_n, want, name)
        visited[name] = want
    return visited


def test_blocks_visited_are_the_blocks_that_attend():
    """4096-token rows of 1, 4 and 8 equal samples: each kernel visits exactly the block
    pairs holding an attending (query, key) pair -- with 128-blocks 528 causal blocks
    for one sample, 144 (27 %) for four, 80 (15 %) for eight."""
    length = 4096
    seg = np.stack([np.repeat(np.arange(1, n + 1), length // n) for n in (1, 4, 8)])
    visited = _assert_visits_are_exact(seg.astype(np.int32), 0)
    np.testing.assert_array_equal(visited["128x128"], [528, 144, 80])


def test_blocks_visited_on_irregular_rows_with_an_offset():
    """Short samples crossing block edges, trailing padding (id 0) and a context-parallel
    query offset: still exactly the attending blocks, none skipped, none in vain."""
    _assert_visits_are_exact(_short_segments(1024, 2, seed=3), 256)


def test_default_tiles_keep_dkv_accumulators_in_registers():
    """The review's spill: two fp32 128x128 dk/dv accumulators need 128 registers per
    thread even at 8 warps, so at head dim 128 the key tile drops to 64 (still a
    wgmma M); at head dim 64 the 128 tile fits."""
    assert pallas_gpu.default_blocks(128).block_k_dkv == 64
    assert pallas_gpu.default_blocks(64).block_k_dkv == 128
    assert pallas_gpu._num_warps(pallas_gpu._live_fp32(2, 64, 128, 32, 64)) == 8


def _lowering_target(platform: str):
    """The context a kernel is lowered for ``platform`` in: for CUDA an abstract H100 (jax
    >= 0.11 reads the Triton target from the device and has none on a CPU; 0.10 took it
    as given), for TPU nothing (Mosaic lowers without a device)."""
    if platform != "cuda":
        return contextlib.nullcontext()
    h100 = AbstractDevice(device_kind=H100_KIND, num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=h100))


def test_triton_ir_uses_wgmma_shapes_and_exp2():
    """Lower fwd+bwd for CUDA (70B shard layout, packed) and read each kernel's Triton IR:
    every dot of dk/dv has M >= 64 (Hopper wgmma; the FA2 ``k @ q^T`` orientation),
    and no kernel calls libdevice ``expf`` (the softmax is ``exp2``)."""
    from jax._src.pallas.triton import lowering

    modules, lower = {}, lowering.lower_jaxpr_to_triton_module

    def spy(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        modules[jaxpr.debug_info.func_name] = result.module.operation.get_asm()
        return result

    q = jax.ShapeDtypeStruct((2, 1024, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1024, 1, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)

    def loss(q, k, v, seg):
        out = dot_product_attention(
            q, k, v, segment_ids=seg, implementation="pallas", backend="gpu", interpret=False
        )
        return out.astype(jnp.float32).sum()

    with pytest.MonkeyPatch.context() as mp, _lowering_target("cuda"):
        mp.setattr(lowering, "lower_jaxpr_to_triton_module", spy)
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(
            lowering_platforms=("cuda",)
        )
    assert set(modules) == {"flash_fwd", "flash_dq", "flash_dkv"}
    dot = re.compile(r"tt\.dot .*-> tensor<(\d+)x(\d+)xf32>")
    dkv_rows = [int(m.group(1)) for m in dot.finditer(modules["flash_dkv"])]
    assert len(dkv_rows) >= 4 and min(dkv_rows) >= 64, dkv_rows
    for name, text in modules.items():
        assert "__nv_expf" not in text and "__nv_exp2f" in text, name


def test_causal_queries_past_the_keys_are_rejected():
    q, k, v = _inputs(1, 32, 2, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="past the last"):
        flash_attention(
            q, k, v, None, q_offset=1, causal=True, softmax_scale=None,
            block_sizes=GPU_BLOCKS, backend="gpu", interpret=True,
        )  # fmt: skip


@pytest.mark.parametrize(
    "backend,blocks", [("gpu", GPU_BLOCKS), ("tpu", TPU_BLOCKS)], ids=["gpu", "tpu"]
)
def test_fully_masked_rows_give_zeros_not_nan(backend, blocks):
    """Rows that see no key (here: every key hidden) output 0 with 0 gradients.

    Self-attention through the public API always lets a row see itself, so the
    kernel is driven directly with every key beyond ``kv_len = 0``.
    """
    q, k, v = _inputs(1, 128, 4, 2, 32, jnp.float32, seed=4)
    cfg = KernelConfig(
        causal=False,
        scale=0.2,
        blocks=blocks,
        kv_len=0,
        has_segments=False,
        interpret=True,
        backend=backend,
    )
    mask = MaskOperands(None, None, jnp.zeros((1,), jnp.int32))
    loss = lambda q, k, v: _flash(q, k, v, mask, cfg).sum()
    # jitted: eager, every op of the interpreted kernel would compile on its own
    out, grads = jax.jit(
        lambda q, k, v: (_flash(q, k, v, mask, cfg), jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
    )(q, k, v)
    np.testing.assert_array_equal(out, 0.0)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("implementation", ["pallas", "cudnn"])
def test_dropout_is_rejected(implementation):
    q, k, v = _inputs(1, 32, 2, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="dropout"):
        dot_product_attention(
            q, k, v, implementation=implementation, dropout_rate=0.1, dropout_rng=jax.random.key(0)
        )


def _mesh_run(mesh, q, k, v, seg):
    """Forward + grads under ``jax.set_mesh`` with batch/head-sharded inputs."""
    specs = {
        "q": ("batch", None, "act_heads", None),
        "kv": ("batch", None, "act_kv_heads", None),
        "seg": ("batch", None),
    }
    put = lambda x, names: jax.device_put(x, sharding.logical_sharding(mesh, names))
    args = (put(q, specs["q"]), put(k, specs["kv"]), put(v, specs["kv"]), put(seg, specs["seg"]))
    run = jax.jit(
        lambda q, k, v, s: _loss_and_grads("pallas", q, k, v, s, True, block_sizes=GPU_BLOCKS)
    )
    with jax.set_mesh(mesh):
        return run(*args), run.lower(*args).compile().as_text()


def test_sharded_equals_unsharded():
    q, k, v = _inputs(4, 64, 8, 2, 32, jnp.float32, seed=5)
    seg = _segments(64, 4)
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2, "data": 2})
    got, hlo = _mesh_run(mesh, q, k, v, seg)
    want = _loss_and_grads("pallas", q, k, v, seg, True, block_sizes=GPU_BLOCKS)
    assert all(isinstance(g.sharding, NamedSharding) for g in got)
    # Not bitwise on every CPU: a gradient that is zero in exact arithmetic (a query that
    # sees only itself) comes out 0 on one side and ~1e-6 rounding noise on the other.
    _assert_matches(got, want, FP32_TOL)
    # Each device ran the kernel on its own shard: nothing was gathered.
    assert "all-gather" not in hlo


def _collective_shapes(hlo: str, op: str) -> list[str]:
    """Result shapes (layouts dropped) of every ``op``, e.g. ``all-gather``, in compiled HLO."""
    return sorted(re.findall(rf"= ([^\s{{]+)\S* {op}(?:-start)?\(", hlo))


def test_sequence_sharded_equals_unsharded():
    """Context parallelism: each shard keeps its queries and gathers only k, v, key ids."""
    q, k, v = _inputs(2, 64, 4, 2, 32, jnp.float32)
    seg = _segments(64, 2)
    mesh = sharding.make_mesh({"sequence": 2, "tensor": 2, "data": 2})
    got, hlo = _mesh_run(mesh, q, k, v, seg)
    want = _loss_and_grads("pallas", q, k, v, seg, True, block_sizes=GPU_BLOCKS)
    # Not bitwise: dk/dv are summed over shards and delta is reduced per shard.
    _assert_matches(got, want, FP32_TOL)
    # Per device: 1 of 2 batch rows, 2 of 4 q heads, 1 of 2 kv heads, 32 of 64 positions.
    # k and v (and the key segment ids) are gathered to the full 64; q never is
    # (that would be f32[1,64,2,32]), and dk/dv are reduce-scattered back.
    kv_full, kv_local = "f32[1,64,1,32]", "f32[1,32,1,32]"
    assert _collective_shapes(hlo, "all-gather") == [kv_full, kv_full, "s32[1,64]"]
    assert _collective_shapes(hlo, "reduce-scatter") == [kv_local, kv_local]


@pytest.mark.parametrize(
    "backend,platform,marker",
    [("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")],
)
@pytest.mark.parametrize(
    "packed,dtype", [(False, jnp.bfloat16), (True, jnp.bfloat16), (True, jnp.float32)]
)
def test_lowers_for_real_hardware(backend, platform, marker, packed, dtype):
    """Lower fwd+bwd at a 70B-shard layout (8 q / 1 kv heads, d=128) for the device.

    Interpret mode skips the Triton / Mosaic lowering, so this is what catches
    an op either compiler front end rejects.
    """
    q = jax.ShapeDtypeStruct((2, 1000, 8, 128), dtype)
    kv = jax.ShapeDtypeStruct((2, 1000, 1, 128), dtype)
    seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32) if packed else None

    def loss(q, k, v, seg):
        out = dot_product_attention(
            q, k, v, segment_ids=seg, implementation="pallas", backend=backend, interpret=False
        )
        return out.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    with _lowering_target(platform):
        text = grad.trace(q, kv, kv, seg).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) >= 3  # forward, dq, dk/dv kernels


@pytest.mark.parametrize(
    "backend,platform,marker",
    [("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")],
)
def test_offset_kernel_lowers_for_real_hardware(backend, platform, marker):
    """One context-parallel shard (512 local queries, 2048 gathered keys, traced offset)."""
    q = jax.ShapeDtypeStruct((1, 512, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2048, 1, 128), jnp.bfloat16)
    q_seg, kv_seg = (jax.ShapeDtypeStruct((1, n), jnp.int32) for n in (512, 2048))

    def loss(q, k, v, q_seg, kv_seg, offset):
        out = flash_attention(
            q, k, v, q_seg, kv_segment_ids=kv_seg, q_offset=offset, causal=True,
            softmax_scale=None, block_sizes=None, backend=backend, interpret=False,
        )  # fmt: skip
        return out.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    offset = jax.ShapeDtypeStruct((), jnp.int32)
    with _lowering_target(platform):
        traced = grad.trace(q, kv, kv, q_seg, kv_seg, offset)
        assert traced.lower(lowering_platforms=(platform,)).as_text().count(marker) >= 3


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install 'jax[tpu]')"
)
@pytest.mark.slow  # libtpu's compiler (the fast tier lowers the kernels for TPU)
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])  # v4, v6e also compile
def test_compiles_with_mosaic_for_tpu(topology, monkeypatch):
    """Ahead-of-time compile fwd+bwd with libtpu's real Mosaic compiler, no TPU needed.

    Lowering alone stops at Mosaic IR; this also runs layout assignment and
    VMEM allocation at the default (512-row) tiles.
    """
    from jax.experimental import topologies

    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
    replicated = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
    q = jax.ShapeDtypeStruct((2, 4096, 8, 128), jnp.bfloat16, sharding=replicated)
    kv = jax.ShapeDtypeStruct((2, 4096, 1, 128), jnp.bfloat16, sharding=replicated)
    seg = jax.ShapeDtypeStruct((2, 4096), jnp.int32, sharding=replicated)

    def loss(q, k, v, seg):
        out = dot_product_attention(
            q, k, v, segment_ids=seg, implementation="pallas", backend="tpu", interpret=False
        )
        return out.astype(jnp.float32).sum()

    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower().compile()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_matches_reference(packed):
    q, k, v = _inputs(2, 256, 8, 2, 64, jnp.bfloat16)
    seg = _segments(256, 2) if packed else None
    exact = _loss_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)), seg, True)
    got = _loss_and_grads("cudnn", q, k, v, seg, True)
    for g, w in zip(got, exact, strict=True):
        assert _rel_err(g, w) <= BF16_TOL


def test_block_sizes_must_be_powers_of_two():
    q, k, v = _inputs(1, 64, 2, 2, 16, jnp.float32)
    bad = dataclasses.replace(GPU_BLOCKS, block_k=48)
    with pytest.raises(ValueError, match="power of two"):
        dot_product_attention(q, k, v, implementation="pallas", block_sizes=bad)


def test_tiny_llama_pallas_matches_xla():
    """Same loss and parameter gradients through the whole model, packed batch."""
    cfg = tiny_llama(hidden_size=64, intermediate_size=128)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    seg = _segments(40, 2)
    params = jax.jit(Llama(cfg).init)(jax.random.key(0), tokens[:, :8])["params"]

    def loss(impl: str):
        model = Llama(dataclasses.replace(cfg, attention_impl=impl))

        def nll(params):
            logits = model.apply({"params": params}, tokens, segment_ids_BL=seg)
            logp = jax.nn.log_softmax(logits[:, :-1, : cfg.vocab_size])
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

        return jax.jit(jax.value_and_grad(nll))(params)

    (want, want_g), (got, got_g) = loss("xla"), loss("pallas")
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        assert _rel_err(g, w) <= FP32_TOL
