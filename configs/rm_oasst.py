"""Reward model on the Open-Assistant ranked replies, from the stage-2 SFT model.

Upstream's recipe (`model_training/configs/config_rm.yaml` and the RM issue): the SFT
checkpoint with a scalar head on each reply's last token, trained with the K-wise ranking
loss (`rm.beta = 0.001`, at most 5 replies a prompt).  Data: `configs/data/oasst_rm.py`'s
output.  Metrics: `loss`, `accuracy` (pairs scored in the right order), `margin`, on the
val split too.  Export with `python -m oasst_jax.convert rm-to-hf`.

Where this config differs from `configs/sft10.py`: `objective="rm"`, the rm data, `load=`
stage 2's checkpoints, `finetune=True`, no dropout, `lr=1e-5` with 50 warm-up steps,
`train_iters=400`, `global_batch_size=64` rows of which `preference.max_sequences=16`
sequences / `max_groups=8` prompts per micro-batch of 2 rows x 4096 tokens, packed.
"""

import os

from oasst_jax.config import load_config

HERE = os.path.dirname(__file__)


def get_config():
    c = load_config(os.path.join(HERE, "sft10.py"))
    c.objective = "rm"
    c.workdir = "runs/oasst_rm_llama2_70b"
    c.data_path = "output/oasst_rm_2023-07-23"
    c.data_prefix = "oasst_rm"
    c.load = "runs/oasst_sft10_llama2_70b/checkpoints"
    c.finetune = True
    c.packing = True
    c.hidden_dropout = 0.0
    c.lima_dropout = False
    c.mesh.pipeline = 1  # the pipeline schedule runs the sft loss only
    c.mesh.fsdp = 4
    c.train_iters = 400
    c.save_interval = 100
    c.eval_interval = 50
    c.optim.lr = 1e-5
    c.optim.min_lr = 1e-6
    c.optim.lr_warmup_iters = 50
    c.preference.max_sequences = 16
    c.preference.max_groups = 8
    c.rm.beta = 0.001
    c.rm.max_replies = 5
    return c
