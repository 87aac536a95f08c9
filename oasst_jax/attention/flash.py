"""Flash attention: the backend-independent half of the Pallas kernels.

FlashAttention-2 splits into a forward kernel (online softmax over key blocks,
saving the per-row log-sum-exp) and two backward kernels (dq over key blocks;
dk/dv over query blocks).  This module owns everything the GPU (Triton) and TPU
(Mosaic) kernels share: block sizes, padding to whole blocks, the in-block
mask, and the ``custom_vjp`` that wires forward to backward.  A backend module
provides ``DEFAULT_BLOCKS``, ``MIN_BLOCK``, ``padded_head_dim(d)``,
``forward(q, k, v, seg, cfg) -> (o, lse)`` and
``backward(q, k, v, seg, do, lse, delta, cfg) -> (dq, dk, dv)`` on padded
``[batch, length, heads, head_dim]`` arrays.

Masked logits are ``-inf`` and the running max starts at a finite floor, so a
query row with nothing to attend gets ``l = 0``: its output is written as zeros
and its log-sum-exp as ``+inf``, which makes every backward probability
``exp(-inf - inf) = 0`` instead of NaN.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType

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
    # there is no padding or causality already hides it.
    kv_len: int | None
    has_segments: bool
    interpret: bool
    backend: str


def block_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array | None,
    k_seg: jax.Array | None,
    cfg: KernelConfig,
) -> jax.Array | None:
    """``[block_q, block_k]`` True where a query may attend a key; None if all may.

    ``q_pos``/``q_seg`` are ``[block_q, 1]`` and ``k_pos``/``k_seg`` ``[1, block_k]``
    (already broadcastable), which both Triton and Mosaic lower without relayout.
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
def _flash(q, k, v, seg, cfg: KernelConfig):
    return _backend_module(cfg.backend).forward(q, k, v, seg, cfg)[0]


def _flash_fwd(q, k, v, seg, cfg: KernelConfig):
    o, lse = _backend_module(cfg.backend).forward(q, k, v, seg, cfg)
    return o, (q, k, v, seg, o, lse)


def _flash_bwd(cfg: KernelConfig, res, do):
    q, k, v, seg, o, lse = res
    # delta_i = rowsum(o_i * do_i): one fused XLA reduction, cheaper than a kernel.
    delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
    dq, dk, dv = _backend_module(cfg.backend).backward(q, k, v, seg, do, lse, delta, cfg)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    *,
    causal: bool,
    softmax_scale: float | None,
    block_sizes: BlockSizes | None,
    backend: str,
    interpret: bool,
) -> jax.Array:
    """``q [b, l, h, d]``, ``k/v [b, l, kv, d]`` -> ``[b, l, h, d]`` via the Pallas kernels.

    Pads the length to whole blocks (and, where the backend needs it, the head
    dim), runs the differentiable kernel and slices the padding off again.
    """
    b, length, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, length) or k.shape[3] != head_dim:
        raise ValueError(
            f"flash attention: self-attention shapes expected, got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    if heads % k.shape[2]:
        raise ValueError(
            f"flash attention: {heads} query heads are not a multiple of {k.shape[2]} kv heads"
        )
    mod = _backend_module(backend)
    blocks = (block_sizes or mod.DEFAULT_BLOCKS).fit(length, mod.MIN_BLOCK)
    blocks.validate(mod.MIN_BLOCK)
    padded = -(-length // blocks.largest) * blocks.largest
    cfg = KernelConfig(
        causal=causal,
        scale=head_dim**-0.5 if softmax_scale is None else float(softmax_scale),
        blocks=blocks,
        kv_len=length if padded != length and not causal else None,
        has_segments=segment_ids is not None,
        interpret=interpret,
        backend=backend,
    )
    dim = mod.padded_head_dim(head_dim)
    q, k, v = (_pad_axis(_pad_axis(x, 1, padded), 3, dim) for x in (q, k, v))
    if segment_ids is not None:
        segment_ids = _pad_axis(segment_ids.astype(jnp.int32), 1, padded)
    out = _flash(q, k, v, segment_ids, cfg)
    return out[:, :length, :, :head_dim]
