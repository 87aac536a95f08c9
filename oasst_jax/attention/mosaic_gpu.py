"""Flash attention kernels for Hopper: Pallas lowered to Mosaic GPU (jax >= 0.11).

The same three kernels as :mod:`pallas_gpu` (forward, dq, dk/dv; same layout
``[batch, length, heads, head_dim]``, same log2-unit log-sum-exp, same loop
bounds from :mod:`bounds`), written for what Hopper adds and Triton only
reaches through its compiler's heuristics: **warp specialization** -- each
program is ``1 + n`` warpgroups, a *memory* warpgroup that only issues TMA
copies into a ring of shared-memory slots (``STAGES`` deep) and gives its
registers away (``setmaxnreg``), and ``n`` *compute* warpgroups of 64 rows
each that run ``wgmma`` from shared memory and hand each slot back through a
barrier.  The streamed blocks are exactly those the pre-pass marks visible, so
causally-future and other-sample blocks are never copied; the fully-visible
run skips the mask, as in the Triton kernels.

Shapes Mosaic GPU's ``wgmma`` and 128-byte swizzled TMA need: tiles are
multiples of 64 rows and the head dim is padded to 64 or 128 (zero columns
change no dot product); inputs are bf16 or fp16 (fp32 accumulation).  fp32
inputs and head dims over 128 stay on the Triton kernels (:func:`supports`),
and so does dk/dv at head dim 128 (:func:`backward`: it spills here).

Where these kernels differ from FlashAttention-3 so that GPU interpret mode --
the only way to run them without a GPU -- runs the code the GPU runs: the
probabilities (and dS) reach wgmma through shared memory, not registers, and
only the forward's rescaled accumulator uses ``run_state`` (on the GPU; see
:func:`_dot_acc`); dq, dk and dv accumulate in place in wgmma accumulators.

Grouped-query attention: a forward / dq program reads the kv head of its
query head (``h // groups``) directly; a dk/dv program streams the query
blocks of every head of its group, so k/v are never repeated and dk/dv need
no reduction outside the kernel.

Hand-written because jax's own Mosaic GPU attention
(``pallas.ops.gpu.attention_mgpu``) has no segment ids, no block skipping, no
query offset and no causal backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from oasst_jax.attention import bounds, pallas_gpu
from oasst_jax.attention.blocks import (
    M_FLOOR,
    BlockSizes,
    KernelConfig,
    MaskOperands,
    div,
    rem,
)

MIN_BLOCK = 64  # wgmma's M per warpgroup, and the 128-byte swizzle's 64 bf16 columns
ROWS = 64  # rows a compute warpgroup owns
STAGES = 2  # depth of the shared-memory ring the memory warpgroup fills
MAX_HEAD_DIM = 128
LOG2E = math.log2(math.e)
RCP_LN2 = 1.0 / math.log(2.0)
# setmaxnreg budgets (multiples of 8) by compute warpgroups: 2 x 232 + 40 (the memory
# warpgroup), times 128 threads, is 64,512 of an SM's 65,536 registers -- FlashAttention-3's
# split; one compute warpgroup takes the most ptxas allocates (a multiple of 8 <= 255).
COMPUTE_REGISTERS = {1: 248, 2: 232}
MEMORY_REGISTERS = 40
TRITON_DKV_ABOVE = 64  # head dims whose dk/dv run the Triton kernel (see backward)
MIN_JAX = (0, 11)  # GPU interpret mode and the Mosaic GPU API this module is written for
DTYPES = (jnp.bfloat16, jnp.float16)


def jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.__version__.split(".")[:2])


def unavailable() -> str:
    """Why this backend cannot run with the installed jax ('' when it can)."""
    if jax_version() < MIN_JAX:
        return (
            f"Mosaic GPU flash attention needs jax >= {'.'.join(map(str, MIN_JAX))} "
            f"(its GPU interpret mode and API); jax {jax.__version__} is installed"
        )
    return ""


def supports(head_dim: int, dtype) -> bool:
    """Whether these kernels take the shape (else Triton does)."""
    return head_dim <= MAX_HEAD_DIM and jnp.dtype(dtype) in map(jnp.dtype, DTYPES)


def padded_head_dim(head_dim: int) -> int:
    """64 or 128: one or two 64-column swizzle tiles of a bf16/fp16 row."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"flash attention (Mosaic GPU): head dim {head_dim} > {MAX_HEAD_DIM}; "
            "use attention_impl='xla' or 'cudnn'"
        )
    return 64 if head_dim <= 64 else MAX_HEAD_DIM


