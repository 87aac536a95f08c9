"""Stage 2 of the model card as LoRA on Llama-2-7B, on one 80 GB GPU.

The card's stage-2 data, schedule and regularisation (`configs/sft10.py`) with the
base frozen in bf16 (13.5 GB) and rank-64 adapters on every linear layer (QLoRA's
recipe: r=64, alpha=16, dropout 0.1, lr 2e-4 for 7B) trained in fp32 with AdamW
(~160M adapter parameters: ~2.5 GB with moments and gradients).  Checkpoints hold only
adapters + moments (~1.9 GB each, against ~81 GB for full fine-tuning); `python -m
oasst_jax.convert lora-to-peft --ckpt runs/oasst_sft10_lora_llama2_7b/checkpoints
--out DIR` exports them for PEFT.

What it changes from `configs/sft10.py`:

- `model=` Llama-2-7B (`configs/model/llama2_7b.py`) with `model.attention_impl="pallas"`.
- `mesh.tensor=1`, `mesh.pipeline=1` (`mesh.data=-1`: one GPU, or data parallel on more).
- `lora.rank=64`, `lora.alpha=16.0`, `lora.dropout=0.1`, all seven `lora.targets`
  (the default), `lora.base_dtype="bfloat16"`.
- `optim.lr=2e-4`, `optim.min_lr=2e-5`, `optim.lr_warmup_iters=20`: adapters want a
  larger learning rate than full fine-tuning.
- `load="checkpoints/llama2-7b-chatml"` (`convert hf-to-orbax --add-chatml-tokens` of
  Llama-2-7b-hf), `finetune=` unchanged (True: only the base weights are read) and
  `workdir=`.  The chatml embedding rows stay frozen at their mean initialisation (only
  adapters train); a base whose chatml rows were trained (stage 1) avoids that.

Everything else as `configs/sft10.py`: `hidden_dropout=0.25` with LIMA dropout,
`train_iters=519`, global batch 64 in micro-batches of 2, Megatron's
`loss_normalization`, the `eval_full=False` continuing validation stream.
"""

import os

from oasst_jax.config import load_config

HERE = os.path.dirname(__file__)


def get_config():
    c = load_config(os.path.join(HERE, "sft10.py"))
    c.model = load_config(os.path.join(HERE, "model", "llama2_7b.py"))
    c.model.attention_impl = "pallas"
    c.model.vocab_size = 32007  # the card's token layout (configs/pre10.py)
    c.mesh.tensor = 1
    c.mesh.pipeline = 1
    c.workdir = "runs/oasst_sft10_lora_llama2_7b"
    c.load = "checkpoints/llama2-7b-chatml"
    c.lora.rank = 64
    c.lora.alpha = 16.0
    c.lora.dropout = 0.1
    c.lora.base_dtype = "bfloat16"
    c.optim.lr = 2e-4
    c.optim.min_lr = 2e-5
    c.optim.lr_warmup_iters = 20
    return c
