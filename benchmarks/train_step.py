"""Train-step throughput: prints one JSON line (tokens/s, MFU, step time, peak memory).

    python benchmarks/train_step.py --config=configs/bench_tinyllama.py [--config.x=y]
    python benchmarks/train_step.py --config=configs/tiny.py   # CPU smoke run
    python benchmarks/train_step.py --config=configs/tiny.py --config.lora.rank=8
        # one line each for full fine-tuning, LoRA (bf16 base) and QLoRA (nf4 base)

Random packed rows (4 segments per row) feed the real jitted step built by
``train_step.build_trainer``, so the number measures the step, not the input
pipeline.  MFU uses the trainer's FLOP formula (``LlamaConfig.flops_per_token``).
benchmarks/device_suite.py runs this step for every attention x remat pair on a device.
"""

from __future__ import annotations

import json
import os
import time

import benchlib
import jax

from oasst_jax import optim, sharding
from oasst_jax.cli import cli_main
from oasst_jax.config import accumulation_steps, model_config
from oasst_jax.model import Llama, hidden_dropout_rates
from oasst_jax.train_step import StepConfig, build_trainer

STEPS = int(os.environ.get("BENCH_STEPS", "10"))


def state_bytes(state) -> int:
    """Bytes the train state holds on the first device (params, frozen base, moments)."""
    dev = jax.devices()[0]
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(state)
        for s in x.addressable_shards
        if s.device == dev
    )


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
        batch = benchlib.random_packed_batch(accum, rows, cfg.seq_length, mcfg.vocab_size)
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
        held = state_bytes(state)
    tokens = cfg.global_batch_size * cfg.seq_length
    flops = mcfg.flops_per_token(cfg.seq_length) * tokens
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
        "state_bytes_per_device": held,
        "lora_rank": mcfg.lora_rank,
        "lora_base_dtype": mcfg.lora_base_dtype if mcfg.lora_rank else None,
        "loss": float(m["loss"]),
    }


def main(cfg) -> None:
    """With ``lora.rank > 0``: full fine-tuning, LoRA over a bf16 base and QLoRA over an
    nf4 base of the same config, one line each, to compare memory and tokens/s."""
    if not cfg.lora.rank:
        print(json.dumps(bench(cfg)))
        return
    for variant, rank, base_dtype in (
        ("full", 0, cfg.lora.base_dtype),
        ("lora", cfg.lora.rank, "bfloat16"),
        ("qlora", cfg.lora.rank, "nf4"),
    ):
        c = cfg.copy_and_resolve_references()
        c.lora.rank, c.lora.base_dtype = rank, base_dtype
        print(json.dumps({"variant": variant, **bench(c)}), flush=True)


if __name__ == "__main__":
    cli_main(main, "training config file")
