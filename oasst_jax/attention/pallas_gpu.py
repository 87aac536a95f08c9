"""Flash attention kernels for GPU: Pallas lowered to Triton.

Layout stays ``[batch, length, heads, head_dim]`` (no transposes): each program
owns one block of query rows (forward, dq) or key rows (dk/dv) of one head and
streams the other side with a ``fori_loop``, so causally invisible blocks are
never visited rather than masked.  Grouped-query attention maps query head
``h`` to kv head ``h // groups`` in the BlockSpec; the dk/dv program of a kv
head loops over its whole group of query heads, so k/v are never repeated and
dk/dv need no reduction afterwards.  The query offset is a one-element int32
operand; loop bounds derive from it, so causally invisible blocks of an offset
query tile (context parallelism) are skipped as well.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from oasst_jax.attention.blocks import (
    M_FLOOR,
    BlockSizes,
    KernelConfig,
    MaskOperands,
    block_mask,
    cdiv,
    div,
    mm,
    rem,
)

# Triton tutorial (FA2) settings for H100, head_dim 128: big query tiles in the
# forward amortise k/v loads; the backward kernels keep the streamed side small
# because they hold two fp32 accumulators.
DEFAULT_BLOCKS = BlockSizes(
    block_q=128, block_k=64, block_q_dkv=32, block_k_dkv=128, block_q_dq=128, block_k_dq=32
)
MIN_BLOCK = 16  # smallest tile tl.dot accepts
NUM_STAGES = 3  # software-pipelining depth of the streamed k/v (or q/do) loads
TARGET_PROGRAMS = 264  # two waves on an H100's 132 SMs


def padded_head_dim(head_dim: int) -> int:
    """Triton tiles must be powers of two; zero columns change no dot product."""
    return max(16, pl.next_power_of_2(head_dim))


def _num_warps(rows: int, cols: int) -> int:
    """8 warps once a tile is 128x64 or larger (the tutorial's H100 choice), else 4."""
    return 8 if rows * cols >= 128 * 64 else 4


def _compiler_params(rows: int, cols: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=_num_warps(rows, cols), num_stages=NUM_STAGES)


def _positions(start: jax.Array, size: int) -> jax.Array:
    return start + lax.broadcasted_iota(jnp.int32, (size,), 0)


def _kv_range(q_start: jax.Array, bq: int, bk: int, n_kv: int, cfg: KernelConfig):
    """``(split, hi)`` for the query tile at key position ``q_start``: every row
    sees key blocks ``[0, split)`` unmasked, ``[split, hi)`` need the mask and
    blocks from ``hi`` on are invisible (causally in the future).  The clamps
    matter for whole tiles of query padding, which may lie past the keys."""
    if not cfg.causal:
        if cfg.has_segments:
            return 0, n_kv
        return (n_kv if cfg.kv_len is None else cfg.kv_len // bk), n_kv
    hi = jnp.minimum(cdiv(q_start + bq, bk), n_kv)
    return (0 if cfg.has_segments else jnp.minimum(div(q_start, bk), hi)), hi


def _q_range(k_start: jax.Array, bq: int, bk: int, n_q: int, cfg: KernelConfig):
    """``(lo, mid)`` for the key tile at ``k_start``, offset already subtracted:
    query blocks before ``lo`` see none of it, ``[lo, mid)`` need the mask and
    blocks from ``mid`` on see all of it."""
    if not cfg.causal:
        return 0, n_q if (cfg.has_segments or cfg.kv_len is not None) else 0
    lo = jnp.minimum(div(jnp.maximum(k_start, 0), bq), n_q)
    if cfg.has_segments:
        return lo, n_q
    return lo, jnp.clip(cdiv(jnp.maximum(k_start + bk, 0), bq), lo, n_q)


def _masked_logits(s, q_pos, k_pos, q_seg, k_seg, cfg: KernelConfig) -> jax.Array:
    seg = (None, None) if q_seg is None else (q_seg[:, None], k_seg[None, :])
    mask = block_mask(q_pos[:, None], k_pos[None, :], *seg, cfg)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(
    off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, cfg: KernelConfig
):
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    n_kv = k_ref.shape[0] // bk
    qi = pl.program_id(0)
    q = q_ref[...]
    q_start = off_ref[0] + qi * bq
    q_pos = _positions(q_start, bq)
    q_seg = None if qseg_ref is None else qseg_ref[pl.ds(qi * bq, bq)]

    def body(j, carry, masked: bool):
        acc, m, denom = carry
        rows = pl.ds(j * bk, bk)
        k, v = k_ref[rows, :], v_ref[rows, :]
        s = mm(q, k.T) * cfg.scale
        if masked:
            k_seg = None if kseg_ref is None else kseg_ref[rows]
            s = _masked_logits(s, q_pos, _positions(j * bk, bk), q_seg, k_seg, cfg)
        m_next = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_next)
        p = jnp.exp(s - m_next[:, None])
        denom = alpha * denom + p.sum(axis=1)
        acc = acc * alpha[:, None] + mm(p.astype(v.dtype), v)
        return acc, m_next, denom

    carry = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((bq,), M_FLOOR, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    split, hi = _kv_range(q_start, bq, bk, n_kv, cfg)
    carry = lax.fori_loop(0, split, functools.partial(body, masked=False), carry)
    acc, m, denom = lax.fori_loop(split, hi, functools.partial(body, masked=True), carry)
    empty = denom == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, denom)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(denom))


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
    return dict(
        q=pl.BlockSpec((None, bq, None, dim), lambda i, bi, h: (bi, i, h, 0)),
        kv=pl.BlockSpec((None, kv_len, None, dim), lambda i, bi, h: (bi, 0, div(h, groups), 0)),
        row=pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
    )


