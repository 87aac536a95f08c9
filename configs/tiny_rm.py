"""A tiny reward model on the bundled rm fixture: `configs/tiny.py`'s model and mesh, the
rm objective (score head on each reply's last token, upstream's K-wise ranking loss).

Data (ranked shards of tests/data/oasst_rm.jsonl, in the demo's compact token layout)::

    python -m oasst_jax.pretokenize --config=configs/data/oasst_rm.py \\
      --config.tokenizer_path=output/sample/tokenizer.model \\
      --config.output_dir=output/sample_rm --config.num_workers=1 \\
      --config.megatron_new_tokens=False \\
      --config.datasets.oasst_export.input_file_path=tests/data/oasst_rm.jsonl \\
      --config.datasets.oasst_export.val_split=0.3
    python -m oasst_jax.train --config=configs/tiny_rm.py
"""

import os

from oasst_jax.config import load_config

HERE = os.path.dirname(__file__)


def get_config():
    c = load_config(os.path.join(HERE, "tiny.py"))
    c.objective = "rm"
    c.workdir = "runs/tiny_rm"
    c.data_path = "output/sample_rm"
    c.data_prefix = "oasst_rm"
    c.seq_length = 128
    c.global_batch_size = 8  # rows: 2 micro-batches of 4 rows (data-parallel 2)
    c.micro_batch_size = 4
    c.preference.max_sequences = 8
    c.preference.max_groups = 4
    c.train_iters = 20
    c.eval_interval = 10
    c.eval_iters = 1
    c.save_interval = 10
    c.hidden_dropout = 0.0
    c.lima_dropout = False
    return c
