"""What the flash-attention kernels share: tiles, launch config, mask, index arithmetic.

A leaf module: the backend kernels (:mod:`pallas_gpu` Triton, :mod:`pallas_tpu`
Mosaic) and the backend-independent wrapper (:mod:`flash`) all import it, and it
imports none of them.  :class:`BlockSizes` are the tile sizes; :class:`KernelConfig`
the static description of one launch; :class:`MaskOperands` its traced mask
inputs; :func:`block_mask` the in-block mask; ``mm``/``div``/``rem``
arithmetic both Triton and Mosaic lower.
"""

from __future__ import annotations

import dataclasses
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
