"""Tiny DPO on the bundled rm fixture: `configs/tiny_rm.py`'s data and shape, the dpo
objective (best reply against each worse one, beta 0.1), the reference on the fly.
Normally `load=` the SFT run's checkpoints (here: `runs/tiny/checkpoints`, from the demo)::

    python -m oasst_jax.train --config=configs/tiny_dpo.py --config.load=runs/tiny/checkpoints
"""

import os

from oasst_jax.config import load_config

HERE = os.path.dirname(__file__)


def get_config():
    c = load_config(os.path.join(HERE, "tiny_rm.py"))
    c.objective = "dpo"
    c.workdir = "runs/tiny_dpo"
    return c
