"""Planner figures for Llama-2-70B as JSON lines (analytic only: seconds, no compile).

``python benchmarks/plan.py [--config configs/pre10.py]`` prints one line for the
model card's Megatron layout on H100 (TP8 x PP4, SP, micro batch 2, selective
recompute) and one per chip with the analytic search's best layout for 32
devices.  For compiled (TPU) figures run ``python -m oasst_jax.plan --search
--topology v5p:2x4x4 --json``.
"""

from __future__ import annotations

import argparse
import json
import time

from oasst_jax import plan
from oasst_jax.config import load_config, model_config
from oasst_jax.planner import chips, memory, search


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/pre10.py")
    ap.add_argument("--devices", type=int, default=32)
    args = ap.parse_args()
    cfg = load_config(args.config)
    model_cfg = model_config(cfg)
    card = memory.Layout(plan.parse_mesh("tensor=8,pipeline=4"), 2, "selective")
    rec = plan.megatron_record(model_cfg, cfg, card, chips.CHIPS["h100"], 0.6)
    print(json.dumps({"what": "model card layout, Megatron on H100 (analytic)", **rec}))
    seq, batch = cfg.seq_length, cfg.global_batch_size
    layouts = search.enumerate_layouts(model_cfg, args.devices, seq, batch)
    for name in ("v5p", "v5e", "v6e", "v4", "h100", "h200"):
        t0 = time.perf_counter()
        best = search.rank(model_cfg, layouts, chips.CHIPS[name], seq, batch, 0.6)[0]
        rec = plan.analytic_record(model_cfg, cfg, best.layout, chips.CHIPS[name], 0.6)
        rec.update(what=f"analytic search best, {args.devices} x {name}", fits=best.fits)
        rec["search_s"] = time.perf_counter() - t0
        print(json.dumps(rec))


if __name__ == "__main__":
    main()
