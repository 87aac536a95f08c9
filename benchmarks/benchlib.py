"""What the benchmark scripts share: timing, attention FLOPs and functions, random packed
batches and one-line errors.

Imported as ``benchlib`` by the scripts beside it (``python benchmarks/x.py`` puts this
folder first on ``sys.path``); :data:`ROOT` is added too, so an uninstalled checkout works.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import types
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from oasst_jax.attention import dot_product_attention  # noqa: E402

# fwd+bwd FLOPs are 3.5x the forward's (2 matmuls forward, 5 backward): the FlashAttention
# papers' convention, so TFLOP/s compare across implementations whatever they recompute.
FWD_BWD_FACTOR = 3.5
# The caveat on cuDNN's packed figures: jax.nn.dot_product_attention has no packed-sequence
# offsets, so it is a dense-mask baseline, not a packed kernel.
CUDNN_PACKED_NOTE = "segment ids as a dense [b,1,L,L] mask (no packed offsets in jax.nn)"


def attention_fwd_flops(batch: int, seq: int, heads: int, dim: int, causal: bool) -> float:
    """``QK^T`` and ``PV`` of the forward; causal counts half the score matrix. Packed rows
    are counted as dense causal rows (the work a kernel that skips nothing would do): the
    *raw* figure, comparable across implementations and with dense rows."""
    flops = 4.0 * batch * heads * seq * seq * dim
    return flops / 2 if causal else flops


def useful_fwd_flops(segment_ids: np.ndarray, heads: int, dim: int, causal: bool) -> float:
    """Forward FLOPs inside the samples of packed rows ``[batch, seq]``: each sample of
    ``n`` tokens as a dense row of ``n`` (causal: half its square), nothing across samples.
    What a segment-aware kernel needs to do; equals the raw figure for one sample a row."""
    sizes = [np.unique(row, return_counts=True)[1] for row in np.asarray(segment_ids)]
    pairs = float(sum((n.astype(np.float64) ** 2).sum() for n in sizes))
    flops = 4.0 * heads * dim * pairs
    return flops / 2 if causal else flops


def error_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, short enough for a table cell."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:limit]


def time_ms(fn: Callable, args: tuple, repeats: int, inner: int = 1, warmup: int = 1):
    """``(median ms per call, samples)``: after one compile call and ``warmup`` more, each of
    ``repeats`` samples queues ``inner`` calls and waits once (so dispatch overlaps the device
    work, as in training), divided by ``inner``."""
    jax.block_until_ready(fn(*args))
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append(1e3 * (time.perf_counter() - start) / inner)
    return statistics.median(samples), samples


def packed_segment_ids(batch: int, length: int, segments: int = 4) -> np.ndarray:
    """``[batch, length]`` int32: ``segments`` equal packed samples per row (ids 1..n)."""
    row = np.repeat(np.arange(1, segments + 1), -(-length // segments))[:length]
    return np.broadcast_to(row, (batch, length)).astype(np.int32)


def random_packed_batch(accum: int, rows: int, length: int, vocab: int, seed: int = 0) -> dict:
    """A train-step batch ``[accum, rows, length]`` of random ids, 4 packed samples per row
    (segment ids and per-sample positions), every token weighted."""
    rng = np.random.default_rng(seed)
    shape = (accum, rows, length)
    seg = packed_segment_ids(1, length)[0]
    pos = np.concatenate([np.arange(n) for n in np.bincount(seg)[1:]])
    return {
        "inputs": rng.integers(0, vocab, shape, dtype=np.int32),
        "targets": rng.integers(0, vocab, shape, dtype=np.int32),
        "weights": np.ones(shape, np.float32),
        "segment_ids": np.broadcast_to(seg, shape).astype(np.int32),
        "positions": np.broadcast_to(pos, shape).astype(np.int32),
    }


def import_tokamax():
    """``(tokamax module, note)``; raises ImportError when it is not installed.

    tokamax imports ``xprof`` (a 31 MB profiler pulling in cloud-storage clients) at the top
    of its own benchmarking module, used only by ``tokamax.benchmark``; when that is all that
    is missing, empty stand-in modules let the kernels import (note says so).
    """
    try:
        import tokamax

        return tokamax, ""
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("xprof"):
            raise
    names = ("xprof", "xprof.cli", "xprof.cli.tools", "xprof.cli.tools.get_kernel_stats_tool")
    for parent, name in zip((None, *names), names, strict=False):
        module = sys.modules.setdefault(name, types.ModuleType(name))
        if parent:
            setattr(sys.modules[parent], name.rsplit(".", 1)[1], module)
    import tokamax

    return tokamax, "xprof stubbed (tokamax.benchmark unusable; not used here)"


# Pallas with its GPU kernels pinned; plain 'pallas' picks (Mosaic GPU on Hopper, else Triton).
PALLAS_BACKENDS = {"pallas_triton": "gpu", "pallas_mosaic": "mosaic_gpu"}


def attention_fn(impl: str, causal: bool, segment_ids=None) -> Callable:
    """``attend(q, k, v)`` for ``impl`` in ``pallas | cudnn | xla | tokamax`` (tokamax: its
    Mosaic GPU flash kernel, dense rows only) or :data:`PALLAS_BACKENDS`, segment ids
    closed over."""
    if impl in PALLAS_BACKENDS:
        return lambda q, k, v: dot_product_attention(
            q, k, v, segment_ids=segment_ids, causal=causal, implementation="pallas",
            backend=PALLAS_BACKENDS[impl],
        )  # fmt: skip
    if impl == "tokamax":
        if segment_ids is not None:
            raise ValueError("tokamax: packed rows are not benchmarked (dense mask only)")
        tokamax, _ = import_tokamax()
        return lambda q, k, v: tokamax.dot_product_attention(
            q, k, v, is_causal=causal, implementation="mosaic"
        )
    return lambda q, k, v: dot_product_attention(
        q, k, v, segment_ids=segment_ids, causal=causal, implementation=impl
    )


def attention_jits(impl: str, causal: bool, segment_ids=None) -> tuple[Callable, Callable]:
    """Jitted forward ``(q, k, v) -> out`` and fwd+bwd ``(q, k, v, do) -> (out, (dq, dk, dv))``."""
    attend = attention_fn(impl, causal, segment_ids)

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(do)

    return jax.jit(attend), jax.jit(fwd_bwd)


def measure_attention(
    impl: str, q, k, v, *, causal: bool, segment_ids=None, repeats: int, inner: int
) -> dict:
    """Forward and fwd+bwd time and TFLOP/s of one implementation on ``q, k, v``.

    With ``segment_ids`` also ``useful_*_tflops``: the same times over the FLOPs inside
    the samples (:func:`useful_fwd_flops`), the rate that packed training actually gets.
    """
    b, seq, heads, dim = q.shape
    flops = attention_fwd_flops(b, seq, heads, dim, causal)
    fwd, fwd_bwd = attention_jits(impl, causal, segment_ids)
    start = time.perf_counter()
    jax.block_until_ready(fwd_bwd(q, k, v, q))
    compile_s = time.perf_counter() - start
    fwd_ms, _ = time_ms(fwd, (q, k, v), repeats, inner)
    both_ms, _ = time_ms(fwd_bwd, (q, k, v, q), repeats, inner)
    rec = {
        "compile_s": round(compile_s, 2),
        "fwd_ms": fwd_ms,
        "fwd_tflops": flops / fwd_ms / 1e9,
        "fwd_bwd_ms": both_ms,
        "fwd_bwd_tflops": FWD_BWD_FACTOR * flops / both_ms / 1e9,
    }
    if segment_ids is not None:
        useful = useful_fwd_flops(segment_ids, heads, dim, causal)
        rec["useful_fraction"] = useful / flops
        rec["useful_fwd_tflops"] = useful / fwd_ms / 1e9
        rec["useful_fwd_bwd_tflops"] = FWD_BWD_FACTOR * useful / both_ms / 1e9
    return rec


def random_qkv(batch: int, seq: int, heads: int, kv_heads: int, dim: int, dtype, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (batch, seq, heads, dim), jnp.float32)
    k = jax.random.normal(ks[1], (batch, seq, kv_heads, dim), jnp.float32)
    v = jax.random.normal(ks[2], (batch, seq, kv_heads, dim), jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v))
