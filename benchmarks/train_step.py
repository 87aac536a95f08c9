"""Train-step throughput: prints one JSON line (tokens/s, MFU, step time, peak memory).

    python benchmarks/train_step.py --config=configs/bench_tinyllama.py [--config.x=y]
    python benchmarks/train_step.py --config=configs/tiny.py   # CPU smoke run

Random packed rows (4 segments per row) feed the real jitted step built by
``train_step.build_trainer``, so the number measures the step, not the input
pipeline.  MFU uses the trainer's FLOP formula (``model_flops_per_token``).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from oasst_jax import optim, sharding  # noqa: E402
from oasst_jax.cli import cli_main  # noqa: E402
from oasst_jax.config import accumulation_steps, model_config  # noqa: E402
from oasst_jax.model import Llama, hidden_dropout_rates  # noqa: E402
from oasst_jax.train_step import StepConfig, build_trainer, model_flops_per_token  # noqa: E402

STEPS = int(os.environ.get("BENCH_STEPS", "10"))


def random_batch(accum: int, rows: int, length: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shape = (accum, rows, length)
    seg = np.repeat(np.arange(1, 5), -(-length // 4))[:length]
    pos = np.concatenate([np.arange(n) for n in np.bincount(seg)[1:]])
    return {
        "inputs": rng.integers(0, vocab, shape, dtype=np.int32),
        "targets": rng.integers(0, vocab, shape, dtype=np.int32),
        "weights": np.ones(shape, np.float32),
        "segment_ids": np.broadcast_to(seg, shape).astype(np.int32),
        "positions": np.broadcast_to(pos, shape).astype(np.int32),
    }


def bench(cfg) -> dict:
    mesh = sharding.make_mesh(dict(cfg.mesh))
    mcfg = model_config(cfg)
    accum = accumulation_steps(cfg, jax.device_count())
    rows = cfg.global_batch_size // accum
    tx = optim.make_optimizer(cfg.optim, cfg.train_iters)
    rates = hidden_dropout_rates(mcfg.num_hidden_layers, cfg.hidden_dropout, cfg.lima_dropout)
    step_cfg = StepConfig(accum, cfg.micro_batch_size, cfg.loss_normalization, cfg.seed)
    with jax.set_mesh(mesh):
        t = build_trainer(
            Llama(mcfg), tx, optim.schedule(cfg.optim, cfg.train_iters), step_cfg, rates, mesh
        )
        state = t.init_random(jax.random.key(0))
        batch = random_batch(accum, rows, cfg.seq_length, mcfg.vocab_size)
        batch = {k: jax.device_put(v, t.batch_sharding) for k, v in batch.items()}
        t0 = time.perf_counter()
        state, m = t.step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(STEPS):
            state, m = t.step(state, batch)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / STEPS
    tokens = cfg.global_batch_size * cfg.seq_length
    flops = model_flops_per_token(mcfg, cfg.seq_length) * tokens
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "params": mcfg.num_params(),
        "seq_length": cfg.seq_length,
        "global_batch_size": cfg.global_batch_size,
        "remat_policy": mcfg.remat_policy,
        "attention_impl": mcfg.attention_impl,
        "compile_s": round(compile_s, 2),
        "step_time_s": dt,
        "tokens_per_s": tokens / dt,
        "mfu": flops / dt / (jax.device_count() * cfg.peak_flops_per_device),
        "peak_bytes_per_device": stats.get("peak_bytes_in_use"),
        "loss": float(m["loss"]),
    }


def main(cfg) -> None:
    print(json.dumps(bench(cfg)))


if __name__ == "__main__":
    cli_main(main, "training config file")
