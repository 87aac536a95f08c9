"""DPO on the Open-Assistant ranked replies, from the stage-2 SFT model.

The policy starts from stage 2's checkpoints (`load=`); the reference is the same weights,
frozen: `dpo.reference="on_the_fly"` keeps them beside the policy (a second model in
memory), `"precomputed"` computes every sequence's reference log-prob once before training
into `{workdir}/reference_logps.json`.  Pairs: each prompt's best reply against each worse
one (`dpo.pairs="best_vs_rest"`, at most 4), sigmoid loss with `dpo.beta=0.1` on the
replies' summed log-probs.  Export the policy like SFT (`convert orbax-to-hf`).

Where this config differs from `configs/sft10.py`: `objective="dpo"`, the rm data, `load=`
stage 2's checkpoints, `finetune=True`, no dropout, `lr=5e-7` (TRL's DPO default) with 50
warm-up steps, `train_iters=400`, `preference.max_sequences=16` / `max_groups=8` pairs per
micro-batch of 2 rows x 4096 tokens, packed, `dpo.reference="precomputed"`.
"""

import os

from oasst_jax.config import load_config

HERE = os.path.dirname(__file__)


def get_config():
    c = load_config(os.path.join(HERE, "rm_oasst.py"))
    c.objective = "dpo"
    c.workdir = "runs/oasst_dpo_llama2_70b"
    c.optim.lr = 5e-7
    c.optim.min_lr = 5e-8
    c.dpo.beta = 0.1
    c.dpo.reference = "precomputed"
    c.preference.max_groups = 8
    return c
