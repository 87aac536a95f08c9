"""Flash attention kernels for TPU: Pallas lowered to Mosaic.

Mosaic tiles the last two dims of every block as (sublanes, lanes), so the
kernels work on ``[batch, heads, length, head_dim]`` (transposed in and out
here) and keep per-row statistics lane-replicated as ``[rows, 128]``.  The
streamed side is the innermost grid axis (``"arbitrary"``, accumulating into
VMEM scratch); the others are ``"parallel"`` so megacore chips split them.

Block skipping follows the XLA pre-pass in :mod:`bounds` (causality, packed
segments, the query offset): step ``t`` of the innermost axis handles block
``lo + t`` of the program's bounds, steps past ``hi`` do nothing and their
index_map repeats the last visible block, so the pipeline issues no DMA for
them; blocks in ``[full_lo, full_hi)`` skip the mask.  The offset and the
bounds are scalar-prefetched (SMEM), read by both the kernels and the
index_maps.  Grouped-query attention indexes kv head ``h // groups``; the
dk/dv grid walks (query head in group, query block) on its innermost axis, so
k/v are never repeated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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

LANES = 128
SUBLANES = 8
# 512x512 tiles keep the MXU busy and fit v4/v5 VMEM with double buffering at
# head_dim 128 (MaxText's splash defaults); the backward holds two fp32
# accumulators, hence its smaller query tile.
_BLOCKS = BlockSizes(
    block_q=512, block_k=512, block_q_dkv=256, block_k_dkv=512, block_q_dq=256, block_k_dq=512
)
MIN_BLOCK = LANES  # key blocks are the lane axis of the logits tile
PARALLEL, ARBITRARY = "parallel", "arbitrary"


def default_blocks(head_dim: int, dtype=jnp.bfloat16) -> BlockSizes:
    """The same tiles for every head dim up to 128 and dtype (VMEM, not registers, is
    the limit)."""
    del head_dim, dtype
    return _BLOCKS


def padded_head_dim(head_dim: int) -> int:
    """A block equal to the full head dim is legal on TPU, so no padding."""
    return head_dim


def _widen(x: jax.Array, width: int) -> jax.Array:
    """Lane-replicated ``[rows, 128]`` statistic -> ``[rows, width]``."""
    if width % LANES == 0:
        return jnp.tile(x, (1, width // LANES))
    return x[:, :width]


def _params(*semantics: str) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _interpret(cfg: KernelConfig):
    return pltpu.InterpretParams() if cfg.interpret else False


def _field(bounds_ref, b, outer, n_outer: int, field: int):
    """One loop bound of program ``(b, outer)`` from the flat SMEM bounds array."""
    return bounds_ref[(b * n_outer + outer) * bounds.N_FIELDS + field]


def _streamed(bounds_ref, b, outer, t, n_outer: int):
    """Block handled at step ``t``: ``lo + t``, clamped to the last visible one (no DMA)."""
    lo = _field(bounds_ref, b, outer, n_outer, bounds.LO)
    hi = _field(bounds_ref, b, outer, n_outer, bounds.HI)
    return jnp.minimum(lo + t, jnp.maximum(hi - 1, 0))


def _step_kind(bounds_ref, b, outer, t, n_outer: int):
    """``(active, masked)`` for step ``t``: whether block ``lo + t`` is visible, and
    whether it lies outside the program's unmasked run."""
    get = lambda f: _field(bounds_ref, b, outer, n_outer, f)
    j = get(bounds.LO) + t
    full = (j >= get(bounds.FULL_LO)) & (j < get(bounds.FULL_HI))
    return j < get(bounds.HI), jnp.logical_not(full)


def _run_step(active, masked, step) -> None:
    """``step(masked)`` under ``pl.when``: one traced copy with the mask, one without."""
    pl.when(active & masked)(functools.partial(step, True))
    pl.when(active & jnp.logical_not(masked))(functools.partial(step, False))


