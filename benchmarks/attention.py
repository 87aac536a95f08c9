"""Attention kernel benchmark: one JSON line per shape, pallas vs xla vs cudnn.

    python benchmarks/attention.py            # device: b=2, seq 2048/4096/8192, d=128, bf16
    python benchmarks/attention.py --smoke    # CPU: tiny shapes, interpret mode, no cudnn

Layouts are per-device head counts: Llama-2-70B under TP8 (64 q / 8 kv heads
-> 8 / 1 per shard) and 7B (32 / 32).  Causal FLOPs count half the score
matrix; fwd+bwd is 3.5x the forward (2 matmuls forward, 5 backward), the
FlashAttention papers' convention, so TFLOP/s compare across implementations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from oasst_jax.attention import dot_product_attention

LAYOUTS = {"70b_tp8": (8, 1), "7b": (32, 32)}


def _fwd_flops(batch: int, seq: int, heads: int, dim: int, causal: bool) -> float:
    flops = 4.0 * batch * heads * seq * seq * dim
    return flops / 2 if causal else flops


def _time_ms(fn: Callable, args: tuple, iters: int) -> float:
    """Median wall time of ``iters`` calls after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _functions(impl: str, causal: bool) -> tuple[Callable, Callable]:
    attend = lambda q, k, v: dot_product_attention(q, k, v, causal=causal, implementation=impl)

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(do)

    return jax.jit(attend), jax.jit(fwd_bwd)


def _measure(impl: str, q, k, v, causal: bool, iters: int, flops: float) -> dict:
    fwd, fwd_bwd = _functions(impl, causal)
    try:
        fwd_ms = _time_ms(fwd, (q, k, v), iters)
        both_ms = _time_ms(fwd_bwd, (q, k, v, q), iters)
    except Exception as e:  # one implementation failing (OOM, no cuDNN) must not stop the rest
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {
        "fwd_ms": round(fwd_ms, 3),
        "fwd_tflops": round(flops / fwd_ms / 1e9, 2),
        "fwd_bwd_ms": round(both_ms, 3),
        "fwd_bwd_tflops": round(3.5 * flops / both_ms / 1e9, 2),
    }


def _ratio(results: dict, a: str, b: str) -> float | None:
    ta, tb = results[a].get("fwd_bwd_ms"), results.get(b, {}).get("fwd_bwd_ms")
    return round(tb / ta, 3) if ta and tb else None


def run_shape(
    layout: str, batch: int, seq: int, dim: int, dtype, impls: list[str], iters: int
) -> dict:
    heads, kv_heads = LAYOUTS[layout]
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (batch, seq, heads, dim), dtype)
    k = jax.random.normal(ks[1], (batch, seq, kv_heads, dim), dtype)
    v = jax.random.normal(ks[2], (batch, seq, kv_heads, dim), dtype)
    flops = _fwd_flops(batch, seq, heads, dim, causal=True)
    results = {impl: _measure(impl, q, k, v, True, iters, flops) for impl in impls}
    return {
        "device": jax.devices()[0].device_kind,
        "layout": layout,
        "batch": batch,
        "seq": seq,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": dim,
        "dtype": jnp.dtype(dtype).name,
        "causal": True,
        **results,
        # Speed-ups of pallas over the others, fwd+bwd (>1: pallas is faster).
        "pallas_vs_cudnn": _ratio(results, "pallas", "cudnn"),
        "pallas_vs_xla": _ratio(results, "pallas", "xla"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (interpret mode)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args(argv)
    impls = ["pallas", "xla"] if args.smoke else ["pallas", "xla", "cudnn"]
    # Smoke: just proves every path still traces, runs and differentiates.
    batch, seqs, dim, iters = (
        (1, [128], 64, 1) if args.smoke else (args.batch, args.seqs, 128, args.iters)
    )
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    for seq in seqs:
        for layout in args.layouts:
            print(json.dumps(run_shape(layout, batch, seq, dim, dtype, impls, iters)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
