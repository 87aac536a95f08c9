"""Which blocks each kernel program visits: the block-skipping pre-pass, in XLA.

Packed rows make most of a causal score matrix useless: with ``k`` samples per
row only about ``1/k`` of the causal blocks hold a query and a key of the same
sample.  Before a kernel runs, this cheap XLA pass reduces the segment ids to a
``[min, max]`` range per block (padding id 0 tracked apart) and marks, for
every (query block, key block) pair, whether it is *visible* (some query may
attend some key: causally not wholly in the future, id ranges intersect or both
hold padding) and whether it is *full* (every query attends every key: below the diagonal,
one segment on both sides, no padded keys).  The intervals are conservative
for any ids -- disjoint ranges share no id -- and exact for the packed rows
the data pipeline writes (ids non-decreasing along a row, then trailing
padding id 0, which attends to itself like any other id).

Each kernel program receives four loop bounds ``lo <= full_lo <= full_hi <= hi``
over the blocks it streams: ``[lo, full_lo)`` and ``[full_hi, hi)`` take the
masked path, ``[full_lo, full_hi)`` the unmasked fast path, everything else is
never loaded.  The forward and dq kernels stream key blocks per query block
(:func:`kv_loop_bounds`), dk/dv streams query blocks per key block
(:func:`q_loop_bounds`); both come from :func:`block_visibility`, which is
also what the tests count against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from oasst_jax.attention.blocks import KernelConfig, MaskOperands

LO, FULL_LO, FULL_HI, HI = range(4)  # fields of the last axis of a bounds array
N_FIELDS = 4


def _id_ranges(ids: jax.Array, block: int) -> dict[str, jax.Array]:
    """Per-block id summaries, each ``[b, length // block]``.

    ``lo``/``hi``: range of the non-zero ids (empty, ``lo > hi``, when there
    are none); ``pad``: whether id 0 occurs; ``single``: the one id of a block
    holding only one (else -1).  Padding (id 0, after a row's last sample) is
    kept out of the range, or the block where a row's samples end would span
    every earlier id and be visited by every query block.
    """
    blocks = ids.reshape(ids.shape[0], -1, block)
    big = jnp.iinfo(jnp.int32).max
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    return {
        "lo": jnp.where(blocks == 0, big, blocks).min(axis=-1),
        "hi": jnp.where(blocks == 0, -big, blocks).max(axis=-1),
        "pad": lo == 0,
        "single": jnp.where(lo == hi, lo, -1),
    }


def block_visibility(
    mask: MaskOperands, q_len: int, kv_len: int, bq: int, bk: int, cfg: KernelConfig
) -> tuple[jax.Array, jax.Array]:
    """``(visible, full)``, bool ``[b or 1, q_len // bq, kv_len // bk]`` (padded lengths).

    ``visible``: the block pair holds at least one attending (query, key) pair;
    ``full``: every pair attends, so the kernel may skip the mask.
    """
    n_q, n_k = q_len // bq, kv_len // bk
    q_first = mask.q_offset[0] + bq * jnp.arange(n_q)[:, None]
    q_last = q_first + bq - 1
    k_first = bk * jnp.arange(n_k)[None, :]
    k_last = k_first + bk - 1
    visible = jnp.ones((1, n_q, n_k), bool)
    full = visible
    if cfg.causal:
        visible = visible & (k_first <= q_last)
        full = full & (k_last <= q_first)
    if cfg.kv_len is not None:
        visible = visible & (k_first < cfg.kv_len)
        full = full & (k_last < cfg.kv_len)
    if mask.q_segment_ids is not None:
        qr = {n: x[:, :, None] for n, x in _id_ranges(mask.q_segment_ids, bq).items()}
        kr = {n: x[:, None, :] for n, x in _id_ranges(mask.kv_segment_ids, bk).items()}
        shared = (qr["lo"] <= kr["hi"]) & (kr["lo"] <= qr["hi"]) | (qr["pad"] & kr["pad"])
        visible = visible & shared
        full = full & (qr["single"] >= 0) & (qr["single"] == kr["single"])
    return visible, full & visible


def loop_bounds(visible: jax.Array, full: jax.Array) -> jax.Array:
    """int32 ``[..., n_outer, 4]`` loop bounds along the last (streamed) axis.

    ``[lo, hi)`` spans every visible block (empty when none is); ``[full_lo,
    full_hi)`` is the first run of consecutive full blocks, so every block in it
    is full whatever the ids look like (full blocks outside the run are masked,
    which is correct, only slower).
    """
    n = visible.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    any_visible = visible.any(axis=-1)
    lo = jnp.where(any_visible, jnp.where(visible, idx, n).min(axis=-1), 0)
    hi = jnp.where(visible, idx + 1, 0).max(axis=-1)
    full_lo = jnp.where(full, idx, n).min(axis=-1)
    full_lo = jnp.minimum(full_lo, hi)
    after_run = (idx >= full_lo[..., None]) & ~full
    full_hi = jnp.minimum(jnp.where(after_run, idx, n).min(axis=-1), hi)
    return jnp.stack([lo, full_lo, full_hi, hi], axis=-1).astype(jnp.int32)


def kv_loop_bounds(
    mask: MaskOperands, q_len: int, kv_len: int, bq: int, bk: int, cfg: KernelConfig, batch: int
) -> jax.Array:
    """Key-block bounds per query block, ``[batch, q_len // bq, 4]`` (forward, dq)."""
    visible, full = block_visibility(mask, q_len, kv_len, bq, bk, cfg)
    bounds = loop_bounds(visible, full)
    return jnp.broadcast_to(bounds, (batch, *bounds.shape[1:]))


def q_loop_bounds(
    mask: MaskOperands, q_len: int, kv_len: int, bq: int, bk: int, cfg: KernelConfig, batch: int
) -> jax.Array:
    """Query-block bounds per key block, ``[batch, kv_len // bk, 4]`` (dk/dv)."""
    visible, full = block_visibility(mask, q_len, kv_len, bq, bk, cfg)
    bounds = loop_bounds(visible.swapaxes(1, 2), full.swapaxes(1, 2))
    return jnp.broadcast_to(bounds, (batch, *bounds.shape[1:]))


def visited_blocks(bounds: jax.Array) -> jax.Array:
    """Blocks the kernels load and compute, summed over a bounds array (per head)."""
    return (bounds[..., HI] - bounds[..., LO]).sum()