def _grid_spec(grid, in_specs, out_specs, scratch_shapes) -> pltpu.PrefetchScalarGridSpec:
    """Grid whose index_maps and kernel take the offset and bounds refs as extra arguments."""
    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch_shapes,
    )


def _logits(
    q_ref, k_ref, qseg_ref, kseg_ref, qi, kj, offset, cfg: KernelConfig, bq: int, bk: int,
    masked: bool,
):  # fmt: skip
    """Scaled ``[bq, bk]`` logits of one (query block, key block) pair, masked if asked."""
    s = mm(q_ref[...], k_ref[...].T) * cfg.scale
    if not masked:
        return s
    q_pos = offset + qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_pos = kj * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    segs = (None, None)
    if qseg_ref is not None:
        segs = (_widen(qseg_ref[...], bk), kseg_ref[:1, :])
    mask = block_mask(q_pos, k_pos, *segs, cfg)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _segment_inputs(mask: MaskOperands):
    """Query ids lane-replicated ``[b, lq, 128]``, key ids sublane-replicated ``[b, 8, lk]``."""
    qseg, kseg = mask.q_segment_ids, mask.kv_segment_ids
    if qseg is None:
        return None, None
    return (
        lax.broadcast_in_dim(qseg, (*qseg.shape, LANES), (0, 1)),
        lax.broadcast_in_dim(kseg, (kseg.shape[0], SUBLANES, kseg.shape[1]), (0, 2)),
    )


def _to_bhld(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(
    off_ref, bnd_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref,
    m_sc, l_sc, acc_sc, *, cfg, n_q: int,
):  # fmt: skip
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    b, qi, t, offset = pl.program_id(0), pl.program_id(2), pl.program_id(3), off_ref[0]

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, M_FLOOR, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked: bool):
        kj = _streamed(bnd_ref, b, qi, t, n_q)
        s = _logits(q_ref, k_ref, qseg_ref, kseg_ref, qi, kj, offset, cfg, bq, bk, masked)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - _widen(m_next, bk))
        m_sc[...] = m_next
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        pv = mm(p.astype(v_ref.dtype), v_ref[...])
        acc_sc[...] = acc_sc[...] * _widen(alpha, pv.shape[1]) + pv

    _run_step(*_step_kind(bnd_ref, b, qi, t, n_q), step)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        denom = l_sc[...]
        empty = denom == 0.0
        inv = _widen(1.0 / jnp.where(empty, 1.0, denom), acc_sc.shape[1])
        o_ref[...] = (acc_sc[...] * inv).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, jnp.inf, m_sc[...] + jnp.log(denom))


def _q_major_specs(q, k, bq: int, bk: int):
    """BlockSpecs of the (b, h, query block, step) grid shared by forward and dq."""
    _, heads, q_len, dim = q.shape
    groups = heads // k.shape[1]
    n_q = q_len // bq
    kv_at = lambda b, i, t, bnd: _streamed(bnd, b, i, t, n_q)
    kv_block = lambda b, h, i, t, o, bnd: (b, div(h, groups), kv_at(b, i, t, bnd), 0)
    q_block = lambda b, h, i, t, o, bnd: (b, h, i, 0)
    return dict(
        q=pl.BlockSpec((None, None, bq, dim), q_block),
        kv=pl.BlockSpec((None, None, bk, dim), kv_block),
        row=pl.BlockSpec((None, None, bq, LANES), q_block),
        qseg=pl.BlockSpec((None, bq, LANES), lambda b, h, i, t, o, bnd: (b, i, 0)),
        kseg=pl.BlockSpec(
            (None, SUBLANES, bk), lambda b, h, i, t, o, bnd: (b, 0, kv_at(b, i, t, bnd))
        ),
    )


def _flat_kv_bounds(mask: MaskOperands, q_len: int, kv_len: int, bq: int, bk: int, cfg, b: int):
    """Key-block bounds per query block, flattened for SMEM (2-D SMEM arrays pad badly)."""
    return bounds.kv_loop_bounds(mask, q_len, kv_len, bq, bk, cfg, b).reshape(-1)


