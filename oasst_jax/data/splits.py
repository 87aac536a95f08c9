"""A pretokenized split in either on-disk format, chosen by the files that exist.

``{data_path}/{prefix}-{split}`` is read as

- our shards (:mod:`oasst_jax.data.shards`) when that directory holds ``metadata.json``;
- otherwise a Megatron indexed-dataset pair (:mod:`oasst_jax.data.megatron`) when
  ``{prefix}-{split}-text.bin/.idx`` and ``-role.bin/.idx`` exist, whether upstream's
  pretokenizer or ours wrote them, so data prepared for Megatron-LLM trains as it is.

Both give samples ``{"tokens", "roles"}`` and the same checks (not empty, ids below the
model's vocabulary, made with the run's tokenizer where the files say which).
"""

from __future__ import annotations

import os
from typing import Any

from oasst_jax.data import megatron, shards
from oasst_jax.data.conversation import DataError

FORMATS = ("oasst_jax", "megatron")


def split_format(data_path: str | os.PathLike, prefix: str, split: str) -> str:
    """``"oasst_jax"`` or ``"megatron"``; a one-line DataError when neither is there."""
    shard_dir = shards.split_path(data_path, prefix, split)
    if (shard_dir / shards.METADATA_FILE).is_file():
        return "oasst_jax"
    if megatron.exists(megatron.split_prefix(data_path, prefix, split)):
        return "megatron"
    raise DataError(
        f"{shard_dir} has no {shards.METADATA_FILE} and no Megatron files "
        f"({shard_dir.name}-text.bin/.idx, -role.bin/.idx) are beside it: "
        "not a finished pretokenizer output"
    )


def open_split(data_path: str | os.PathLike, prefix: str, split: str) -> Any:
    """The split as a grain data source (:class:`shards.ShardDataSource` or
    :class:`megatron.MegatronDataSource`)."""
    if split_format(data_path, prefix, split) == "oasst_jax":
        return shards.ShardDataSource(shards.split_path(data_path, prefix, split))
    return megatron.MegatronDataSource(megatron.split_prefix(data_path, prefix, split))


def check_split(
    data_path: str | os.PathLike, prefix: str, split: str, vocab_size: int, tokenizer: Any = None
) -> None:
    """:func:`shards.check_split` or :func:`megatron.check_split`, by format."""
    if split_format(data_path, prefix, split) == "oasst_jax":
        shards.check_split(shards.split_path(data_path, prefix, split), vocab_size, tokenizer)
    else:
        megatron.check_split(megatron.split_prefix(data_path, prefix, split), vocab_size, tokenizer)
