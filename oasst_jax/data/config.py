"""The pretokenizer's data config: every field at its default, and its validation.

``configs/data/*.py`` start from :func:`base_config` (as the train configs start from
:func:`oasst_jax.config.base_config`) and set the output, the datasets and what the card
changes; :func:`validate_config` refuses an unknown key, a bad value or an input that is
not there before any work (``python -m oasst_jax.pretokenize``, :mod:`oasst_jax.cli.pretokenize`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from oasst_jax.data import oasst_export, outputs
from oasst_jax.data.sources import LOADERS, OPTIONS
from oasst_jax.readers import MAX_RECORD_BYTES
from oasst_jax.turns import DataError

SPLIT_OPTIONS = ("fraction", "val_split", "max_val_set")
PATH_OPTIONS = ("path", "input_file_path")
# Loader options sources.OPTIONS does not list (yet): the oasst export's mode.
MODE_OPTIONS: dict[str, tuple[str, ...]] = {"oasst_export": ("mode",)}
DEFAULT_VAL_SPLIT = 0.2


def base_config() -> ml_collections.ConfigDict:
    """Every field the pretokenizer reads, at its default: ``configs/data/*.py`` start here
    (as the train configs start from :func:`oasst_jax.config.base_config`) and set the
    output, the datasets and what the card changes."""
    c = ml_collections.ConfigDict(sort_keys=False)  # fields in this order
    c.output_dir = ""  # required
    c.filename_prefix = ""  # required: the splits are {output_dir}/{prefix}-{train,val}
    c.tokenizer_path = ""  # required: a SentencePiece model (Llama-2's tokenizer.model)
    c.min_assistant_tokens = ml_collections.config_dict.placeholder(int)  # None: no minimum
    c.megatron_new_tokens = False  # True: the 32007-token layout the released model used
    c.check_tokenization = True  # skip samples whose joined text tokenises differently
    c.seed = 42
    c.num_workers = 1  # encoder processes; the output is the same for any number
    c.overwrite = False  # True: write even where shards of another tokenizer lie
    c.max_record_bytes = MAX_RECORD_BYTES  # a longer JSON line is skipped (oversize_record)
    c.output_format = "oasst_jax"  # | "megatron" (upstream's files) | "both"
    c.write_json = False  # True: also {prefix}-{split}.jsonl (upstream's --write_json)
    c.compress = False  # True: also {output_dir}.tar.gz (upstream's --compress)
    # required: name -> loader and split options; sort_keys=False keeps the config's order
    # (the order of the datasets in the output files)
    c.datasets = ml_collections.ConfigDict(sort_keys=False)
    return c


REQUIRED = ("output_dir", "filename_prefix", "tokenizer_path", "datasets")
# Every other field of base_config() and its default; any key outside these two is refused.
DEFAULTS: dict[str, Any] = {k: v for k, v in base_config().items() if k not in REQUIRED}


def setting(config: Any, key: str) -> Any:
    value = config.get(key)
    return DEFAULTS[key] if value is None else value


def dataset_options(config: Any, name: str) -> dict[str, Any]:
    options = config.datasets[name]
    return dict(options.to_dict() if hasattr(options, "to_dict") else options)


def _need_positive_int(value: Any, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"config: {field} must be a positive int, got {value!r}")


def validate_config(config: Any) -> list[str]:
    """Check the config before any work; returns the dataset names in config order.

    A key the pretokenizer does not read, at the top level or in a dataset's section,
    is an error: a misspelt option (``valsplit``) must not be silently ignored."""
    for key in REQUIRED:
        if not config.get(key):
            raise DataError(f"config: '{key}' is required")
    unknown = [k for k in config.keys() if k not in REQUIRED and k not in DEFAULTS]
    if unknown:
        raise DataError(f"config: unknown field {unknown[0]!r}; valid: {', '.join(FIELDS)}")
    _check_output_path(Path(config.output_dir))
    if setting(config, "output_format") not in outputs.OUTPUT_FORMATS:
        raise DataError(
            f"config: output_format must be one of {', '.join(outputs.OUTPUT_FORMATS)}, "
            f"got {setting(config, 'output_format')!r}"
        )
    for key in ("write_json", "compress", "overwrite"):
        if not isinstance(setting(config, key), bool):
            raise DataError(f"config: {key} must be true or false, got {setting(config, key)!r}")
    _need_positive_int(setting(config, "num_workers"), "num_workers")
    _need_positive_int(setting(config, "max_record_bytes"), "max_record_bytes")
    names = list(config.datasets.keys())
    for name in names:
        if name not in LOADERS:
            raise DataError(f"unknown dataset {name!r}; valid: {', '.join(LOADERS)}")
        opts = dataset_options(config, name)
        valid = (*OPTIONS[name], *MODE_OPTIONS.get(name, ()), *SPLIT_OPTIONS)
        for key in opts:
            if key not in valid:
                raise DataError(
                    f"datasets.{name}: unknown option {key!r}; valid: {', '.join(valid)}"
                )
        val_split = opts.get("val_split", DEFAULT_VAL_SPLIT)
        if not 0.0 <= float(val_split) < 1.0:
            raise DataError(f"datasets.{name}.val_split must be in [0, 1), got {val_split}")
        fraction = opts.get("fraction", 1.0)
        if not 0.0 < float(fraction) <= 1.0:
            raise DataError(f"datasets.{name}.fraction must be in (0, 1], got {fraction}")
        max_val = opts.get("max_val_set")
        if max_val is not None and int(max_val) < 0:
            raise DataError(f"datasets.{name}.max_val_set must be >= 0, got {max_val}")
        if opts.get("max_record_bytes") is not None:
            _need_positive_int(opts["max_record_bytes"], f"datasets.{name}.max_record_bytes")
        for key in PATH_OPTIONS:
            if opts.get(key) and not Path(opts[key]).exists():
                raise DataError(f"datasets.{name}.{key}: input not found: {opts[key]}")
    _check_ranked(config, names)
    return names


def is_ranked(config: Any) -> bool:
    """Whether the run pretokenizes rm examples (a dataset in ``mode = "rm"``)."""
    return any(dataset_options(config, n).get("mode") == "rm" for n in config.datasets.keys())


def _check_ranked(config: Any, names: list[str]) -> None:
    """An rm run: every dataset in rm mode, only our shards, no ``min_assistant_tokens``."""
    for name in names:
        mode = dataset_options(config, name).get("mode", "sft")
        if mode not in oasst_export.MODES:
            modes = ", ".join(oasst_export.MODES)
            raise DataError(f"config: datasets.{name}.mode must be one of {modes}, got {mode!r}")
    if not is_ranked(config):
        return
    for name in names:
        if dataset_options(config, name).get("mode") != "rm":
            raise DataError(
                f"config: datasets.{name} is not in rm mode, but another dataset is: an rm run "
                "writes ranked examples only (set datasets.<name>.mode=rm or drop the dataset)"
            )
    if setting(config, "output_format") != "oasst_jax":
        raise DataError(
            f"config: output_format must be 'oasst_jax' in rm mode (Megatron's format holds no "
            f"ranked replies), got {setting(config, 'output_format')!r}"
        )
    for key in ("write_json", "min_assistant_tokens"):
        if config.get(key):
            raise DataError(f"config: {key} is not supported in rm mode, got {config.get(key)!r}")


FIELDS = (*REQUIRED, *DEFAULTS)


def _check_output_path(out_dir: Path) -> None:
    """``output_dir`` must be a directory or creatable as one (not a file, nor under one)."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise DataError(f"config: output_dir {out_dir}: {path} is not a directory")
            return
