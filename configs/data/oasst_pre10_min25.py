"""Stage 1 data mix ``oasst_pre10_min25`` of the model card (SFT v10, instruction tuning).

Mirrors the card's pretokenizer YAML (a key with a dash is overridden as
``--config.datasets['orca-chat'].path=...``). Each dataset is read where upstream's
``custom_datasets`` read it: its Hugging Face hub id (``repo_id``) and files (``data_files``),
fetched into the standard Hugging Face cache on first use (``HF_HOME``/``HF_HUB_CACHE``;
``HF_HUB_OFFLINE=1``: from the cache only). A local ``path`` wins: the file itself, or a
directory holding ``data_files`` (a copy of the repository). ``tokenizer_path``: Llama-2's
tokenizer.model, or a hub id whose tokenizer.model to fetch (``meta-llama/Llama-2-7b-hf``
is gated: set ``HF_TOKEN``). Fields not set here keep
:func:`oasst_jax.data.config.base_config`'s defaults::

    python -m oasst_jax.pretokenize --config=configs/data/oasst_pre10_min25.py \\
      --config.tokenizer_path=/models/llama2/tokenizer.model \\
      [--config.datasets.megacode2.path=/data/DeDuped_LosslessMegaCode..._Uncensored.json]
"""

from ml_collections import ConfigDict, config_dict

from oasst_jax.data import config as data_config
from oasst_jax.data.sources import REFUSAL_PHRASES


def get_config() -> ConfigDict:
    c = data_config.base_config()  # tokenizer_path: required, from the command line
    c.output_dir = "output/oasst_pre10_min25"
    c.filename_prefix = "oasst_pre10"
    c.min_assistant_tokens = 25
    c.num_workers = 2
    c.megatron_new_tokens = True  # the card's 32007 ids (<|im_start|> = 32005), as upstream
    # upstream's files (-text/-role .bin/.idx, special_tokens.json, _stats.txt) and ours
    c.output_format = "both"
    c.datasets.megacode2 = ConfigDict(
        dict(
            repo_id="rombodawg/LosslessMegaCodeTrainingV2_1m_Evol_Uncensored",
            data_files="DeDuped_LosslessMegaCodeTrainingV2_942k_Evol_Uncensored.json",
            path=config_dict.placeholder(str),  # a local copy instead of the hub's
            fraction=0.5,
            val_split=0.01,
            max_val_set=1000,
            phrase_filter=REFUSAL_PHRASES,  # upstream's FILTER_BY_WORDS; () turns it off
        )
    )
    c.datasets["orca-chat"] = ConfigDict(
        dict(
            repo_id="shahules786/orca-chat",
            data_files="orca-chat-gpt4.json",
            path=config_dict.placeholder(str),
            val_split=0.01,
            max_val_set=1000,
            drop_blank_turns=False,  # upstream keeps empty turns
        )
    )
    c.datasets.dolly15k_multilingual = ConfigDict(
        dict(
            # upstream: load_dataset(repo_id), splits en, de, es, fr: data/{split}-*.parquet
            repo_id="argilla/databricks-dolly-15k-curated-multilingual",
            data_files="data/*.parquet",
            path=config_dict.placeholder(str),  # a directory holding those files
            val_split=0.05,
            max_val_set=300,
            phrase_filter=REFUSAL_PHRASES,
            drop_blank_turns=False,
        )
    )
    c.datasets.oa_leet10k = ConfigDict(
        dict(
            # upstream: load_dataset(repo_id, split="train") reads both files, in this order
            repo_id="ehartford/oa_leet10k",
            data_files=("data/oa_leet10k.parquet", "data/oa_leet10k_contests_merged.parquet"),
            path=config_dict.placeholder(str),
            val_split=0.05,
            max_val_set=250,
            phrase_filter=REFUSAL_PHRASES,
        )
    )
    return c
