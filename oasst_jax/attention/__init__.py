"""Attention dispatch: one entry point, several implementations.

``implementation`` picks the backend: ``xla`` (the reference, any device),
``pallas`` (the project's flash kernel; interpret mode on CPU) and ``cudnn``
(``jax.nn.dot_product_attention``'s fused kernel, a GPU baseline).
Scripts rely on this signature.

``pallas`` on a GPU runs the Mosaic GPU kernels (:mod:`mosaic_gpu`: TMA, wgmma,
warp specialization) on Hopper when the installed jax has them (>= 0.11) and
they take the shape (bf16/fp16, head dim <= 128), else the Triton kernels
(:mod:`pallas_gpu`: older GPUs, older jax, fp32) -- :func:`gpu_backend`.
"""

from __future__ import annotations

import functools

import jax

from oasst_jax import sharding
from oasst_jax.attention import xla
from oasst_jax.attention.blocks import BlockSizes
from oasst_jax.attention.flash import flash_attention

IMPLEMENTATIONS = ("xla", "pallas", "cudnn")

__all__ = ["IMPLEMENTATIONS", "BlockSizes", "dot_product_attention", "gpu_backend"]

# Logical layouts of the kernel's operands; sharding.py maps them to mesh axes.
_Q_NAMES = ("batch", "length", "act_heads", None)
_KV_NAMES = ("batch", "length", "act_kv_heads", None)
_SEG_NAMES = ("batch", "length")


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
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``q [batch, length, heads, head_dim]``, ``k, v [batch, length, kv_heads, head_dim]``.

    ``block_sizes``, ``backend`` (``'gpu'`` Triton / ``'mosaic_gpu'`` / ``'tpu'``
    Mosaic; default: the current device's, :func:`gpu_backend` on a GPU, the
    Triton kernel on CPU) and ``interpret`` (default: on CPU) only affect
    ``'pallas'``.
    """
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
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is not available; "
            f"choose one of {IMPLEMENTATIONS}"
        )
    if dropout_rate > 0.0:
        raise ValueError(
            f"attention dropout ({dropout_rate}) is not supported by implementation="
            f"{implementation!r}; the recipe uses 0.0, or use implementation='xla'"
        )
    if implementation == "cudnn":
        return _cudnn(q, k, v, segment_ids, causal=causal, softmax_scale=softmax_scale)
    platform = jax.default_backend()
    kernel = functools.partial(
        flash_attention,
        causal=causal,
        softmax_scale=softmax_scale,
        block_sizes=block_sizes,
        backend=backend or _default_backend(platform, q),
        interpret=platform == "cpu" if interpret is None else interpret,
    )
    return _per_shard(kernel, q, k, v, segment_ids)


def _default_backend(platform: str, q: jax.Array) -> str:
    if platform == "tpu":
        return "tpu"
    if platform == "gpu":
        return gpu_backend(jax.devices()[0], q.shape[-1], q.dtype)
    return "gpu"  # CPU: the Triton kernels in interpret mode, the tested path


def gpu_backend(device, head_dim: int, dtype) -> str:
    """``'mosaic_gpu'`` on a Hopper GPU (compute capability 9.x) when the installed jax
    has the Mosaic GPU API these kernels use and they take ``head_dim``/``dtype``;
    ``'gpu'`` (Triton) otherwise.  Mosaic GPU is what jax maintains for GPUs -- its
    Triton backend is deprecated from 0.11 -- and the only route to TMA, ``wgmma``
    from shared memory and warp specialization; compiler figures are in the README."""
    from oasst_jax.attention import mosaic_gpu

    hopper = str(getattr(device, "compute_capability", "")).startswith("9")
    usable = not mosaic_gpu.unavailable() and mosaic_gpu.supports(head_dim, dtype)
    return "mosaic_gpu" if hopper and usable else "gpu"


def _cudnn(q, k, v, segment_ids, *, causal: bool, softmax_scale: float | None) -> jax.Array:
    """cuDNN fused attention (GQA native).

    ``jax.nn`` exposes no packed-sequence offsets, so segment ids become a dense
    ``[b, 1, l, l]`` mask (a bias inside cuDNN): correct, but O(l^2) memory, so
    only a baseline for packed batches.
    """
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, scale=softmax_scale, implementation="cudnn"
    )


def _per_shard(kernel, q, k, v, segment_ids) -> jax.Array:
    """Run ``kernel`` on each device's shard when a mesh is set (``jax.set_mesh``).

    A Pallas call is opaque to the SPMD partitioner, which would otherwise
    all-gather its operands; under ``shard_map`` every device runs the kernel on
    its own batch rows and heads, which needs no communication at all -- unless
    the sequence is sharded too (context parallelism, see :func:`_gather_sequence`).
    """
    mesh = jax.sharding.get_abstract_mesh()
    free_axes = frozenset(mesh.axis_names) - frozenset(mesh.manual_axes)
    if mesh.empty or not free_axes:
        return kernel(q, k, v, segment_ids)
    q_spec = sharding.logical_spec(_Q_NAMES)
    kv_spec = sharding.logical_spec(_KV_NAMES)
    args, specs = (q, k, v), (q_spec, kv_spec, kv_spec)
    if segment_ids is not None:
        args, specs = (*args, segment_ids), (*specs, sharding.logical_spec(_SEG_NAMES))
    length_axes = tuple(a for a in sharding.mesh_axes("length") if mesh.shape[a] > 1)
    if length_axes:
        kernel = _gather_sequence(kernel, length_axes)
    return jax.shard_map(
        lambda q, k, v, seg=None: kernel(q, k, v, seg),
        mesh=mesh,
        in_specs=specs,
        out_specs=q_spec,
        axis_names=free_axes,
        check_vma=False,
    )(*args)


def _gather_sequence(kernel, axes: tuple[str, ...]):
    """Context parallelism for the flash kernel: each sequence shard attends its
    own queries to k, v (and key segment ids) all-gathered over ``axes``.

    The queries' global position ``axis_index * local_length`` enters the kernel
    as ``q_offset``, so the causal mask -- and the skipping of key blocks wholly
    in a shard's future -- stays exact, and attention FLOPs split over the
    shards.  The gather's transpose is a reduce-scatter, so the kernel's dk/dv
    for the whole gathered sequence are summed back onto the owning shards
    without extra code.  The causal split is unbalanced: shard ``r`` of ``S``
    does ``r + 1/2`` chunks' worth of work (its diagonal chunk is half masked),
    so the last one does ``(2S - 1) / S`` times the average (1.5x at S = 2);
    balancing it (each shard holding chunks ``i`` and ``2S - 1 - i`` of a
    permuted sequence) is not done.
    """

    def run(q, k, v, segment_ids):
        k, v = (jax.lax.all_gather(x, axes, axis=1, tiled=True) for x in (k, v))
        kv_segment_ids = None
        if segment_ids is not None:
            kv_segment_ids = jax.lax.all_gather(segment_ids, axes, axis=1, tiled=True)
        offset = jax.lax.axis_index(axes) * q.shape[1]
        return kernel(q, k, v, segment_ids, kv_segment_ids=kv_segment_ids, q_offset=offset)

    return run
