"""Stage 2 of the model card: top-1 Open-Assistant demonstrations (run46_oasst_sft10).

Starts from the stage-1 checkpoint with `finetune=True` (weights only: fresh
optimizer, step 0, fresh data iterator), hidden dropout 0.25 with LIMA dropout,
519 iterations (~2.9 epochs of 11441 samples at 64 per step), save every 346;
everything else as stage 1 (`configs/pre10.py`).

Where this config differs from the library defaults (`oasst_jax.config.base_config`):

- stage 2's own: `hidden_dropout=0.25` with `lima_dropout=True` (0 at the first
  layer rising to 0.25 at the last), `train_iters=519`, `save_interval=346`,
  `load="runs/oasst_pre10_llama2_70b/checkpoints"` (stage 1's), and its `workdir=`,
  `data_path=`, `data_prefix=`.
- as stage 1: `model=` Llama-2-70B with `model.attention_impl="pallas"`,
  `mesh.tensor=8`, `mesh.pipeline=4`, `loss_normalization="microbatch_mean"`
  (Megatron's mean of per-micro-batch means, for validation too), `packing=False`,
  `log_interval=1`, `finetune=True`, `use_checkpoint_args=True`, the card's token layout
  (`megatron_new_tokens=True`, `model.vocab_size=32007`: `<|im_start|>` = 32005).

Evaluation as stage 1 (Megatron's continuing stream; `--config.eval_full=True`
for the whole val split).
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
