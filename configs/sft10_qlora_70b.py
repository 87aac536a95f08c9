"""Stage 2 of the model card as QLoRA on Llama-2-70B: one 8-GPU host or a v5p-8.

The card's stage-2 run (`configs/sft10.py`: data, 519 steps, LIMA dropout 0.25) with
the 70B base frozen in NF4 (qwix; fp32 scale per 64 weights: ~39 GB for the decoder
plus bf16 embedding/head) and rank-64 adapters on every linear layer, trained in fp32
with AdamW (~0.8B adapter parameters, ~13 GB with moments), everything sharded over
`fsdp` (8 GPUs: ~7 GB of weights and state per device).  QLoRA's recipe: r=64,
alpha=16, dropout 0.05 for 65B-70B, lr 1e-4.

What it changes from `configs/sft10.py`:

- `mesh.tensor=1`, `mesh.pipeline=1`, `mesh.data=1`, `mesh.fsdp=-1` (all devices:
  8 GPUs, or the 4 chips of a v5p-8).
- `lora.rank=64`, `lora.alpha=16.0`, `lora.dropout=0.05`, all seven `lora.targets`,
  `lora.base_dtype="nf4"`.
- `optim.lr=1e-4`, `optim.min_lr=1e-5`, `optim.lr_warmup_iters=20`.
- `model.remat_policy="full"`: the planner puts a step at ~34 GiB per H100 (~40 GiB per
  v5p chip) with it, over 80 GB with selective remat.
- `workdir=`; `load=` stays stage 1's checkpoints (the full model, chatml rows trained),
  `finetune=` True as in stage 2.

As `configs/sft10.py` otherwise: `model=` Llama-2-70B with `model.attention_impl="pallas"`,
`hidden_dropout=0.25` with LIMA dropout, `train_iters=519`, global batch 64 in
micro-batches of 2, Megatron's `loss_normalization`, `eval_full=False`.
"""

import os

from oasst_jax.config import load_config

HERE = os.path.dirname(__file__)


def get_config():
    c = load_config(os.path.join(HERE, "sft10.py"))
    c.mesh.tensor = 1
    c.mesh.pipeline = 1
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.workdir = "runs/oasst_sft10_qlora_llama2_70b"
    c.lora.rank = 64
    c.lora.alpha = 16.0
    c.lora.dropout = 0.05
    c.lora.base_dtype = "nf4"
    # 80 layers x 2 x 4096 tokens: selective remat keeps ~56 GiB of activations per device
    # at this data-parallel-only layout; full remat ~10 GiB (python -m oasst_jax.plan)
    c.model.remat_policy = "full"
    c.optim.lr = 1e-4
    c.optim.min_lr = 1e-5
    c.optim.lr_warmup_iters = 20
    return c
