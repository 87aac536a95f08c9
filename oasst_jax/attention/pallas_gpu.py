"""Flash attention kernels for GPU: Pallas lowered to Triton.

Layout stays ``[batch, length, heads, head_dim]`` (no transposes): each program
owns one block of query rows (forward, dq) or key rows (dk/dv) of one head and
streams the other side with ``fori_loop``s whose bounds come from the XLA
pre-pass in :mod:`bounds`: blocks that no query of the program can attend --
causally in the future, or in other packed samples -- are never loaded, and
blocks wholly inside one sample and below the diagonal skip the mask.  The
query offset (context parallelism) enters those bounds, so an offset query
tile skips the same way.

Hopper specifics (FlashAttention-2 / the Triton tutorial): logits are scaled by
``scale * log2(e)`` so the softmax is ``exp2`` (one ``ex2`` instruction, no
libdevice ``expf``) and the saved log-sum-exp is in log2 units -- it never
leaves the kernel pair, so nothing converts it back.  dk/dv computes the
transposed scores ``k @ q^T``, so every dot has the key block (>= 64) as its M
dimension, which Triton needs for wgmma; lse and delta broadcast as row
vectors.  Causal query blocks launch heaviest (last) first.  Warps and the
dk/dv key tile follow from a register budget that counts the head dim and the
accumulators (:func:`default_blocks`, :func:`_num_warps`).

Grouped-query attention maps query head ``h`` to kv head ``h // groups`` in
the BlockSpec; the dk/dv program of a kv head loops over (a split of) its
group of query heads, so k/v are never repeated.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from oasst_jax.attention import bounds
from oasst_jax.attention.blocks import (
    M_FLOOR,
    BlockSizes,
    KernelConfig,
    MaskOperands,
    block_mask,
    div,
    mm,
    rem,
)

MIN_BLOCK = 16  # smallest tile tl.dot accepts
NUM_STAGES = 3  # software-pipelining depth of the streamed k/v (or q/do) loads
TARGET_PROGRAMS = 264  # two waves on an H100's 132 SMs
LOG2E = math.log2(math.e)
# fp32 values per thread a kernel may keep live in accumulators and the score
# tile: half of the 255-register limit, the rest holds operands and addresses.
REGISTER_BUDGET = 128
THREADS_PER_WARP = 32
WARPS = (4, 8)
MAX_HEAD_DIM = 128
# fp32 dots are IEEE (``blocks.mm``: HIGHEST), which Triton runs on FMA units with both
# operands of every dot held in registers, so the budget above does not apply: at head dim
# 128 the bf16 tiles spill tens of KiB, and even 32-row tiles spill in dk/dv.  These are
# the largest that ptxas (sm_90a) compiles without a spill at head dim 128, so at every
# smaller one too (tests/test_pallas_gpu.py).
FP32_BLOCKS = BlockSizes(
    block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=32, block_k_dq=16
)


def padded_head_dim(head_dim: int) -> int:
    """Triton tiles must be powers of two; zero columns change no dot product.

    Up to 128: at 256 the dk/dv kernel's two ``[64, 256]`` fp32 accumulators and its
    key and value tiles exceed 255 registers even at its smallest wgmma tile (ptxas:
    spills), and the forward's pipelined loads fill the whole 227 KiB of shared memory.
    """
    padded = max(16, pl.next_power_of_2(head_dim))
    if padded > MAX_HEAD_DIM:
        raise ValueError(
            f"flash attention (GPU): head dim {head_dim} > {MAX_HEAD_DIM} does not fit the "
            "kernel's registers; use attention_impl='xla' or 'cudnn'"
        )
    return padded


def _live_fp32(accumulators: int, acc_rows: int, dim: int, bq: int, bk: int) -> int:
    """fp32 values a program holds: ``accumulators`` tiles ``[acc_rows, dim]`` + scores."""
    return accumulators * acc_rows * dim + bq * bk


def _num_warps(live: int) -> int:
    """Fewest warps whose threads hold ``live`` fp32 values within the register budget."""
    fits = (w for w in WARPS if live <= REGISTER_BUDGET * THREADS_PER_WARP * w)
    return next(fits, WARPS[-1])


def _fits(live: int) -> bool:
    return live <= REGISTER_BUDGET * THREADS_PER_WARP * WARPS[-1]


def default_blocks(head_dim: int, dtype=jnp.bfloat16) -> BlockSizes:
    """Tiles for ``head_dim``: the largest row tile whose accumulators fit 8 warps.

    Forward and dq hold one ``[block_q, d]`` accumulator (128 rows up to d=128);
    dk/dv holds two ``[block_k, d]`` ones, so at d=128 its key tile drops to 64
    (128 would need 144 registers per thread at 8 warps and spill).  Never
    below 64 rows: that is the M dimension wgmma needs.  fp32 inputs take
    :data:`FP32_BLOCKS` (their dots run on FMA units, not tensor cores).
    """
    d = padded_head_dim(head_dim)
    if jnp.dtype(dtype).itemsize > 2:
        return FP32_BLOCKS
    rows = lambda live: next((r for r in (128, 64) if _fits(live(r))), 64)
    block_q = rows(lambda r: _live_fp32(1, r, d, r, 64))
    block_q_dq = rows(lambda r: _live_fp32(1, r, d, r, 32))
    block_k_dkv = rows(lambda r: _live_fp32(2, r, d, 32, r))
    return BlockSizes(
        block_q=block_q,
        block_k=64,
        block_q_dkv=32,
        block_k_dkv=block_k_dkv,
        block_q_dq=block_q_dq,
        block_k_dq=32,
    )


def _compiler_params(live: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=_num_warps(live), num_stages=NUM_STAGES)


def _positions(start: jax.Array, size: int) -> jax.Array:
    return start + lax.broadcasted_iota(jnp.int32, (size,), 0)


def _heaviest_first(program: jax.Array, n: int) -> jax.Array:
    """Block of a program: causal query blocks see more keys the later they are, so
    the grid runs them last-first and the light ones fill the tail."""
    return n - 1 - program


def _loops(bounds_ref, body, carry):
    """Run ``body(j, carry, masked)`` over a program's visible blocks (see :mod:`bounds`)."""
    lo, full_lo, full_hi, hi = (bounds_ref[f] for f in range(bounds.N_FIELDS))
    masked = functools.partial(body, masked=True)
    carry = lax.fori_loop(lo, full_lo, masked, carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, masked, carry)


