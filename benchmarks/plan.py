"""Planner figures as JSON lines: analytic (seconds), or the analytic model against XLA's GPU
compiler (``--gpu-table``, minutes).

``python benchmarks/plan.py [--config configs/pre10.py]`` prints one line for the
model card's Megatron layout on H100 (TP8 x PP4, SP, micro batch 2, selective
recompute) and one per chip with the analytic search's best layout for 32
devices.  For compiled (TPU) figures run ``python -m oasst_jax.plan --search
--topology v5p:2x4x4 --json``.

``python benchmarks/plan.py --gpu-table [--rows tinyllama-selective,7b-lora]`` compiles
each configuration of :data:`GPU_TABLE` for abstract H100s (jax's CUDA plugin in
compile-only mode: the ``gpu-aot`` extra, no GPU needed) with the project's Triton
attention kernels, and prints per row the compiled per-GPU peak beside the planner's
analytic figure: compiler figures (memory), not measured speed.  A 70B compile takes
minutes on a loaded 2-core machine; each line carries the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time

GIB = 2**30

# (row name, config file, --config overrides, topology): the planner's GPU memory model
# is held against the compiler on these (docs/planning-and-performance.md, "Compiled for").
GPU_TABLE = [
    ("tinyllama-full", "configs/bench_tinyllama.py", {"model.remat_policy": "full"}, "h100:1"),
    (
        "tinyllama-selective",
        "configs/bench_tinyllama.py",
        {"model.remat_policy": "selective"},
        "h100:1",
    ),
    ("tinyllama-none", "configs/bench_tinyllama.py", {"model.remat_policy": "none"}, "h100:1"),
    (
        "7b-fsdp8",
        "configs/sft10_lora_7b.py",
        {"lora.rank": 0, "mesh.data": 1, "mesh.fsdp": -1},
        "h100:8",
    ),
    ("7b-lora", "configs/sft10_lora_7b.py", {}, "h100:1"),
    ("70b-qlora-fsdp8", "configs/sft10_qlora_70b.py", {}, "h100:8"),
    ("70b-tp8-pp4", "configs/pre10.py", {}, "h100:32"),
]


def override(cfg, dotted: dict) -> None:
    for key, value in dotted.items():
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node[part]
        node[last] = value


def gpu_row(name: str, config: str, dotted: dict, topology: str) -> dict:
    """Compile one row for its GPU topology; the compiled and analytic per-GPU peaks."""
    from oasst_jax import sharding
    from oasst_jax.cli import plan
    from oasst_jax.config import load_config, model_config

    cfg = load_config(config)
    override(cfg, dotted)
    target = plan.make_target(topology, "", None, 0, 0.6)
    layers = model_config(cfg).num_hidden_layers
    sizes = sharding.resolve_mesh(cfg.mesh, target.num_devices, num_layers=layers)
    plan.check_batch(cfg, sizes, target.num_devices)
    t0 = time.perf_counter()
    rec = plan.run_single(cfg, sizes, target, lambda *_: None)
    out = {
        "row": name,
        "config": config,
        "overrides": dotted,
        "topology": topology,
        "layout": plan.memory.Layout(sizes, cfg.micro_batch_size, cfg.model.remat_policy).label(),
        "analytic_gib": rec["analytic_bytes_per_device"] / GIB,
        "seconds": time.perf_counter() - t0,
        "load": os.getloadavg(),
    }
    if "backend" not in rec:
        return {**out, "compiled": False, "why": rec.get("compile_refused", "")}
    return {
        **out,
        "compiled": True,
        "device_kind": rec["device_kind"],
        "compiled_peak_gib": rec["peak_bytes_per_device"] / GIB,
        "argument_gib": rec["argument_bytes_per_device"] / GIB,
        "temp_gib": rec["temp_bytes_per_device"] / GIB,
        "diff_pct": 100 * rec["analytic_error"],
        "compile_s": rec["compile_s"],
        "kernel_calls": rec["kernel_calls"],
        "fits": rec["fits"],
    }


def gpu_table(rows: list[str]) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")  # compile-only GPUs; nothing runs
    known = {r[0] for r in GPU_TABLE}
    if set(rows) - known:
        raise SystemExit(f"error: --rows: unknown {sorted(set(rows) - known)}; known {known}")
    for name, config, dotted, topology in GPU_TABLE:
        if not rows or name in rows:
            print(json.dumps(gpu_row(name, config, dotted, topology)), flush=True)


def analytic(config: str, devices: int) -> None:
    from oasst_jax.cli import plan
    from oasst_jax.config import load_config, model_config
    from oasst_jax.planner import chips, memory, search

    cfg = load_config(config)
    model_cfg = model_config(cfg)
    card = memory.Layout(plan.parse_mesh("tensor=8,pipeline=4"), 2, "selective")
    rec = plan.megatron_record(model_cfg, cfg, card, chips.CHIPS["h100"], 0.6)
    print(json.dumps({"what": "model card layout, Megatron on H100 (analytic)", **rec}))
    seq, batch = cfg.seq_length, cfg.global_batch_size
    layouts = search.enumerate_layouts(model_cfg, devices, seq, batch)
    for name in ("v5p", "v5e", "v6e", "v4", "h100", "h200"):
        t0 = time.perf_counter()
        best = search.rank(model_cfg, layouts, chips.CHIPS[name], seq, batch, 0.6)[0]
        rec = plan.analytic_record(model_cfg, cfg, best.layout, chips.CHIPS[name], 0.6)
        rec.update(what=f"analytic search best, {devices} x {name}", fits=best.fits)
        rec["search_s"] = time.perf_counter() - t0
        print(json.dumps(rec))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/pre10.py")
    ap.add_argument("--devices", type=int, default=32)
    ap.add_argument("--gpu-table", action="store_true", help="compile GPU_TABLE for H100s")
    ap.add_argument("--rows", default="", help="--gpu-table: comma-separated row names")
    args = ap.parse_args()
    if args.gpu_table:
        gpu_table([r for r in args.rows.split(",") if r])
    else:
        analytic(args.config, args.devices)


if __name__ == "__main__":
    main()
