"""Stage 2 data ``oasst_top1`` of the model card: the OA export, top-ranked replies only.

Mirrors the card's pretokenizer YAML (fields not set here keep
:func:`oasst_jax.data.config.base_config`'s defaults); ``input_file_path`` is a local file
(the card's export is not on the Hugging Face hub under that name; by default it is read
from the working directory) and ``tokenizer_path`` is required (a file, or a hub id)::

    python -m oasst_jax.pretokenize --config=configs/data/oasst_top1.py \\
      --config.tokenizer_path=/models/llama2/tokenizer.model \\
      --config.datasets.oasst_export.input_file_path=/data/2023-07-23_oasst_ready.tar.gz
"""

from ml_collections import ConfigDict, config_dict

from oasst_jax.data import config as data_config


def get_config() -> ConfigDict:
    c = data_config.base_config()  # tokenizer_path: required, from the command line
    c.output_dir = "output/oasst_top1_2023-07-23"
    c.filename_prefix = "oasst_top1"
    # min_assistant_tokens: None (the base's), the stage-2 YAML sets none
    c.num_workers = 2
    c.megatron_new_tokens = True  # the card's 32007 ids (<|im_start|> = 32005), as upstream
    # upstream's files (-text/-role .bin/.idx, special_tokens.json, _stats.txt) and ours
    c.output_format = "both"
    c.datasets.oasst_export = ConfigDict(
        dict(
            lang="bg,ca,cs,da,de,en,es,fr,hr,hu,it,nl,pl,pt,ro,ru,sl,sr,sv,uk",
            # a local file: this export is not on the Hugging Face hub under its name
            # (OpenAssistant/oasst1 and oasst2 hold other dates' exports)
            input_file_path="2023-07-23_oasst_ready.tar.gz",
            top_k=1,
            val_split=0.05,
            max_val_set=config_dict.placeholder(int),  # None: no cap
        )
    )
    return c