def _masked(s, q_pos, k_pos, q_seg, k_seg, cfg: KernelConfig) -> jax.Array:
    """``s`` with ``-inf`` where the mask is False; all operands already broadcastable."""
    mask = block_mask(q_pos, k_pos, q_seg, k_seg, cfg)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(
    off_ref, bounds_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref,
    *, cfg: KernelConfig,
):  # fmt: skip
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    qi = _heaviest_first(pl.program_id(0), pl.num_programs(0))
    q = q_ref[...]
    q_pos = _positions(off_ref[0] + qi * bq, bq)[:, None]
    q_seg = None if qseg_ref is None else qseg_ref[pl.ds(qi * bq, bq)][:, None]
    scale = cfg.scale * LOG2E  # logits in log2 units: exp2 below

    def body(j, carry, masked: bool):
        acc, m, denom = carry
        rows = pl.ds(j * bk, bk)
        k, v = k_ref[rows, :], v_ref[rows, :]
        s = mm(q, k.T) * scale
        if masked:
            k_seg = None if kseg_ref is None else kseg_ref[rows][None, :]
            s = _masked(s, q_pos, _positions(j * bk, bk)[None, :], q_seg, k_seg, cfg)
        m_next = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_next)
        p = jnp.exp2(s - m_next[:, None])
        denom = alpha * denom + p.sum(axis=1)
        acc = acc * alpha[:, None] + mm(p.astype(v.dtype), v)
        return acc, m_next, denom

    carry = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((bq,), M_FLOOR, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, denom = _loops(bounds_ref, body, carry)
    empty = denom == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, denom)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(denom))


def _mask_specs(mask: MaskOperands, index_map):
    """Specs of the offset and the whole-row segment ids; ``index_map(*grid) -> batch row``."""
    whole = lambda n: pl.BlockSpec((None, n), lambda *g: (index_map(*g), 0))
    has_seg = mask.q_segment_ids is not None
    return MaskOperands(
        whole(mask.q_segment_ids.shape[1]) if has_seg else None,
        whole(mask.kv_segment_ids.shape[1]) if has_seg else None,
        pl.BlockSpec((1,), lambda *g: (0,)),
    )