def default_blocks(head_dim: int, dtype=jnp.bfloat16) -> BlockSizes:
    """Tiles whose kernels ptxas (sm_90a) compiles without a spill (tests/test_mosaic_gpu.py).

    A program of ``w`` compute warpgroups and one memory warpgroup gets
    ``65536 / (128 (w + 1))`` registers a thread: 168 at two compute warpgroups (128
    query or key rows; FlashAttention-3's layout).  Forward and dq stream 128 keys at
    head dim 64 and 64 at 128 (a ``[64, 128]`` fp32 score tile beside the ``[64, 128]``
    accumulator spills at 168).  dk/dv (head dim 64 only, see :func:`backward`) holds
    two ``[64, 64]`` accumulators and streams 64 queries.
    """
    if not supports(head_dim, dtype):
        raise ValueError(
            f"flash attention (Mosaic GPU): {jnp.dtype(dtype).name} inputs at head dim "
            f"{head_dim}; the kernels take bf16/fp16 up to {MAX_HEAD_DIM} (backend='gpu' "
            "runs the Triton kernels for the rest)"
        )
    d = padded_head_dim(head_dim)
    return BlockSizes(
        block_q=2 * ROWS,
        block_k=128 if d <= 64 else 64,
        block_q_dkv=64,
        block_k_dkv=2 * ROWS,
        block_q_dq=2 * ROWS,
        block_k_dq=64,
    )


def _tiled(shape, dtype) -> plgpu.SMEM:
    """Shared memory in the layout wgmma reads: 8x64 tiles, 128-byte swizzle."""
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _iota(shape, dim: int) -> jax.Array:
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _vector(ref, layout) -> jax.Array:
    return plgpu.load(ref, layout=layout)


def _rows(x: jax.Array, shape) -> jax.Array:
    """A per-row vector ``[shape[0]]`` broadcast along the columns."""
    return lax.broadcast_in_dim(x, shape, [0])


def _cols(x: jax.Array, shape) -> jax.Array:
    """A per-column vector ``[shape[1]]`` broadcast along the rows."""
    return lax.broadcast_in_dim(x, shape, [1])


def _dot(a, b, shape) -> jax.Array:
    """``a @ b`` on wgmma into a fresh fp32 accumulator ``shape``."""

    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def _stage(a_smem, a: jax.Array) -> None:
    """Write ``a`` (registers) to shared memory as a wgmma operand (in the input dtype)."""
    a_smem[...] = a.astype(a_smem.dtype)
    plgpu.commit_smem()


def _dot_acc(acc: jax.Array, a: jax.Array, b, a_smem, interpret: bool) -> jax.Array:
    """``acc + a @ b`` on wgmma, ``a`` (registers) staged through shared memory ``a_smem``.

    On the GPU the product accumulates into ``acc``'s own registers
    (``pl.run_state(...)(ACC.init(acc))``, as FlashAttention-3): a separate product
    tile is one more ``[64, d]`` fp32 tile in 168 registers a thread.  GPU interpret
    mode cannot run ``run_state`` (jax 0.11.2: "Cannot lower jaxpr with effects:
    {_WGMMAPipelineEffect, IOEffect}"), so there the product lands in a fresh
    accumulator that is added -- the same sum.
    ``a`` goes through shared memory (as in FlashAttention-2, not FA3's register
    operand) on both: the interpreter's wgmma takes shared-memory operands only
    ("Expected shape (6,) but got (64, 128)" for a register one), and the kernels must
    be the code that is tested.
    """
    _stage(a_smem, a)
    if interpret:
        return acc + _dot(a_smem, b, acc.shape)

    def update(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b)

    return pl.run_state(update)(plgpu.ACC.init(acc))


