"""XLA reference attention: the definition every kernel is tested against.

Plain einsums with an explicit mask, fp32 softmax.  Grouped-query attention is
done by folding query heads into ``[kv_heads, groups]`` instead of repeating
k/v, so memory stays at the kv-head count, as in the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """Boolean ``[batch|1, q_len, kv_len]`` mask: True where a query may attend a key.

    Causality is by position (query ``i + q_offset`` sees keys ``<= i + q_offset``),
    segments by equality of ids, so packed samples never see each other.
    """
    mask = jnp.ones((1, q_len, kv_len), dtype=bool)
    if causal:
        qi = jnp.arange(q_len)[:, None] + q_offset
        ki = jnp.arange(kv_len)[None, :]
        mask = mask & (qi >= ki)[None]
    if q_segment_ids is not None:
        kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = mask & (q_segment_ids[:, :, None] == kv_seg[:, None, :])
    return mask


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """fp32 softmax over the last axis where ``mask`` allows; rows with nothing allowed are 0."""
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """``q [b, lq, h, d]``, ``k/v [b, lk, kv, d]`` -> ``[b, lq, h, d]``.

    A query row with nothing to attend returns zeros (not NaN), matching the kernel.
    ``kv_segment_ids`` and ``q_offset`` (the key slot of the first query) make it the
    reference of a kernel's query block that starts inside the keys (context parallelism).
    """
    b, lq, h, d = q.shape
    kvh = k.shape[2]
    if h % kvh:
        raise ValueError(f"attention: {h} query heads are not a multiple of {kvh} kv heads")
    groups = h // kvh
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    qg = q.reshape(b, lq, kvh, groups, d)
    logits = jnp.einsum("bqngd,bknd->bngqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    mask = attention_mask(
        lq,
        k.shape[1],
        causal=causal,
        q_segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_offset=q_offset,
    )
    probs = masked_softmax(logits, mask[:, None, None])  # mask [b, 1, 1, q, k]
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("attention dropout_rate > 0 needs a dropout_rng")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bngqk,bknd->bqngd", probs.astype(v.dtype), v)
    return out.reshape(b, lq, h, d)


def cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_offset: int | jax.Array,
) -> jax.Array:
    """Decoding: ``q [b, lq, h, d]``, the queries of slots ``q_offset ..``, against a KV
    cache ``k/v [b, kv, lk, d]`` -> ``[b, lq, h, d]``; causal by slot, segments by id.

    The cache is kv-head-major (as Hugging Face's): both einsums then have their batch
    axes (b, kv) leading, so XLA reads the cache where it lies.  Laid out like
    :func:`dot_product_attention`'s ``[b, lk, kv, d]`` keys, every decode step began by
    transposing all of it.
    """
    b, lq, h, d = q.shape
    kvh, lk = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, lq, kvh, h // kvh, d)
    logits = jnp.einsum("bqngd,bnkd->bngqk", qg, k_cache, preferred_element_type=jnp.float32)
    mask = attention_mask(
        lq,
        lk,
        causal=True,
        q_segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_offset=q_offset,
    )
    probs = masked_softmax(logits * d**-0.5, mask[:, None, None])
    out = jnp.einsum("bngqk,bnkd->bqngd", probs.astype(v_cache.dtype), v_cache)
    return out.reshape(b, lq, h, d)
