"""The README demo: all five card datasets from the small fixtures bundled in ``tests/data/``.

Train the small tokenizer first (seconds), then pretokenize (run from the repo root)::

    python -m oasst_jax.tokenizer train --input tests/data --out output/sample/tokenizer.model \\
      --vocab-size 1000
    python -m oasst_jax.pretokenize --config=configs/data/sample.py

Split options follow the card (stage 1 sets, then the stage 2 oasst export with ``top_k=1``);
``val_split`` is larger than the card's so the tiny fixtures still get a validation split.
"""

from ml_collections import ConfigDict

from oasst_jax.data import config as data_config
from oasst_jax.data.sources import REFUSAL_PHRASES


def get_config() -> ConfigDict:
    c = data_config.base_config()
    c.output_dir = "output/sample/data"
    c.filename_prefix = "sample"
    c.min_assistant_tokens = 25
    c.tokenizer_path = "output/sample/tokenizer.model"
    c.num_workers = 2
    # upstream's files (-text/-role .bin/.idx, special_tokens.json, _stats.txt) and ours
    c.output_format = "both"
    c.datasets.megacode2 = ConfigDict(
        dict(
            path="tests/data/megacode2.json",
            fraction=0.5,
            val_split=0.1,
            max_val_set=1000,
            phrase_filter=REFUSAL_PHRASES,
        )
    )
    c.datasets["orca-chat"] = ConfigDict(
        dict(
            path="tests/data/orca-chat-gpt4.json",
            val_split=0.1,
            max_val_set=1000,
            drop_blank_turns=False,
        )
    )
    c.datasets.dolly15k_multilingual = ConfigDict(
        dict(
            path="tests/data/dolly15k",
            val_split=0.1,
            max_val_set=300,
            phrase_filter=REFUSAL_PHRASES,
            drop_blank_turns=False,
        )
    )
    c.datasets.oa_leet10k = ConfigDict(
        dict(
            path="tests/data/oa_leet10k.parquet",
            val_split=0.1,
            max_val_set=250,
            phrase_filter=REFUSAL_PHRASES,
        )
    )
    c.datasets.oasst_export = ConfigDict(
        dict(
            lang="bg,ca,cs,da,de,en,es,fr,hr,hu,it,nl,pl,pt,ro,ru,sl,sr,sv,uk",
            input_file_path="tests/data/oasst_ready.tar.gz",
            top_k=1,
            val_split=0.2,
            max_val_set=100,
        )
    )
    return c
