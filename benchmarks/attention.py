"""Attention kernel benchmark: one JSON line per shape, pallas vs xla vs cudnn.

    python benchmarks/attention.py            # device: b=2, seq 2048/4096/8192, d=128, bf16
    python benchmarks/attention.py --smoke    # CPU: tiny shapes, interpret mode, no cudnn

``pallas`` is what training runs (on Hopper with jax >= 0.11 the Mosaic GPU kernels, its
record's ``backend``), ``pallas_triton`` the Triton kernels beside it on a GPU.

Layouts are per-device head counts: Llama-2-70B under TP8 (64 q / 8 kv heads
-> 8 / 1 per shard) and 7B (32 / 32).  Causal FLOPs count half the score
matrix; fwd+bwd is 3.5x the forward (2 matmuls forward, 5 backward), the
FlashAttention papers' convention, so TFLOP/s compare across implementations.
Each shape runs dense rows and rows packed with ``--segments`` equal samples
(1, 4, 8 by default): raw TFLOP/s count the dense causal row, ``useful_*``
only the work inside samples -- the rate packed training gets, and the figure
that shows whether a kernel skips the blocks across samples.  cuDNN takes the
packed rows as a dense ``[b, 1, L, L]`` mask (jax.nn has no packed offsets),
so its packed figure is a baseline, not a packed kernel.
benchmarks/device_suite.py measures the 1.1B layout (32 / 8) with the same code.
"""

from __future__ import annotations

import argparse
import json
import sys

import benchlib
import jax
import jax.numpy as jnp

from oasst_jax.attention import gpu_backend

LAYOUTS = {"70b_tp8": (8, 1), "7b": (32, 32)}


def _measure(impl: str, q, k, v, seg, iters: int) -> dict:
    try:
        rec = benchlib.measure_attention(
            impl, q, k, v, causal=True, segment_ids=seg, repeats=iters, inner=1
        )
    except Exception as e:  # one implementation failing (OOM, no cuDNN) must not stop the rest
        return {"error": benchlib.error_line(e, 200)}
    if impl == "cudnn" and seg is not None:
        rec["note"] = benchlib.CUDNN_PACKED_NOTE
    return rec


def _ratio(results: dict, a: str, b: str) -> float | None:
    ta, tb = results[a].get("fwd_bwd_ms"), results.get(b, {}).get("fwd_bwd_ms")
    return round(tb / ta, 3) if ta and tb else None


def run_shape(
    layout: str, batch: int, seq: int, dim: int, dtype, impls: list[str], iters: int, segments: int
) -> dict:
    """One shape; ``segments``: equal samples packed per row (0: dense rows, no ids)."""
    heads, kv_heads = LAYOUTS[layout]
    q, k, v = benchlib.random_qkv(batch, seq, heads, kv_heads, dim, dtype)
    seg = jnp.asarray(benchlib.packed_segment_ids(batch, seq, segments)) if segments else None
    results = {impl: _measure(impl, q, k, v, seg, iters) for impl in impls}
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
        "segments": segments,
        "backend": gpu_backend(jax.devices()[0], dim, dtype),
        **results,
        # Speed-ups of pallas over the others, fwd+bwd (>1: pallas is faster).
        "pallas_vs_triton": _ratio(results, "pallas", "pallas_triton"),
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
    parser.add_argument(
        "--segments", type=int, nargs="*", default=[1, 4, 8], help="samples per packed row"
    )
    args = parser.parse_args(argv)
    impls = ["pallas", "xla"] if args.smoke else ["pallas", "pallas_triton", "xla", "cudnn"]
    # Smoke: just proves every path still traces, runs and differentiates.
    batch, seqs, dim, iters = (
        (1, [128], 64, 1) if args.smoke else (args.batch, args.seqs, 128, args.iters)
    )
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    packings = [0, 4] if args.smoke else [0, *args.segments]
    for seq in seqs:
        for layout in args.layouts:
            for segments in packings:
                rec = run_shape(layout, batch, seq, dim, dtype, impls, iters, segments)
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.exit(main())