def _zeros(shape) -> jax.Array:
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Shared-memory slots the memory warpgroup fills and the compute warpgroups drain.

    ``bufs[i]`` is ``[STAGES, ...]``; ``ready[i]`` one barrier per slot per buffer
    (each TMA copy arrives on its own); ``consumed`` one per slot that every compute
    warpgroup arrives on once it is done with the whole slot.
    """

    bufs: tuple
    ready: tuple
    consumed: object

    def produce(self, sources, n: jax.Array) -> None:
        """Copy step ``c``'s operands ``sources(c)`` (GMEM refs) for ``c`` in ``[0, n)``."""

        def issue(c):
            slot = rem(c, STAGES)
            for src, buf, bar in zip(sources(c), self.bufs, self.ready, strict=True):
                plgpu.copy_gmem_to_smem(src, buf.at[slot], bar.at[slot])

        for c in range(STAGES):
            pl.when(c < n)(functools.partial(issue, c))

        def refill(c, carry):
            plgpu.barrier_wait(self.consumed.at[rem(c, STAGES)])
            issue(c)
            return carry

        def drain(c, carry):
            plgpu.barrier_wait(self.consumed.at[rem(c, STAGES)])
            return carry

        lax.fori_loop(STAGES, n, refill, None)
        # Wait out the last slots' releases too: every completed phase of a barrier is
        # observed (GPU interpret mode checks it), and no copy outlives its readers.
        lax.fori_loop(jnp.maximum(n - STAGES, 0), n, drain, None)

    def wait(self, c) -> list:
        """The slot of step ``c``, once all its copies have landed."""
        slot = rem(c, STAGES)
        for bar in self.ready:
            plgpu.barrier_wait(bar.at[slot])
        return [buf.at[slot] for buf in self.bufs]

    def release(self, c) -> None:
        plgpu.barrier_arrive(self.consumed.at[rem(c, STAGES)])


def _kv_ring(bk: int, dim: int, dtype, has_segments: bool) -> list:
    """The ring buffers of a pass that streams K/V blocks (forward, dq): K, V and, with
    packed rows, the keys' segment ids, ``bk`` rows a slot."""
    ring = [_tiled((STAGES, bk, dim), dtype)] * 2
    if has_segments:
        ring.append(plgpu.SMEM((STAGES, bk), jnp.int32))
    return ring


def _produce_kv(ring: _Ring, refs, bi, kv_head, lo, hi, bk: int) -> None:
    """The memory warpgroup of a K/V-streaming pass: K/V blocks ``lo..hi-1`` of batch row
    ``bi`` and KV head ``kv_head`` into ``ring`` (``refs``: K, V, key segment ids or None)."""
    k_ref, v_ref, kseg_ref = refs

    def sources(c):
        rows = pl.ds((lo + c) * bk, bk)
        srcs = [k_ref.at[bi, rows, kv_head], v_ref.at[bi, rows, kv_head]]
        return srcs + ([kseg_ref.at[bi, rows]] if kseg_ref is not None else [])

    ring.produce(sources, hi - lo)


def _ring_scratch(shapes, wgs: int) -> dict:
    """Scratch of a :class:`_Ring`: ``shapes`` are (SMEM type per slot) for each buffer."""
    return dict(
        ring_bufs=tuple(shapes),
        ring_ready=tuple(plgpu.Barrier(num_barriers=STAGES) for _ in shapes),
        ring_consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=STAGES),
    )


def _kernel(body, *, name: str, wgs: int, grid, out_type, scratch, cfg: KernelConfig):
    """A warp-specialized Mosaic GPU kernel: ``wgs`` compute warpgroups + 1 memory one."""
    interpret = plgpu.InterpretGPUParams() if cfg.interpret else None
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=("tile", "heads", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
        kernel_name=name,
    )


def _split(refs, has_segments: bool, n_in: int):
    """``(inputs, segment refs or (None, None), outputs)`` of a kernel body's refs."""
    inputs, rest = refs[:n_in], refs[n_in:]
    if has_segments:
        return inputs, rest[:2], rest[2:]
    return inputs, (None, None), rest


def _warp_roles(wgs: int, compute, memory) -> None:
    """Warpgroups ``0..wgs-1`` run ``compute(wg)``, warpgroup ``wgs`` runs ``memory()``."""
    wg = lax.axis_index("wg")

    @pl.when(wg < wgs)
    def _():
        plgpu.set_max_registers(COMPUTE_REGISTERS[wgs], action="increase")
        compute(wg)

    @pl.when(wg == wgs)
    def _():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
        memory()


def _program(n_tiles: int):
    """``(tile, head, batch)`` of this program; causal tiles run heaviest (last) first."""
    return n_tiles - 1 - lax.axis_index("tile"), lax.axis_index("heads"), lax.axis_index("batch")


def _loop_fields(bounds_ref, bi, tile):
    return [bounds_ref[bi, tile, f] for f in range(bounds.N_FIELDS)]