def _q_major_specs(q, k, bq: int):
    """Specs of the (query block, batch, head) grid shared by forward and dq."""
    kv_len, dim = k.shape[1], k.shape[3]
    groups = q.shape[2] // k.shape[2]
    n_q = q.shape[1] // bq
    qi = lambda i: _heaviest_first(i, n_q)
    return dict(
        q=pl.BlockSpec((None, bq, None, dim), lambda i, bi, h: (bi, qi(i), h, 0)),
        kv=pl.BlockSpec((None, kv_len, None, dim), lambda i, bi, h: (bi, 0, div(h, groups), 0)),
        row=pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, qi(i))),
        bounds=pl.BlockSpec((None, None, bounds.N_FIELDS), lambda i, bi, h: (bi, qi(i), 0)),
    )


def forward(q, k, v, mask: MaskOperands, cfg: KernelConfig) -> tuple[jax.Array, jax.Array]:
    """Output ``[b, lq, h, d]`` and log-sum-exp ``[b, h, lq]`` (fp32, log2 units)."""
    b, q_len, heads, dim = q.shape
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    specs = _q_major_specs(q, k, bq)
    m = _mask_specs(mask, lambda i, bi, h: bi)
    kv_bounds = bounds.kv_loop_bounds(mask, q_len, k.shape[1], bq, bk, cfg, b)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(q_len // bq, b, heads),
        in_specs=[m.q_offset, specs["bounds"], specs["q"], specs["kv"], specs["kv"], *m[:2]],
        out_specs=[specs["q"], specs["row"]],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, heads, q_len), jnp.float32),
        ],
        compiler_params=_compiler_params(_live_fp32(1, bq, dim, bq, bk)),
        interpret=cfg.interpret,
        name="flash_fwd",
    )(mask.q_offset, kv_bounds, q, k, v, *mask[:2])


# ----------------------------------------------------------------------------- dq


