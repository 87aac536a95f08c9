"""Stage 1 data mix ``oasst_pre10_min25`` of the model card (SFT v10, instruction tuning).

Mirrors the card's pretokenizer YAML (a key with a dash is overridden as
``--config.datasets['orca-chat'].path=...``). Input paths are placeholders: point them at local
copies of the Hugging Face datasets, and ``tokenizer_path`` at Llama-2's tokenizer.model::

    python -m oasst_jax.pretokenize --config=configs/data/oasst_pre10_min25.py \\
      --config.tokenizer_path=/models/llama2/tokenizer.model \\
      --config.datasets.megacode2.path=/data/DeDuped_LosslessMegaCode..._Uncensored.json \\
      --config.datasets['orca-chat'].path=/data/orca-chat-gpt4.json \\
      --config.datasets.dolly15k_multilingual.path=/data/dolly-15k-curated-multilingual \\
      --config.datasets.oa_leet10k.path=/data/oa_leet10k.parquet
"""

from ml_collections import ConfigDict

from oasst_jax.data.sources import REFUSAL_PHRASES


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.output_dir = "output/oasst_pre10_min25"
    c.filename_prefix = "oasst_pre10"
    c.min_assistant_tokens = 25
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
    # sort_keys=False keeps the card's dataset order (the order of the output files).
    c.datasets = ConfigDict(sort_keys=False)
    c.datasets.megacode2 = ConfigDict(
        dict(
            path="/path/to/DeDuped_LosslessMegaCodeTrainingV2_942k_Evol_Uncensored.json",
            fraction=0.5,
            val_split=0.01,
            max_val_set=1000,
            phrase_filter=REFUSAL_PHRASES,  # upstream's FILTER_BY_WORDS; () turns it off
        )
    )
    c.datasets["orca-chat"] = ConfigDict(
        dict(
            path="/path/to/orca-chat-gpt4.json",
            val_split=0.01,
            max_val_set=1000,
            drop_blank_turns=False,  # upstream keeps empty turns
        )
    )
    c.datasets.dolly15k_multilingual = ConfigDict(
        dict(
            path="/path/to/databricks-dolly-15k-curated-multilingual",
            val_split=0.05,
            max_val_set=300,
            phrase_filter=REFUSAL_PHRASES,
            drop_blank_turns=False,
        )
    )
    c.datasets.oa_leet10k = ConfigDict(
        dict(
            path="/path/to/oa_leet10k.parquet",
            val_split=0.05,
            max_val_set=250,
            phrase_filter=REFUSAL_PHRASES,
        )
    )
    return c
