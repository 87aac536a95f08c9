"""Flash attention: the backend-independent half of the Pallas kernels.

FlashAttention-2 splits into a forward kernel (online softmax over key blocks,
saving the per-row log-sum-exp) and two backward kernels (dq over key blocks;
dk/dv over query blocks).  This module owns everything the GPU (Triton) and TPU
(Mosaic) kernels share: block sizes, padding to whole blocks, the in-block
mask, and the ``custom_vjp`` that wires forward to backward.  A backend module
provides ``DEFAULT_BLOCKS``, ``MIN_BLOCK``, ``padded_head_dim(d)``,
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

import dataclasses
import functools
from types import ModuleType
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Running-max floor: finite so that exp(m_prev - m_next) stays 1 (not NaN) while
# every logit seen so far is masked.
M_FLOOR = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (query rows x key rows) for the three kernels; powers of two.

    The forward and the two backward kernels have different register/VMEM
    pressure, so each gets its own pair (the Triton tutorial's H100 choice is
    128x64 forward, 32x128 for dk/dv, 128x32 for dq).
    """

    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int

    @classmethod
    def uniform(cls, block: int) -> BlockSizes:
        return cls(block, block, block, block, block, block)

    def fit(self, length: int, minimum: int) -> BlockSizes:
        """Shrink blocks longer than the (power-of-two-rounded) sequence.

        ``minimum`` is the backend's smallest legal tile (16 rows for a Triton
        ``dot``, 128 lanes on TPU), so short sequences are padded up to it.
        """
        cap = max(minimum, 1 << max(length - 1, 0).bit_length())
        return BlockSizes(*(min(b, cap) for b in dataclasses.astuple(self)))

    def validate(self, minimum: int) -> None:
        for name, b in dataclasses.asdict(self).items():
            if b < minimum or b & (b - 1):
                raise ValueError(f"flash attention: {name}={b} must be a power of two >= {minimum}")

    @property
    def largest(self) -> int:
        return max(dataclasses.astuple(self))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static (hashable) description of one kernel launch."""

    causal: bool
    scale: float
    blocks: BlockSizes
    # Real key length when non-causal attention must hide padded keys; None when
    # there is no padding or causality already hides it (queries never lie past
    # the last real key, see flash_attention).
    kv_len: int | None
    has_segments: bool
    interpret: bool
    backend: str


class MaskOperands(NamedTuple):
    """The traced inputs of the mask, kept apart from the (static) config.

    ``q_segment_ids [b, lq]`` / ``kv_segment_ids [b, lk]`` are int32 or both
    None; ``q_offset`` is an int32 ``[1]`` array: the key position of query row 0.
    """

    q_segment_ids: jax.Array | None
    kv_segment_ids: jax.Array | None
    q_offset: jax.Array


def block_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array | None,
    k_seg: jax.Array | None,
    cfg: KernelConfig,
) -> jax.Array | None:
    """``[block_q, block_k]`` True where a query may attend a key; None if all may.

    ``q_pos``/``q_seg`` are ``[block_q, 1]`` and ``k_pos``/``k_seg`` ``[1, block_k]``
    (already broadcastable), which both Triton and Mosaic lower without relayout;
    ``q_pos`` already includes the query offset.
    """
    mask = None
    if cfg.causal:
        mask = q_pos >= k_pos
    if q_seg is not None:
        same = q_seg == k_seg
        mask = same if mask is None else mask & same
    if cfg.kv_len is not None:
        real = k_pos < cfg.kv_len
        mask = real if mask is None else mask & real
    return mask


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` accumulated in fp32; fp32 inputs stay fp32 (no TF32/bf16 passes).

    The precision is always explicit: a global ``jax_default_matmul_precision``
    of ``highest`` would otherwise reach bf16 dots, which Mosaic rejects.
    """
    fp32 = a.dtype == jnp.float32
    precision = lax.Precision.HIGHEST if fp32 else lax.Precision.DEFAULT
    return lax.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def div(a, b: int):
    """Floor division of non-negative ints.

    ``//`` on traced ints adds sign corrections that neither Triton (type
    mismatch) nor Mosaic (needs the chip generation) lowers; ``lax.div`` is exact
    for the non-negative block indices used here.
    """
    return lax.div(a, b) if isinstance(a, jax.Array) else a // b


def rem(a, b: int):
    return lax.rem(a, b) if isinstance(a, jax.Array) else a % b


def cdiv(a, b: int):
    return div(a + b - 1, b)


def _backend_module(backend: str) -> ModuleType:
    if backend == "gpu":
        from oasst_jax.attention import pallas_gpu

        return pallas_gpu
    if backend == "tpu":
        from oasst_jax.attention import pallas_tpu

        return pallas_tpu
    raise ValueError(f"flash attention: unknown backend {backend!r}; choose 'gpu' or 'tpu'")


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


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


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
    blocks = (block_sizes or mod.DEFAULT_BLOCKS).fit(max(q_len, kv_len), mod.MIN_BLOCK)
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
        segment_ids = _pad_axis(segment_ids.astype(jnp.int32), 1, q_pad)
        kv_segment_ids = _pad_axis(kv_ids.astype(jnp.int32), 1, kv_pad)
    offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
    out = _flash(q, k, v, MaskOperands(segment_ids, kv_segment_ids, offset), cfg)
    return out[:, :q_len, :, :head_dim]
