"""Reward-model / DPO data: the OA export's ranked replies (upstream's ``mode: rm``).

The card's stage-2 export and languages (``configs/data/oasst_top1.py``), but every prefix
ending on a user turn with two or more ranked assistant replies becomes one example: the
chatml prefix and its replies, best first (:mod:`oasst_jax.data.oasst_export`), written as
ranked shards (:mod:`oasst_jax.data.shards`).  No ``top_k``: every rank is kept, as
upstream's reward-model configs do.  ``input_file_path`` is a local file (the card's export
is not on the Hugging Face hub under that name; by default it is read from the working
directory) and ``tokenizer_path`` is required (a file, or a hub id)::

    python -m oasst_jax.pretokenize --config=configs/data/oasst_rm.py \\
      --config.tokenizer_path=/models/llama2/tokenizer.model \\
      --config.datasets.oasst_export.input_file_path=/data/2023-07-23_oasst_ready.tar.gz
"""

from ml_collections import ConfigDict, config_dict

from oasst_jax.data import config as data_config


def get_config() -> ConfigDict:
    c = data_config.base_config()  # tokenizer_path: required, from the command line
    c.output_dir = "output/oasst_rm_2023-07-23"
    c.filename_prefix = "oasst_rm"
    c.num_workers = 2
    c.megatron_new_tokens = True  # the card's 32007 ids (<|im_start|> = 32005), as upstream
    # output_format: "oasst_jax" (the base's): Megatron's format holds no ranked replies
    c.datasets.oasst_export = ConfigDict(
        dict(
            lang="bg,ca,cs,da,de,en,es,fr,hr,hu,it,nl,pl,pt,ro,ru,sl,sr,sv,uk",
            # a local file: this export is not on the Hugging Face hub under its name
            # (OpenAssistant/oasst1 and oasst2 hold other dates' exports)
            input_file_path="2023-07-23_oasst_ready.tar.gz",
            mode="rm",
            top_k=config_dict.placeholder(int),  # None: every rank
            val_split=0.05,
            max_val_set=config_dict.placeholder(int),  # None: no cap
        )
    )
    return c
