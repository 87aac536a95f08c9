"""Stage 1 of the model card: Llama-2-70B on the `oasst_pre10_min25` mix (run45_oasst_pre10).

Megatron-LLM flags as the card ran them: TP 8 x PP 4 with sequence parallelism,
seq 4096, global batch 64, micro batch 2, bf16, lr 1e-5 -> 1e-6 cosine,
warmup 100, 12000 iterations, Adam (0.9, 0.95, 1e-12), weight decay 1e-6,
no dropout, eval every 50 x 10, save every 500, selective recompute, flash attention.
Start from a converted base model: `--config.load=/path/to/llama2-70b-orbax`.

Where this config differs from the library defaults (`oasst_jax.config.base_config`),
every other field being the default and the card's value at once:

- `model=` Llama-2-70B (`configs/model/llama2_70b.py`) with
  `model.attention_impl="pallas"` (flash attention; the default is XLA attention).
- `mesh.tensor=8`, `mesh.pipeline=4`: the card's TP 8 x PP 4 (`mesh.data=-1` takes
  the devices left: 1 on 32).
- `loss_normalization="microbatch_mean"`: Megatron's loss, the mean over
  micro-batches of each one's mean over its assistant tokens; the default
  `global_token_mean` weighs every assistant token of a global batch the same.
  Validation loss is normalised the same way.
- `packing=False`: one right-padded sample per row, as Megatron-LLM without
  `--variable_seq_lengths`, so a step sees the card's 64 samples and stage 2's
  519 steps are its ~2.9 epochs (default: packed rows).  `--config.packing=True`
  packs ~8 samples per 4096-token row (the `samples` metric counts them): divide
  `train_iters` accordingly.
- `train_iters=12000`; `log_interval=1` (Megatron logs every iteration).
- `finetune=True`, `use_checkpoint_args=True`, `load="checkpoints/llama2-70b-chatml"`:
  the base weights only (fresh optimizer, step 0), model shape from that checkpoint.
- `workdir=`, `data_path=`, `data_prefix=`: this run's output and data.
- `megatron_new_tokens=True`, `model.vocab_size=32007`: the card's token ids, Megatron-LLM's
  layout without `--no_new_tokens` (`<CLS> <SEP> <EOD> <MASK> <PAD>` = 32000-32004,
  `<|im_start|>` = 32005, `<|im_end|>` = 32006), which the card's data configs write
  and `convert hf-to-orbax --add-chatml-tokens --megatron-new-tokens` gives the base
  model (the default is the compact 32002 layout of the demo).

Evaluation is the default, which is Megatron's: every 50 steps, 10 global batches
(640 samples) from a validation stream that continues from one evaluation to the
next (and across a resume); `--config.eval_full=True` reads the whole val split
at each evaluation instead (deterministic, better for comparing checkpoints).
"""

import os

from oasst_jax.config import base_config, load_config

HERE = os.path.dirname(__file__)


def get_config():
    c = base_config()
    c.model = load_config(os.path.join(HERE, "model", "llama2_70b.py"))
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "selective"
    c.model.attention_impl = "pallas"
    c.model.vocab_size = 32007  # the card's layout: 32000 + 5 Megatron tokens + 2 chatml
    c.megatron_new_tokens = True  # (with tokenizer_path) the same layout for the tokenizer
    c.mesh.tensor = 8
    c.mesh.pipeline = 4
    c.mesh.data = -1
    c.workdir = "runs/oasst_pre10_llama2_70b"
    c.data_path = "output/oasst_pre10_min25"
    c.data_prefix = "oasst_pre10"
    c.seq_length = 4096
    c.packing = False  # one padded sample per row: the card's 64 samples per step
    c.loss_normalization = "microbatch_mean"  # Megatron's mean of micro-batch means
    c.global_batch_size = 64
    c.micro_batch_size = 2
    c.train_iters = 12000
    c.optim.lr = 1e-5
    c.optim.min_lr = 1e-6
    c.optim.lr_warmup_iters = 100
    c.optim.adam_beta1 = 0.9
    c.optim.adam_beta2 = 0.95
    c.optim.adam_eps = 1e-12
    c.optim.weight_decay = 1e-6
    c.optim.clip_grad = 1.0
    c.hidden_dropout = 0.0
    c.attention_dropout = 0.0
    c.eval_interval = 50
    c.eval_iters = 10
    c.save_interval = 500
    c.log_interval = 1
    c.finetune = True  # the base Llama-2 weights, fresh optimizer
    c.use_checkpoint_args = True
    c.load = "checkpoints/llama2-70b-chatml"  # `convert hf-to-orbax --add-chatml-tokens`
    # `--megatron-new-tokens`: 7 new rows
    return c
