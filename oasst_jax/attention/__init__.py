"""Attention dispatch: one entry point, several implementations.

``implementation`` picks the backend: ``xla`` (the reference, any device),
``pallas`` (the project's flash kernel; interpret mode on CPU) and ``cudnn``
(``jax.nn.dot_product_attention``'s fused kernel, a GPU baseline).
Scripts rely on this signature.
"""

from __future__ import annotations

import jax

from oasst_jax.attention import xla

IMPLEMENTATIONS = ("xla", "pallas", "cudnn")


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    implementation: str = "xla",
    softmax_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """``q [batch, length, heads, head_dim]``, ``k, v [batch, length, kv_heads, head_dim]``."""
    if implementation == "xla":
        return xla.dot_product_attention(
            q,
            k,
            v,
            segment_ids=segment_ids,
            causal=causal,
            softmax_scale=softmax_scale,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
        )
    raise ValueError(
        f"attention implementation {implementation!r} is not available; "
        f"choose one of {IMPLEMENTATIONS}"
    )
