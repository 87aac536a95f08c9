"""Stage 1 data mix ``oasst_pre10_min25`` of the model card (SFT v10, instruction tuning).

Mirrors the card's pretokenizer YAML (a key with a dash is overridden as
``--config.datasets['orca-chat'].path=...``). Input paths are placeholders: point them at local
copies of the Hugging Face datasets, and set ``tokenizer_path`` to Llama-2's tokenizer.model
(fields not set here keep :func:`oasst_jax.pretokenize.base_config`'s defaults)::

    python -m oasst_jax.pretokenize --config=configs/data/oasst_pre10_min25.py \\
      --config.tokenizer_path=/models/llama2/tokenizer.model \\
      --config.datasets.megacode2.path=/data/DeDuped_LosslessMegaCode..._Uncensored.json \\
      --config.datasets['orca-chat'].path=/data/orca-chat-gpt4.json \\
      --config.datasets.dolly15k_multilingual.path=/data/dolly-15k-curated-multilingual \\
      --config.datasets.oa_leet10k.path=/data/oa_leet10k.parquet
"""

from ml_collections import ConfigDict

from oasst_jax import pretokenize
from oasst_jax.data.sources import REFUSAL_PHRASES


def get_config() -> ConfigDict:
    c = pretokenize.base_config()  # tokenizer_path: required, from the command line
    c.output_dir = "output/oasst_pre10_min25"
    c.filename_prefix = "oasst_pre10"
    c.min_assistant_tokens = 25
    c.num_workers = 2
    c.megatron_new_tokens = True  # the card's 32007 ids (<|im_start|> = 32005), as upstream
    # upstream's files (-text/-role .bin/.idx, special_tokens.json, _stats.txt) and ours
    c.output_format = "both"
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
