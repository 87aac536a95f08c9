"""Stage 2 data ``oasst_top1`` of the model card: the OA export, top-ranked replies only.

Mirrors the card's pretokenizer YAML; ``input_file_path`` and ``tokenizer_path`` are
placeholders::

    python -m oasst_jax.pretokenize --config=configs/data/oasst_top1.py \\
      --config.tokenizer_path=/models/llama2/tokenizer.model \\
      --config.datasets.oasst_export.input_file_path=/data/2023-07-23_oasst_ready.tar.gz
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.output_dir = "output/oasst_top1_2023-07-23"
    c.filename_prefix = "oasst_top1"
    c.min_assistant_tokens = config_dict.placeholder(int)  # None: the stage-2 YAML sets none
    c.tokenizer_path = "/path/to/llama2/tokenizer.model"
    c.megatron_new_tokens = False  # True: the 32007-token layout the released model used
    c.check_tokenization = True
    c.seed = 42
    c.num_workers = 2
    c.overwrite = False  # True: write even where shards of another tokenizer lie
    c.max_record_bytes = 16 * 2**20  # a longer JSON line is skipped (oversize_record)
    # upstream's files (-text/-role .bin/.idx, special_tokens.json, _stats.txt) and ours
    c.output_format = "both"  # | "oasst_jax" | "megatron"
    c.write_json = False  # True: also {prefix}-{split}.jsonl (upstream's --write_json)
    c.compress = False  # True: also {output_dir}.tar.gz (upstream's --compress)
    c.datasets = ConfigDict(sort_keys=False)
    c.datasets.oasst_export = ConfigDict(
        dict(
            lang="bg,ca,cs,da,de,en,es,fr,hr,hu,it,nl,pl,pt,ro,ru,sl,sr,sv,uk",
            input_file_path="/path/to/2023-07-23_oasst_ready.tar.gz",
            top_k=1,
            val_split=0.05,
            max_val_set=config_dict.placeholder(int),  # None: no cap
        )
    )
    return c