def forward(q, k, v, mask: MaskOperands, cfg: KernelConfig) -> tuple[jax.Array, jax.Array]:
    """Output ``[b, lq, h, d]`` and log-sum-exp ``[b, h, lq]`` (fp32)."""
    q, k, v = _to_bhld(q), _to_bhld(k), _to_bhld(v)
    b, heads, q_len, dim = q.shape
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    specs = _q_major_specs(q, k, bq, bk)
    qseg, kseg = _segment_inputs(mask)
    has_seg = qseg is not None
    in_specs = [
        specs["q"],
        specs["kv"],
        specs["kv"],
        specs["qseg"] if has_seg else None,
        specs["kseg"] if has_seg else None,
    ]
    scratch = [
        pltpu.VMEM((bq, LANES), jnp.float32),
        pltpu.VMEM((bq, LANES), jnp.float32),
        pltpu.VMEM((bq, dim), jnp.float32),
    ]
    kv_bounds = _flat_kv_bounds(mask, q_len, k.shape[2], bq, bk, cfg, b)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, n_q=q_len // bq),
        grid_spec=_grid_spec(
            (b, heads, q_len // bq, k.shape[2] // bk),
            in_specs,
            [specs["q"], specs["row"]],
            scratch,
        ),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, heads, q_len, LANES), jnp.float32),
        ],
        compiler_params=_params(PARALLEL, PARALLEL, PARALLEL, ARBITRARY),
        interpret=_interpret(cfg),
        name="flash_fwd",
    )(mask.q_offset, kv_bounds, q, k, v, qseg, kseg)
    # Keep one lane as the residual: 128x less memory saved for the backward.
    return _to_bhld(o), lse[..., 0]


# ----------------------------------------------------------------------------- dq