def forward(q, k, v, mask: MaskOperands, cfg: KernelConfig) -> tuple[jax.Array, jax.Array]:
    """Output ``[b, lq, h, d]`` and log-sum-exp ``[b, h, lq]`` (fp32)."""
    b, q_len, heads, _ = q.shape
    bq = cfg.blocks.block_q
    specs = _q_major_specs(q, k, bq)
    m = _mask_specs(mask, lambda i, bi, h: bi)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(q_len // bq, b, heads),
        in_specs=[m.q_offset, specs["q"], specs["kv"], specs["kv"], *m[:2]],
        out_specs=[specs["q"], specs["row"]],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, heads, q_len), jnp.float32),
        ],
        compiler_params=_compiler_params(bq, cfg.blocks.block_k),
        interpret=cfg.interpret,
        name="flash_fwd",
    )(mask.q_offset, q, k, v, *mask[:2])


# ----------------------------------------------------------------------------- dq


def _dq_kernel(
    off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref,
    *, cfg: KernelConfig,
):  # fmt: skip
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    n_kv = k_ref.shape[0] // bk
    qi = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_start = off_ref[0] + qi * bq
    q_pos = _positions(q_start, bq)
    q_seg = None if qseg_ref is None else qseg_ref[pl.ds(qi * bq, bq)]

    def body(j, dq, masked: bool):
        rows = pl.ds(j * bk, bk)
        k, v = k_ref[rows, :], v_ref[rows, :]
        s = mm(q, k.T) * cfg.scale
        if masked:
            k_seg = None if kseg_ref is None else kseg_ref[rows]
            s = _masked_logits(s, q_pos, _positions(j * bk, bk), q_seg, k_seg, cfg)
        p = jnp.exp(s - lse)
        ds = p * (mm(do, v.T) - delta)
        return dq + mm(ds.astype(k.dtype), k)

    split, hi = _kv_range(q_start, bq, bk, n_kv, cfg)
    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(0, split, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(split, hi, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dq(q, k, v, mask: MaskOperands, do, lse, delta, cfg: KernelConfig) -> jax.Array:
    b, q_len, heads, _ = q.shape
    bq = cfg.blocks.block_q_dq
    specs = _q_major_specs(q, k, bq)
    m = _mask_specs(mask, lambda i, bi, h: bi)
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(q_len // bq, b, heads),
        in_specs=[
            m.q_offset,
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
        compiler_params=_compiler_params(bq, cfg.blocks.block_k_dq),
        interpret=cfg.interpret,
        name="flash_dq",
    )(mask.q_offset, q, k, v, *mask[:2], do, lse, delta)


# ----------------------------------------------------------------------------- dk, dv


def _dkv_kernel(
    off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    *, cfg: KernelConfig,
):  # fmt: skip
    """One key block of one kv head; loops over (query head of its group split, query block)."""
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    q_len, groups, _ = q_ref.shape
    n_q = q_len // bq
    kj = pl.program_id(0)
    offset = off_ref[0]
    k, v = k_ref[...], v_ref[...]
    k_pos = _positions(kj * bk, bk)
    k_seg = None if kseg_ref is None else kseg_ref[pl.ds(kj * bk, bk)]

    def step(g, i, carry, masked: bool):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        s = mm(q, k.T) * cfg.scale
        if masked:
            q_seg = None if qseg_ref is None else qseg_ref[rows]
            s = _masked_logits(s, _positions(offset + i * bq, bq), k_pos, q_seg, k_seg, cfg)
        p = jnp.exp(s - lse_ref[g, rows][:, None])
        dv = dv + mm(p.astype(do.dtype).T, do)
        ds = p * (mm(do, v.T) - delta_ref[g, rows][:, None])
        return dk + mm(ds.astype(q.dtype).T, q), dv

    def sweep(lo, hi, carry, masked: bool):
        """Query blocks ``[lo, hi)`` of every head in the group, as one flat loop."""
        n = hi - lo
        body = lambda t, c: step(div(t, n), lo + rem(t, n), c, masked)
        return lax.fori_loop(0, groups * n, body, carry)

    lo, mid = _q_range(kj * bk - offset, bq, bk, n_q, cfg)
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    carry = sweep(lo, mid, carry, masked=True)
    dk, dv = sweep(mid, n_q, carry, masked=False)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _group_splits(programs: int, groups: int) -> int:
    """Split each kv head's query group over this many programs (a divisor of ``groups``).

    With few kv heads (70B under TP8 has one per device) one program per
    (key block, kv head) leaves most SMs idle: 2 x 4096 / 128 = 64 programs on
    132 SMs.  Splitting until about two waves are queued trades that for a small
    fp32 partial-sum buffer that XLA reduces afterwards.
    """
    fitting = [d for d in range(1, groups + 1) if groups % d == 0]
    return next((d for d in fitting if programs * d >= TARGET_PROGRAMS), groups)


def _dkv(
    q, k, v, mask: MaskOperands, do, lse, delta, cfg: KernelConfig
) -> tuple[jax.Array, jax.Array]:
    b, kv_len, kv_heads, dim = k.shape
    q_len, groups = q.shape[1], q.shape[2] // kv_heads
    bk = cfg.blocks.block_k_dkv
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
    m = _mask_specs(mask, lambda j, bi, n, s: bi)
    # Partial sums stay fp32 until the reduction over splits.
    out = jax.ShapeDtypeStruct((splits, *k.shape), k.dtype if splits == 1 else jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(kv_len // bk, b, kv_heads, splits),
        in_specs=[
            m.q_offset,
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
        compiler_params=_compiler_params(cfg.blocks.block_q_dkv, bk),
        interpret=cfg.interpret,
        name="flash_dkv",
    )(mask.q_offset, q, k, v, *mask[:2], do, lse, delta)
    return dk.sum(0).astype(k.dtype), dv.sum(0).astype(v.dtype)


def backward(q, k, v, mask: MaskOperands, do, lse, delta, cfg: KernelConfig):
    """``dq, dk, dv`` from the saved log-sum-exp and ``delta = rowsum(o * do)``."""
    dq = _dq(q, k, v, mask, do, lse, delta, cfg)
    dk, dv = _dkv(q, k, v, mask, do, lse, delta, cfg)
    return dq, dk, dv
