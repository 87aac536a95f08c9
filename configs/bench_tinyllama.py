"""Train-step benchmark on one GPU: TinyLlama-1.1B shape, seq 4096, packed, bf16.

python benchmarks/train_step.py --config=configs/bench_tinyllama.py
"""

import os

from oasst_jax.config import base_config, load_config

HERE = os.path.dirname(__file__)


def get_config():
    c = base_config()
    c.model = load_config(os.path.join(HERE, "model", "tinyllama_1b.py"))
    c.mesh.data = -1
    c.seq_length = 4096
    c.global_batch_size = 4
    c.micro_batch_size = 4
    c.data_path = "synthetic"  # the benchmark feeds random packed rows
    c.peak_flops_per_device = 989e12  # H100 SXM dense bf16
    return c
