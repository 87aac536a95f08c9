"""The tiny demo: the same code path as 70B, on 8 emulated CPU devices, in about a minute.

Data: `python -m oasst_jax.pretokenize --config=configs/data/sample.py` (README).
Mesh fsdp 2 x sequence 2 x tensor 2 so every sharding rule is exercised.
"""

import os

from oasst_jax.config import base_config, load_config

HERE = os.path.dirname(__file__)


def get_config():
    c = base_config()
    c.model = load_config(os.path.join(HERE, "model", "tiny.py"))
    c.mesh.data = 1
    c.mesh.fsdp = 2
    c.mesh.sequence = 2
    c.mesh.tensor = 2
    c.workdir = "runs/tiny"
    c.data_path = "output/sample/data"
    c.data_prefix = "sample"
    c.tokenizer_path = "output/sample/tokenizer.model"
    c.seq_length = 256
    c.global_batch_size = 8
    c.micro_batch_size = 2
    c.train_iters = 60
    c.log_interval = 5
    c.eval_interval = 20
    c.eval_iters = 2
    c.save_interval = 30
    c.optim.lr = 3e-3
    c.optim.min_lr = 3e-4
    c.optim.lr_warmup_iters = 5
    c.optim.weight_decay = 0.01
    c.hidden_dropout = 0.1
    c.lima_dropout = True
    c.async_checkpointing = False
    c.peak_flops_per_device = 1e11  # nominal, so the MFU column is finite on CPU
    return c
