"""Flash attention: the backend-independent half of the Pallas kernels.

FlashAttention-2 splits into a forward kernel (online softmax over key blocks,
saving the per-row log-sum-exp) and two backward kernels (dq over key blocks;
dk/dv over query blocks).  This module is the backend-independent wrapper
around the GPU (Triton; Mosaic GPU on Hopper) and TPU (Mosaic) kernels:
padding to whole blocks, picking the backend, and the ``custom_vjp`` that
wires forward to backward; the types and the in-block mask the kernels share
live in :mod:`blocks`, which both sides import (the backends never import this
module); which blocks each kernel program visits -- causality, packed
segments, the query offset -- comes from one XLA pre-pass in :mod:`bounds`
that every backend calls.  A backend module provides
``default_blocks(head_dim, dtype)``, ``MIN_BLOCK``, ``padded_head_dim(d)``,
``forward(q, k, v, mask, cfg) -> (o, lse)`` and
``backward(q, k, v, mask, do, lse, delta, cfg) -> (dq, dk, dv)`` on padded
``[batch, length, heads, head_dim]`` arrays, ``mask`` a :class:`MaskOperands`.

Queries and keys may differ in length: query row ``i`` sits at key position
``i + q_offset``.  Context parallelism needs exactly that -- each sequence
shard attends its own queries to the gathered keys -- and the offset is a
traced scalar (it comes from ``lax.axis_index`` inside ``shard_map``), so it
enters the kernels as an operand, not as part of the static config.

Masked logits are ``-inf`` and the running max starts at a finite floor, so a
query row with nothing to attend gets ``l = 0``: its output is written as zeros
and its log-sum-exp as ``+inf``, which makes every backward probability
``exp(-inf - inf) = 0`` instead of NaN.
"""

from __future__ import annotations

import functools
from types import ModuleType

import jax
import jax.numpy as jnp

from oasst_jax.attention.blocks import BlockSizes, KernelConfig, MaskOperands


def _backend_module(backend: str) -> ModuleType:
    if backend == "gpu":
        from oasst_jax.attention import pallas_gpu

        return pallas_gpu
    if backend == "tpu":
        from oasst_jax.attention import pallas_tpu

        return pallas_tpu
    if backend == "mosaic_gpu":
        from oasst_jax.attention import mosaic_gpu

        if reason := mosaic_gpu.unavailable():
            raise ValueError(f"flash attention: backend 'mosaic_gpu': {reason}")
        return mosaic_gpu
    raise ValueError(
        f"flash attention: unknown backend {backend!r}; choose 'gpu', 'mosaic_gpu' or 'tpu'"
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, mask: MaskOperands, cfg: KernelConfig):
    return _backend_module(cfg.backend).forward(q, k, v, mask, cfg)[0]


def _flash_fwd(q, k, v, mask: MaskOperands, cfg: KernelConfig):
    o, lse = _backend_module(cfg.backend).forward(q, k, v, mask, cfg)
    return o, (q, k, v, mask, o, lse)


def _flash_bwd(cfg: KernelConfig, res, do):
    q, k, v, mask, o, lse = res
    # delta_i = rowsum(o_i * do_i): one fused XLA reduction, cheaper than a kernel.
    delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
    dq, dk, dv = _backend_module(cfg.backend).backward(q, k, v, mask, do, lse, delta, cfg)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis(x: jax.Array, axis: int, size: int, mode: str = "constant") -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def _check_shapes(q, k, v, segment_ids, kv_segment_ids) -> None:
    b, q_len, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != head_dim:
        raise ValueError(
            f"flash attention: mismatched shapes q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if heads % k.shape[2]:
        raise ValueError(
            f"flash attention: {heads} query heads are not a multiple of {k.shape[2]} kv heads"
        )
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("flash attention: kv_segment_ids need (query) segment_ids too")
    if segment_ids is not None and kv_segment_ids is None and q_len != k.shape[1]:
        raise ValueError(
            f"flash attention: {q_len} queries and {k.shape[1]} keys need separate kv_segment_ids"
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    *,
    kv_segment_ids: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    causal: bool,
    softmax_scale: float | None,
    block_sizes: BlockSizes | None,
    backend: str,
    interpret: bool,
) -> jax.Array:
    """``q [b, lq, h, d]``, ``k/v [b, lk, kv, d]`` -> ``[b, lq, h, d]`` via the Pallas kernels.

    Query row ``i`` sits at key position ``i + q_offset`` (an int or a traced
    scalar) for the causal mask; ``segment_ids [b, lq]`` are the queries' ids,
    ``kv_segment_ids [b, lk]`` the keys' (default: the same array, lq == lk).
    Under causality queries must not lie past the last key
    (``q_offset + lq <= lk``, checked when the offset is an int): padded keys
    are then always in the future and need no mask of their own.

    Pads both lengths to whole blocks (and, where the backend needs it, the head
    dim), runs the differentiable kernel and slices the padding off again.
    """
    _check_shapes(q, k, v, segment_ids, kv_segment_ids)
    b, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    if causal and isinstance(q_offset, int) and q_offset + q_len > kv_len:
        raise ValueError(
            f"flash attention: causal queries at {q_offset}..{q_offset + q_len - 1} "
            f"lie past the last of {kv_len} keys"
        )
    mod = _backend_module(backend)
    blocks = block_sizes or mod.default_blocks(head_dim, q.dtype)
    blocks = blocks.fit(max(q_len, kv_len), mod.MIN_BLOCK)
    blocks.validate(mod.MIN_BLOCK)
    q_pad, kv_pad = (_round_up(n, blocks.largest) for n in (q_len, kv_len))
    cfg = KernelConfig(
        causal=causal,
        scale=head_dim**-0.5 if softmax_scale is None else float(softmax_scale),
        blocks=blocks,
        kv_len=kv_len if kv_pad != kv_len and not causal else None,
        has_segments=segment_ids is not None,
        interpret=interpret,
        backend=backend,
    )
    dim = mod.padded_head_dim(head_dim)
    q = _pad_axis(_pad_axis(q, 1, q_pad), 3, dim)
    k, v = (_pad_axis(_pad_axis(x, 1, kv_pad), 3, dim) for x in (k, v))
    if segment_ids is not None:
        kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        # Padding repeats the last id, so a block's id range (bounds.py) stays as
        # narrow as its real rows: padded queries get zero cotangents and
        # padded keys are hidden by causality or kv_len, whatever their id.
        segment_ids = _pad_axis(segment_ids.astype(jnp.int32), 1, q_pad, "edge")
        kv_segment_ids = _pad_axis(kv_ids.astype(jnp.int32), 1, kv_pad, "edge")
    offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
    out = _flash(q, k, v, MaskOperands(segment_ids, kv_segment_ids, offset), cfg)
    return out[:, :q_len, :, :head_dim]