def _dq_kernel(
    off_ref, bounds_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref,
    dq_ref, *, cfg: KernelConfig,
):  # fmt: skip
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    qi = _heaviest_first(pl.program_id(0), pl.num_programs(0))
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = _positions(off_ref[0] + qi * bq, bq)[:, None]
    q_seg = None if qseg_ref is None else qseg_ref[pl.ds(qi * bq, bq)][:, None]
    scale = cfg.scale * LOG2E

    def body(j, dq, masked: bool):
        rows = pl.ds(j * bk, bk)
        k, v = k_ref[rows, :], v_ref[rows, :]
        s = mm(q, k.T) * scale
        if masked:
            k_seg = None if kseg_ref is None else kseg_ref[rows][None, :]
            s = _masked(s, q_pos, _positions(j * bk, bk)[None, :], q_seg, k_seg, cfg)
        p = jnp.exp2(s - lse)
        ds = p * (mm(do, v.T) - delta)
        return dq + mm(ds.astype(k.dtype), k)

    dq = _loops(bounds_ref, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dq(q, k, v, mask: MaskOperands, do, lse, delta, cfg: KernelConfig) -> jax.Array:
    b, q_len, heads, dim = q.shape
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    specs = _q_major_specs(q, k, bq)
    m = _mask_specs(mask, lambda i, bi, h: bi)
    kv_bounds = bounds.kv_loop_bounds(mask, q_len, k.shape[1], bq, bk, cfg, b)
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(q_len // bq, b, heads),
        in_specs=[
            m.q_offset,
            specs["bounds"],
            specs["q"],
            specs["kv"],
            specs["kv"],
            *m[:2],
            specs["q"],
            specs["row"],
            specs["row"],
        ],  # fmt: skip
        out_specs=specs["q"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(_live_fp32(1, bq, dim, bq, bk)),
        interpret=cfg.interpret,
        name="flash_dq",
    )(mask.q_offset, kv_bounds, q, k, v, *mask[:2], do, lse, delta)


# ----------------------------------------------------------------------------- dk, dv


def _dkv_kernel(
    off_ref, bounds_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref,
    dk_ref, dv_ref, *, cfg: KernelConfig,
):  # fmt: skip
    """One key block of one kv head; loops over (query head of its group split, query block).

    Works on transposed scores ``[bk, bq]`` (FA2 orientation): every dot has
    M = bk, and the key tile is never transposed.
    """
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    groups = q_ref.shape[1]
    kj = pl.program_id(0)
    offset = off_ref[0]
    k, v = k_ref[...], v_ref[...]
    k_pos = _positions(kj * bk, bk)[:, None]
    k_seg = None if kseg_ref is None else kseg_ref[pl.ds(kj * bk, bk)][:, None]
    scale = cfg.scale * LOG2E

    def step(g, i, carry, masked: bool):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        s_t = mm(k, q.T) * scale
        if masked:
            q_seg = None if qseg_ref is None else qseg_ref[rows][None, :]
            q_pos = _positions(offset + i * bq, bq)[None, :]
            s_t = _masked(s_t, q_pos, k_pos, q_seg, k_seg, cfg)
        p_t = jnp.exp2(s_t - lse_ref[g, rows][None, :])
        dv = dv + mm(p_t.astype(do.dtype), do)
        ds_t = p_t * (mm(v, do.T) - delta_ref[g, rows][None, :])
        return dk + mm(ds_t.astype(q.dtype), q), dv

    def body(t, carry, lo, n, masked: bool):
        """Flat index ``t`` over (head in the group, query block in ``[lo, lo + n)``)."""
        return step(div(t, n), lo + rem(t, n), carry, masked)

    def sweep(lo, hi, carry, masked: bool):
        n = hi - lo
        loop = functools.partial(body, lo=lo, n=n, masked=masked)
        return lax.fori_loop(0, groups * n, loop, carry)

    lo, full_lo, full_hi, hi = (bounds_ref[f] for f in range(bounds.N_FIELDS))
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    carry = sweep(lo, full_lo, carry, masked=True)
    carry = sweep(full_lo, full_hi, carry, masked=False)
    dk, dv = sweep(full_hi, hi, carry, masked=True)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _group_splits(programs: int, groups: int) -> int:
    """Split each kv head's query group over this many programs (a divisor of ``groups``).

    With few kv heads (70B under TP8 has one per device) one program per
    (key block, kv head) leaves most SMs idle: 2 x 4096 / 128 = 64 programs on
    132 SMs.  Splitting until about two waves are queued trades that for a
    partial-sum buffer that XLA reduces afterwards, in the input dtype (bf16
    partials, summed in fp32) so the extra traffic stays small.
    """
    fitting = [d for d in range(1, groups + 1) if groups % d == 0]
    return next((d for d in fitting if programs * d >= TARGET_PROGRAMS), groups)


def _dkv(
    q, k, v, mask: MaskOperands, do, lse, delta, cfg: KernelConfig
) -> tuple[jax.Array, jax.Array]:
    b, kv_len, kv_heads, dim = k.shape
    q_len, groups = q.shape[1], q.shape[2] // kv_heads
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    splits = _group_splits(kv_len // bk * b * kv_heads, groups)
    per_split = groups // splits
    head_block = lambda n, s: n * splits + s  # in units of per_split query heads
    group_spec = pl.BlockSpec(
        (None, q_len, per_split, dim), lambda j, bi, n, s: (bi, 0, head_block(n, s), 0)
    )
    group_rows = pl.BlockSpec(
        (None, per_split, q_len), lambda j, bi, n, s: (bi, head_block(n, s), 0)
    )
    kv_spec = pl.BlockSpec((None, bk, None, dim), lambda j, bi, n, s: (bi, j, n, 0))
    out_spec = pl.BlockSpec((None, None, bk, None, dim), lambda j, bi, n, s: (s, bi, j, n, 0))
    bounds_spec = pl.BlockSpec((None, None, bounds.N_FIELDS), lambda j, bi, n, s: (bi, j, 0))
    m = _mask_specs(mask, lambda j, bi, n, s: bi)
    q_bounds = bounds.q_loop_bounds(mask, q_len, kv_len, bq, bk, cfg, b)
    out = jax.ShapeDtypeStruct((splits, *k.shape), k.dtype)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(kv_len // bk, b, kv_heads, splits),
        in_specs=[
            m.q_offset,
            bounds_spec,
            group_spec,
            kv_spec,
            kv_spec,
            *m[:2],
            group_spec,
            group_rows,
            group_rows,
        ],  # fmt: skip
        out_specs=[out_spec, out_spec],
        out_shape=[out, out],
        compiler_params=_compiler_params(_live_fp32(2, bk, dim, bq, bk)),
        interpret=cfg.interpret,
        name="flash_dkv",
    )(mask.q_offset, q_bounds, q, k, v, *mask[:2], do, lse, delta)
    reduce = lambda x: x.astype(jnp.float32).sum(0).astype(k.dtype)
    return reduce(dk), reduce(dv)


def backward(q, k, v, mask: MaskOperands, do, lse, delta, cfg: KernelConfig):
    """``dq, dk, dv`` from the saved log-sum-exp (log2 units) and ``delta = rowsum(o * do)``."""
    dq = _dq(q, k, v, mask, do, lse, delta, cfg)
    dk, dv = _dkv(q, k, v, mask, do, lse, delta, cfg)
    return dq, dk, dv