def _dq_kernel(
    off_ref, bnd_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref,
    dq_ref, dq_sc, *, cfg, n_q: int,
):  # fmt: skip
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    b, qi, t, offset = pl.program_id(0), pl.program_id(2), pl.program_id(3), off_ref[0]

    @pl.when(t == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked: bool):
        kj = _streamed(bnd_ref, b, qi, t, n_q)
        s = _logits(q_ref, k_ref, qseg_ref, kseg_ref, qi, kj, offset, cfg, bq, bk, masked)
        p = jnp.exp(s - _widen(lse_ref[...], bk))
        dp = mm(do_ref[...], v_ref[...].T)
        ds = p * (dp - _widen(delta_ref[...], bk))
        dq_sc[...] += mm(ds.astype(k_ref.dtype), k_ref[...])

    _run_step(*_step_kind(bnd_ref, b, qi, t, n_q), step)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dq(q, k, v, mask: MaskOperands, qseg, kseg, do, lse, delta, cfg: KernelConfig) -> jax.Array:
    b, heads, q_len, dim = q.shape
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    specs = _q_major_specs(q, k, bq, bk)
    has_seg = qseg is not None
    in_specs = [
        specs["q"],
        specs["kv"],
        specs["kv"],
        specs["qseg"] if has_seg else None,
        specs["kseg"] if has_seg else None,
        specs["q"],
        specs["row"],
        specs["row"],
    ]
    kv_bounds = _flat_kv_bounds(mask, q_len, k.shape[2], bq, bk, cfg, b)
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, n_q=q_len // bq),
        grid_spec=_grid_spec(
            (b, heads, q_len // bq, k.shape[2] // bk),
            in_specs,
            specs["q"],
            [pltpu.VMEM((bq, dim), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(PARALLEL, PARALLEL, PARALLEL, ARBITRARY),
        interpret=_interpret(cfg),
        name="flash_dq",
    )(mask.q_offset, kv_bounds, q, k, v, qseg, kseg, do, lse, delta)


# ----------------------------------------------------------------------------- dk, dv


def _dkv_kernel(
    off_ref, bnd_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref,
    dk_ref, dv_ref, dk_sc, dv_sc, *, cfg, n_q: int, n_k: int,
):  # fmt: skip
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    b, kj, t, offset = pl.program_id(0), pl.program_id(2), pl.program_id(3), off_ref[0]
    r = rem(t, n_q)

    @pl.when(t == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked: bool):
        qi = _streamed(bnd_ref, b, kj, r, n_k)
        s = _logits(q_ref, k_ref, qseg_ref, kseg_ref, qi, kj, offset, cfg, bq, bk, masked)
        p = jnp.exp(s - _widen(lse_ref[...], bk))
        do = do_ref[...]
        dv_sc[...] += mm(p.astype(do.dtype).T, do)
        ds = p * (mm(do, v_ref[...].T) - _widen(delta_ref[...], bk))
        dk_sc[...] += mm(ds.astype(q_ref.dtype).T, q_ref[...])

    _run_step(*_step_kind(bnd_ref, b, kj, r, n_k), step)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dkv(q, k, v, mask: MaskOperands, qseg, kseg, do, lse, delta, cfg: KernelConfig):
    """Grid (b, kv head, key block, group x query-block step); the last axis accumulates."""
    b, kv_heads, kv_len, dim = k.shape
    groups = q.shape[1] // kv_heads
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    n_q, n_k = q.shape[2] // bq, kv_len // bk

    def q_at(b, j, t, bnd):
        return _streamed(bnd, b, j, rem(t, n_q), n_k)

    head = lambda n, t: n * groups + div(t, n_q)
    q_block = lambda b, n, j, t, o, bnd: (b, head(n, t), q_at(b, j, t, bnd), 0)
    q_spec = pl.BlockSpec((None, None, bq, dim), q_block)
    row = pl.BlockSpec((None, None, bq, LANES), q_block)
    kv_spec = pl.BlockSpec((None, None, bk, dim), lambda b, n, j, t, o, bnd: (b, n, j, 0))
    has_seg = qseg is not None
    qseg_spec = pl.BlockSpec(
        (None, bq, LANES), lambda b, n, j, t, o, bnd: (b, q_at(b, j, t, bnd), 0)
    )
    kseg_spec = pl.BlockSpec((None, SUBLANES, bk), lambda b, n, j, t, o, bnd: (b, 0, j))
    in_specs = [
        q_spec,
        kv_spec,
        kv_spec,
        qseg_spec if has_seg else None,
        kseg_spec if has_seg else None,
        q_spec,
        row,
        row,
    ]
    q_bounds = bounds.q_loop_bounds(mask, q.shape[2], kv_len, bq, bk, cfg, b).reshape(-1)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, n_q=n_q, n_k=n_k),
        grid_spec=_grid_spec(
            (b, kv_heads, n_k, groups * n_q),
            in_specs,
            [kv_spec, kv_spec],
            [pltpu.VMEM((bk, dim), jnp.float32), pltpu.VMEM((bk, dim), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(PARALLEL, PARALLEL, PARALLEL, ARBITRARY),
        interpret=_interpret(cfg),
        name="flash_dkv",
    )(mask.q_offset, q_bounds, q, k, v, qseg, kseg, do, lse, delta)


def backward(q, k, v, mask: MaskOperands, do, lse, delta, cfg: KernelConfig):
    """``dq, dk, dv`` from the saved log-sum-exp and ``delta = rowsum(o * do)``."""
    q, k, v, do = (_to_bhld(x) for x in (q, k, v, do))
    qseg, kseg = _segment_inputs(mask)
    lanes = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, LANES))
    lse, delta = lanes(lse), lanes(delta)
    dq = _dq(q, k, v, mask, qseg, kseg, do, lse, delta, cfg)
    dk, dv = _dkv(q, k, v, mask, qseg, kseg, do, lse, delta, cfg)
    return _to_bhld(dq), _to_bhld(dk), _to_bhld(dv)
