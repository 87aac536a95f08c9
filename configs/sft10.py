"""Stage 2 of the model card: top-1 Open-Assistant demonstrations (run46_oasst_sft10).

Starts from the stage-1 checkpoint with `finetune=True` (weights only: fresh
optimizer, step 0, fresh data iterator), hidden dropout 0.25 with LIMA dropout,
519 iterations (~2.9 epochs of 11441 samples at 64 per step), save every 346;
everything else as stage 1.
"""

import os

from oasst_jax.config import load_config

HERE = os.path.dirname(__file__)


def get_config():
    c = load_config(os.path.join(HERE, "pre10.py"))
    c.workdir = "runs/oasst_sft10_llama2_70b"
    c.data_path = "output/oasst_top1_2023-07-23"
    c.data_prefix = "oasst_top1"
    c.finetune = True
    c.load = "runs/oasst_pre10_llama2_70b/checkpoints"
    c.hidden_dropout = 0.25
    c.lima_dropout = True
    c.train_iters = 519
    c.save_interval = 346
    return c
