"""Input cost per host: packed tokens/s each process reads for H = 1, 2, 4 hosts.

    .venv/bin/python benchmarks/data_hosts.py [--samples 40000] [--seq-length 4096]
        [--batch 64] [--steps 24] [--hosts 1,2,4]

Writes a synthetic train split (our shards; chatml-like user/assistant turns, log-normal
lengths around the card's stage-1 mix, ~700 tokens a sample) under the system temp
directory, then for each H times the pipeline of every host ``h < H`` in turn
(:class:`oasst_jax.data.pipeline.Batches` over the card's global batch, reading the rows
``[h * batch / H, (h + 1) * batch / H)`` that the batch axis split over H processes gives
it; the trainer's loss mask; no read-ahead threads, so this is the cost, not the latency)
over ``--steps`` global batches, best of ``--repeats``.  One process runs the hosts one
after the other, so the figure is each process's own cost, not H processes competing for
this machine's cores.
Times are CPU seconds of this process (``time.process_time``: a shared machine's other
jobs count little).  Prints one JSON line per H: packed tokens/s per process (the row slots
it fills, ``rows x seq_length``, per CPU second of its pipeline), the sample tokens among
them, the CPU seconds per global batch of the costliest host, and the share of that spent
planning (the part every host repeats).  Goal: the per-host cost falls as ~1/H
(``cost_vs_one_host`` ~ 1/H).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from oasst_jax import chatml
from oasst_jax.data import pipeline, shards

ROLES = (1, 2)  # user, assistant (chatml's role ids for the turns)


def write_split(path: Path, samples: int, seed: int = 0) -> None:
    """``samples`` conversations of 1-3 exchanges, ~700 tokens each, as a shard split."""
    rng = np.random.default_rng(seed)
    with shards.ShardWriter(path, vocab_size=32007) as w:
        for _ in range(samples):
            turns = rng.integers(1, 4) * 2
            sizes = np.maximum(rng.lognormal(4.9, 0.9, turns).astype(int), 4)
            roles = np.repeat(np.tile(ROLES, turns // 2), sizes)
            w.add(rng.integers(3, 32000, roles.size), roles)
        w.commit({"dataset": "synthetic"})


def host_cost(source, cfg: pipeline.PipelineConfig, mask, rows: np.ndarray, steps: int) -> dict:
    """One host's pipeline over ``steps`` global batches: CPU seconds (this process's, so
    what else loads the machine counts little), planning CPU seconds, sample tokens."""
    it = pipeline.Batches(source, cfg, mask, rows=rows)
    next(it)  # opened, first batch read
    plan = pipeline.PackPlan(it.plan.lengths, cfg, repeat=True)
    plan.set_state(it.get_state())
    start = time.process_time()
    tokens = 0
    for _ in range(steps):
        batch = next(it)
        tokens += int((batch["segment_ids"] > 0).sum())
    seconds = time.process_time() - start
    start = time.process_time()
    for _ in range(steps * cfg.rows_per_batch):
        next(plan)
    return {"seconds": seconds, "plan_seconds": time.process_time() - start, "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=40000)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=64, help="global batch rows (the card's 64)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--hosts", default="1,2,4")
    p.add_argument("--repeats", type=int, default=3, help="best of N per host (shared machine)")
    args = p.parse_args()
    mask = functools.partial(chatml.loss_mask, tokenizer=None, mode="assistant_turn")
    cfg = pipeline.PipelineConfig(
        seq_length=args.seq_length, rows_per_batch=args.batch, num_threads=1
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "syn-train"
        write_split(path, args.samples)
        source = shards.ShardDataSource(path)
        base = None
        for hosts in (int(h) for h in args.hosts.split(",")):
            per = args.batch // hosts
            runs = [
                min(
                    (
                        host_cost(source, cfg, mask, np.arange(h * per, (h + 1) * per), args.steps)
                        for _ in range(args.repeats)
                    ),
                    key=lambda r: r["seconds"],
                )
                for h in range(hosts)
            ]
            slowest = max(r["seconds"] for r in runs)
            slots = per * args.seq_length * args.steps
            base = base or slowest
            line = {
                "hosts": hosts,
                "rows_per_host": per,
                "packed_tokens_per_s_per_process": round(
                    np.mean([slots / r["seconds"] for r in runs])
                ),
                "sample_tokens_per_s_per_process": round(
                    np.mean([r["tokens"] / r["seconds"] for r in runs])
                ),
                "cpu_seconds_per_global_batch": round(slowest / args.steps, 4),
                "plan_share": round(max(r["plan_seconds"] for r in runs) / slowest, 3),
                "cost_vs_one_host": round(slowest / base, 3),
                "seq_length": args.seq_length,
                "global_batch": args.batch,
                "samples": args.samples,
                "cpu_count": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