def _three_loops(lo, full_lo, full_hi, hi, body, carry):
    """``body(j, carry, masked)`` over ``[lo, hi)``: masked, unmasked, masked (see bounds)."""
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _mask_scores(s, q_start, k_start, segs, cfg: KernelConfig, transposed: bool = False):
    """``s`` (``[queries, keys]``, or ``[keys, queries]`` when ``transposed``) with
    ``-inf`` where :func:`blocks.block_mask` says no; ``segs``: the shared-memory refs of
    the block's query and key segment ids, or None.

    The same predicate as ``block_mask``, applied one condition at a time with its
    operands built right before it: at 168 registers a thread (or dk/dv's two ``[64, d]``
    accumulators) four ``[64, 64]`` int32 tiles live at once spill.
    """
    q_dim, k_dim = (1, 0) if transposed else (0, 1)
    wgmma = plgpu.Layout.WGMMA
    k_pos = lambda: k_start + _iota(s.shape, k_dim)
    if cfg.causal:
        s = jnp.where(q_start + _iota(s.shape, q_dim) >= k_pos(), s, -jnp.inf)
    if segs is not None:
        q_seg = lax.broadcast_in_dim(_vector(segs[0], wgmma.reduce(k_dim)), s.shape, [q_dim])
        k_seg = lax.broadcast_in_dim(_vector(segs[1], wgmma.reduce(q_dim)), s.shape, [k_dim])
        s = jnp.where(q_seg == k_seg, s, -jnp.inf)
    if cfg.kv_len is not None:
        s = jnp.where(k_pos() < cfg.kv_len, s, -jnp.inf)
    return s


# ----------------------------------------------------------------------------- forward


def forward(q, k, v, mask: MaskOperands, cfg: KernelConfig) -> tuple[jax.Array, jax.Array]:
    """Output ``[b, lq, h, d]`` and log-sum-exp ``[b, h, lq]`` (fp32, log2 units)."""
    b, q_len, heads, dim = q.shape
    kv_len, groups = k.shape[1], heads // k.shape[2]
    tile, bk = cfg.blocks.block_q, cfg.blocks.block_k
    wgs, dtype, has_seg = tile // ROWS, q.dtype, cfg.has_segments
    kv_bounds = bounds.kv_loop_bounds(mask, q_len, kv_len, tile, bk, cfg, b)
    scale = cfg.scale * LOG2E  # logits in log2 units: exp2 below
    s_shape = (ROWS, bk)

    def body(*refs, qo, p_smem, lse_smem, qseg, q_bar, ring_bufs, ring_ready, ring_consumed):
        (off_ref, bounds_ref, q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), outs = _split(
            refs, has_seg, 5
        )
        o_ref, lse_ref = outs
        qi, h, bi = _program(q_len // tile)
        lo, full_lo, full_hi, hi = _loop_fields(bounds_ref, bi, qi)
        ring = _Ring(ring_bufs, ring_ready, ring_consumed)

        def compute(wg):
            base = qi * tile + wg * ROWS
            q_smem = qo.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(base, ROWS), h], q_smem, q_bar.at[2 * wg])
            if has_seg:
                plgpu.copy_gmem_to_smem(
                    qseg_ref.at[bi, pl.ds(base, ROWS)], qseg.at[wg], q_bar.at[2 * wg + 1]
                )
                plgpu.barrier_wait(q_bar.at[2 * wg + 1])
            plgpu.barrier_wait(q_bar.at[2 * wg])
            q_start = off_ref[0] + base

            def step(j, carry, masked: bool):
                acc, m, denom = carry
                k_smem, v_smem, *kseg_smem = ring.wait(j - lo)
                s = _dot(q_smem, k_smem.transpose((1, 0)), s_shape) * scale
                if masked:
                    segs = (qseg.at[wg], kseg_smem[0]) if has_seg else None
                    s = _mask_scores(s, q_start, j * bk, segs, cfg)
                m_next = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_next)
                p = jnp.exp2(s - _rows(m_next, s_shape))
                denom = denom * alpha + p.sum(axis=1)
                acc = acc * _rows(alpha, acc.shape)
                acc = _dot_acc(acc, p, v_smem, p_smem.at[wg], cfg.interpret)
                ring.release(j - lo)
                return acc, m_next, denom

            row = plgpu.Layout.WGMMA.reduce(1)
            carry = (
                _zeros((ROWS, dim)),
                plgpu.layout_cast(jnp.full((ROWS,), M_FLOOR, jnp.float32), row),
                plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row),
            )
            acc, m, denom = _three_loops(lo, full_lo, full_hi, hi, step, carry)
            empty = denom == 0.0  # nothing to attend: output 0, lse +inf (see flash.py)
            safe = jnp.where(empty, 1.0, denom)
            q_smem[...] = (acc / _rows(safe, acc.shape)).astype(dtype)
            lse_smem.at[wg][...] = jnp.where(empty, jnp.inf, m + jnp.log(safe) * RCP_LN2)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, pl.ds(base, ROWS), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, h, pl.ds(base, ROWS)])
            plgpu.wait_smem_to_gmem(0)

        def memory():
            _produce_kv(ring, (k_ref, v_ref, kseg_ref), bi, div(h, groups), lo, hi, bk)

        _warp_roles(wgs, compute, memory)

    ring = _kv_ring(bk, dim, dtype, has_seg)
    scratch = dict(
        qo=_tiled((wgs, ROWS, dim), dtype),
        p_smem=_tiled((wgs, ROWS, bk), dtype),
        lse_smem=plgpu.SMEM((wgs, ROWS), jnp.float32),
        qseg=plgpu.SMEM((wgs, ROWS), jnp.int32),
        q_bar=plgpu.Barrier(num_barriers=2 * wgs),
        **_ring_scratch(ring, wgs),
    )
    kernel = _kernel(
        body,
        name="mosaic_flash_fwd",
        wgs=wgs,
        grid=(q_len // tile, heads, b),
        out_type=(
            jax.ShapeDtypeStruct(q.shape, dtype),
            jax.ShapeDtypeStruct((b, heads, q_len), jnp.float32),
        ),
        scratch=scratch,
        cfg=cfg,
    )
    segs = mask[:2] if has_seg else ()
    return kernel(mask.q_offset, kv_bounds, q, k, v, *segs)


# ----------------------------------------------------------------------------- dq


def _dq(q, k, v, mask: MaskOperands, do, lse, delta, cfg: KernelConfig) -> jax.Array:
    b, q_len, heads, dim = q.shape
    kv_len, groups = k.shape[1], heads // k.shape[2]
    tile, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    wgs, dtype, has_seg = tile // ROWS, q.dtype, cfg.has_segments
    kv_bounds = bounds.kv_loop_bounds(mask, q_len, kv_len, tile, bk, cfg, b)
    scale = cfg.scale * LOG2E
    s_shape = (ROWS, bk)
    row = plgpu.Layout.WGMMA.reduce(1)

    def body(
        *refs, q_smem, do_smem, p_smem, stats, qseg, q_bar, ring_bufs, ring_ready, ring_consumed
    ):  # fmt: skip
        ins, (qseg_ref, kseg_ref), (dq_ref,) = _split(refs, has_seg, 8)
        off_ref, bounds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
        qi, h, bi = _program(q_len // tile)
        lo, full_lo, full_hi, hi = _loop_fields(bounds_ref, bi, qi)
        ring = _Ring(ring_bufs, ring_ready, ring_consumed)

        def compute(wg):
            base = qi * tile + wg * ROWS
            rows = pl.ds(base, ROWS)
            loads = [
                (q_ref.at[bi, rows, h], q_smem.at[wg]),
                (do_ref.at[bi, rows, h], do_smem.at[wg]),
                (lse_ref.at[bi, h, rows], stats.at[wg, 0]),
                (delta_ref.at[bi, h, rows], stats.at[wg, 1]),
            ]
            if has_seg:
                loads.append((qseg_ref.at[bi, rows], qseg.at[wg]))
            for n, (src, dst) in enumerate(loads):
                plgpu.copy_gmem_to_smem(src, dst, q_bar.at[5 * wg + n])
            for n in range(len(loads)):
                plgpu.barrier_wait(q_bar.at[5 * wg + n])
            lse, delta = _vector(stats.at[wg, 0], row), _vector(stats.at[wg, 1], row)
            q_start = off_ref[0] + base

            def accumulate(dq_acc):
                def step(j, carry, masked: bool):
                    k_smem, v_smem, *kseg_smem = ring.wait(j - lo)
                    s = _dot(q_smem.at[wg], k_smem.transpose((1, 0)), s_shape) * scale
                    if masked:
                        segs = (qseg.at[wg], kseg_smem[0]) if has_seg else None
                        s = _mask_scores(s, q_start, j * bk, segs, cfg)
                    p = jnp.exp2(s - _rows(lse, s_shape))
                    dp = _dot(do_smem.at[wg], v_smem.transpose((1, 0)), s_shape)
                    _stage(p_smem.at[wg], p * (dp - _rows(delta, s_shape)))
                    plgpu.wgmma(dq_acc, p_smem.at[wg], k_smem)
                    plgpu.wgmma_wait(0)  # k_smem is read until here: then hand the slot back
                    ring.release(j - lo)
                    return carry

                _three_loops(lo, full_lo, full_hi, hi, step, None)
                return dq_acc[...]

            dq = pl.run_scoped(accumulate, plgpu.ACC((ROWS, dim), jnp.float32))
            q_smem.at[wg][...] = (dq * cfg.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[bi, rows, h])
            plgpu.wait_smem_to_gmem(0)

        def memory():
            _produce_kv(ring, (k_ref, v_ref, kseg_ref), bi, div(h, groups), lo, hi, bk)

        _warp_roles(wgs, compute, memory)

    ring = _kv_ring(bk, dim, dtype, has_seg)
    scratch = dict(
        q_smem=_tiled((wgs, ROWS, dim), dtype),
        do_smem=_tiled((wgs, ROWS, dim), dtype),
        p_smem=_tiled((wgs, ROWS, bk), dtype),
        stats=plgpu.SMEM((wgs, 2, ROWS), jnp.float32),
        qseg=plgpu.SMEM((wgs, ROWS), jnp.int32),
        q_bar=plgpu.Barrier(num_barriers=5 * wgs),
        **_ring_scratch(ring, wgs),
    )
    kernel = _kernel(
        body,
        name="mosaic_flash_dq",
        wgs=wgs,
        grid=(q_len // tile, heads, b),
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch=scratch,
        cfg=cfg,
    )
    segs = mask[:2] if has_seg else ()
    return kernel(mask.q_offset, kv_bounds, q, k, v, do, lse, delta, *segs)


# ----------------------------------------------------------------------------- dk, dv


def _dkv(q, k, v, mask: MaskOperands, do, lse, delta, cfg: KernelConfig):
    """One program per (key tile, kv head, batch row); each compute warpgroup owns 64 key
    rows and works on transposed scores ``[64 keys, bq queries]`` (FA2 orientation: every
    wgmma has the key rows as M).  Streamed step ``c`` is query block ``lo + c // groups``
    of query head ``groups * n + c % groups``."""
    b, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, tile = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    wgs, dtype, has_seg = tile // ROWS, q.dtype, cfg.has_segments
    q_bounds = bounds.q_loop_bounds(mask, q_len, kv_len, bq, tile, cfg, b)
    scale = cfg.scale * LOG2E
    s_shape = (ROWS, bq)
    col = plgpu.Layout.WGMMA.reduce(0)

    def body(*refs, k_smem, v_smem, p_smem, kseg, kv_bar, ring_bufs, ring_ready, ring_consumed):
        ins, (qseg_ref, kseg_ref), (dk_ref, dv_ref) = _split(refs, has_seg, 8)
        off_ref, bounds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
        kj, n, bi = _program(kv_len // tile)
        lo, full_lo, full_hi, hi = _loop_fields(bounds_ref, bi, kj)
        ring = _Ring(ring_bufs, ring_ready, ring_consumed)
        offset = off_ref[0]

        def compute(wg):
            base = kj * tile + wg * ROWS
            rows = pl.ds(base, ROWS)
            loads = [(k_ref.at[bi, rows, n], k_smem.at[wg]), (v_ref.at[bi, rows, n], v_smem.at[wg])]
            if has_seg:
                loads.append((kseg_ref.at[bi, rows], kseg.at[wg]))
            for i, (src, dst) in enumerate(loads):
                plgpu.copy_gmem_to_smem(src, dst, kv_bar.at[3 * wg + i])
            for i in range(len(loads)):
                plgpu.barrier_wait(kv_bar.at[3 * wg + i])

            def accumulate(dk_acc, dv_acc):
                def step(c, carry, masked: bool):
                    q_s, do_s, lse_s, delta_s, *qseg_s = ring.wait(c)
                    s_t = _dot(k_smem.at[wg], q_s.transpose((1, 0)), s_shape) * scale
                    if masked:
                        q_start = offset + (lo + div(c, groups)) * bq
                        segs = (qseg_s[0], kseg.at[wg]) if has_seg else None
                        s_t = _mask_scores(s_t, q_start, base, segs, cfg, transposed=True)
                    p_t = jnp.exp2(s_t - _cols(_vector(lse_s, col), s_shape))
                    _stage(p_smem.at[wg], p_t)
                    plgpu.wgmma(dv_acc, p_smem.at[wg], do_s)
                    # reading dp_t waits for every wgmma issued, dv's too: p_smem is free
                    dp_t = _dot(v_smem.at[wg], do_s.transpose((1, 0)), s_shape)
                    _stage(p_smem.at[wg], p_t * (dp_t - _cols(_vector(delta_s, col), s_shape)))
                    plgpu.wgmma(dk_acc, p_smem.at[wg], q_s)
                    plgpu.wgmma_wait(0)  # q_s is read until here: then hand the slot back
                    ring.release(c)
                    return carry

                bounds_c = [groups * (x - lo) for x in (lo, full_lo, full_hi, hi)]
                _three_loops(*bounds_c, step, None)
                return dk_acc[...], dv_acc[...]

            acc = plgpu.ACC((ROWS, dim), jnp.float32)
            dk, dv = pl.run_scoped(accumulate, acc, acc)
            k_smem.at[wg][...] = (dk * cfg.scale).astype(dtype)
            v_smem.at[wg][...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[bi, rows, n])
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[bi, rows, n])
            plgpu.wait_smem_to_gmem(0)

        def memory():
            def sources(c):
                i, h = lo + div(c, groups), n * groups + rem(c, groups)
                rows = pl.ds(i * bq, bq)
                srcs = [
                    q_ref.at[bi, rows, h],
                    do_ref.at[bi, rows, h],
                    lse_ref.at[bi, h, rows],
                    delta_ref.at[bi, h, rows],
                ]
                return srcs + ([qseg_ref.at[bi, rows]] if has_seg else [])

            ring.produce(sources, groups * (hi - lo))

        _warp_roles(wgs, compute, memory)

    ring = [_tiled((STAGES, bq, dim), dtype)] * 2 + [plgpu.SMEM((STAGES, bq), jnp.float32)] * 2
    if has_seg:
        ring.append(plgpu.SMEM((STAGES, bq), jnp.int32))
    scratch = dict(
        k_smem=_tiled((wgs, ROWS, dim), dtype),
        v_smem=_tiled((wgs, ROWS, dim), dtype),
        p_smem=_tiled((wgs, ROWS, bq), dtype),
        kseg=plgpu.SMEM((wgs, ROWS), jnp.int32),
        kv_bar=plgpu.Barrier(num_barriers=3 * wgs),
        **_ring_scratch(ring, wgs),
    )
    out = jax.ShapeDtypeStruct(k.shape, dtype)
    kernel = _kernel(
        body,
        name="mosaic_flash_dkv",
        wgs=wgs,
        grid=(kv_len // tile, kv_heads, b),
        out_type=(out, out),
        scratch=scratch,
        cfg=cfg,
    )
    segs = mask[:2] if has_seg else ()
    return kernel(mask.q_offset, q_bounds, q, k, v, do, lse, delta, *segs)


def backward(q, k, v, mask: MaskOperands, do, lse, delta, cfg: KernelConfig):
    """``dq, dk, dv`` from the saved log-sum-exp (log2 units) and ``delta = rowsum(o * do)``.

    dk/dv at head dim 128 runs the Triton kernel (:mod:`pallas_gpu`, its own tiles; the
    same padded layout and log2 log-sum-exp): this kernel's two ``[64, 128]`` fp32
    accumulators beside its score tiles spill even at 255 registers (ptxas, sm_90a:
    48 B stored, 108 B loaded with one compute warpgroup), see :func:`default_blocks`.
    """
    dq = _dq(q, k, v, mask, do, lse, delta, cfg)
    if q.shape[-1] > TRITON_DKV_ABOVE:
        triton = dataclasses.replace(
            cfg, blocks=pallas_gpu.default_blocks(q.shape[-1], q.dtype), backend="gpu"
        )
        dk, dv = pallas_gpu._dkv(q, k, v, mask, do, lse, delta, triton)
    else:
        dk, dv = _dkv(q, k, v, mask, do, lse, delta, cfg)
    return dq, dk, dv
