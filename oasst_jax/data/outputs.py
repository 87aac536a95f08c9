"""What a pretokenizer run writes per split, in the formats its config asks for, and how a
run reads a split back in whichever format it finds.

``output_format`` (``oasst_jax`` | ``megatron`` | ``both``):

- ``oasst_jax``: our shard directory ``{prefix}-{split}/`` (:mod:`oasst_jax.data.shards`);
- ``megatron``: what upstream's pretokenizer writes, ``{prefix}-{split}-text.bin/.idx``
  and ``-role.bin/.idx`` (:mod:`oasst_jax.data.megatron`), ``special_tokens.json`` and
  ``{prefix}-{split}_stats.txt``;

plus, with ``write_json``, ``{prefix}-{split}.jsonl`` (one ``{"text": chatml}`` per accepted
sample, upstream's ``--write_json``) and, with ``compress``, ``{output_dir}.tar.gz`` of the
whole directory (upstream's ``--compress``).

Every file is written under a hidden temporary name and renamed into place once complete,
so none is ever seen half-written; the run's ``metadata.json`` (removed before the first
rename, written after the last) says that the set is complete.  Outputs of this prefix in a
format the run does not write are removed, so a directory never mixes two runs' splits.

A run reads a split back with :func:`open_source` / :func:`check_source`, which take our
shards when ``{prefix}-{split}/metadata.json`` exists and otherwise the Megatron pair
beside it (written by upstream's pretokenizer or ours), so data prepared for Megatron-LLM
trains as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from oasst_jax import atomic_files
from oasst_jax.data import megatron, shards
from oasst_jax.turns import DataError

OUTPUT_FORMATS = ("oasst_jax", "megatron", "both")


def formats(output_format: str) -> tuple[str, ...]:
    """The formats an ``output_format`` setting writes."""
    return ("oasst_jax", "megatron") if output_format == "both" else (output_format,)


def jsonl_path(output_dir: Path, prefix: str, split: str) -> Path:
    return Path(output_dir) / f"{prefix}-{split}.jsonl"


def stats_path(output_dir: Path, prefix: str, split: str) -> Path:
    return Path(output_dir) / f"{prefix}-{split}_stats.txt"


def full_prefix(output_dir: str, prefix: str, split: str) -> str:
    """Upstream's ``str(output_dir / f"{prefix}-{split}")`` as its stats header prints it."""
    return str(Path(output_dir) / f"{prefix}-{split}")


class SplitWriter(shards.StagedWriter):
    """Fans one split's samples out to the writers of each configured format (and the
    jsonl); :meth:`commit` finishes and renames them, leaving the block without it
    removes every temporary."""

    def __init__(
        self,
        output_dir: Path,
        prefix: str,
        split: str,
        *,
        vocab_size: int,
        output_format: str,
        write_json: bool = False,
    ):
        self._writers: list[Any] = []
        self._text = None
        self._num_samples = 0
        self._done = False
        self.write_text = write_json
        self._jsonl = jsonl_path(output_dir, prefix, split)
        self._jsonl_tmp = self._jsonl.with_name(f".{self._jsonl.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            if "oasst_jax" in formats(output_format):
                path = shards.split_path(output_dir, prefix, split)
                self._writers.append(shards.ShardWriter(path, vocab_size=vocab_size))
            if "megatron" in formats(output_format):
                path = megatron.split_prefix(output_dir, prefix, split)
                self._writers.append(megatron.MegatronSplitWriter(path, vocab_size=vocab_size))
            if write_json:
                self._text = open(self._jsonl_tmp, "w", encoding="utf-8")
        except BaseException:
            self.abort()
            raise

    def add_batch(self, tokens: np.ndarray, roles: np.ndarray, lengths: np.ndarray) -> None:
        for writer in self._writers:
            writer.add_batch(tokens, roles, lengths)
        self._num_samples += int(np.asarray(lengths).size)

    def add_texts(self, texts: list[str]) -> None:
        """The chatml text of the samples just added, as upstream's jsonl lines."""
        if self._text is not None:
            self._text.writelines(json.dumps({"text": t}) + "\n" for t in texts)

    def prepare(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """Prepare every format (``StagedWriter``); returns the first's split metadata."""
        self._meta = [writer.prepare(metadata) for writer in self._writers][0]
        if self._text is not None:
            self._text.flush()
            os.fsync(self._text.fileno())
            self._text.close()
        return self._meta

    def commit(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Commit every format; returns the first writer's split metadata."""
        meta = self._meta if self._meta is not None else self.prepare(metadata or {})
        for writer in self._writers:
            writer.commit()
        if self._text is not None:
            os.replace(self._jsonl_tmp, self._jsonl)
        self._done = True
        return meta

    def abort(self) -> None:
        """Every format's abort runs, even when one of them fails."""
        try:
            for writer in self._writers:
                with contextlib.suppress(OSError):
                    writer.abort()
            if self._text is not None:
                shards.close_quietly(self._text)
                self._jsonl_tmp.unlink(missing_ok=True)
        finally:
            self._done = True


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically (UTF-8, exactly these characters)."""
    with atomic_files.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def remove_stale(
    output_dir: Path, prefix: str, splits: tuple[str, ...], output_format: str, write_json: bool
) -> None:
    """Remove this prefix's outputs in formats this run did not write (an earlier run's)."""
    wrote = formats(output_format)
    for split in splits:
        stale: list[Path] = []
        shard_dir = shards.split_path(output_dir, prefix, split)
        if "oasst_jax" not in wrote and (shard_dir / shards.METADATA_FILE).is_file():
            shutil.rmtree(shard_dir)
        if "megatron" not in wrote:
            mega = megatron.split_prefix(output_dir, prefix, split)
            stale += [*megatron.split_files(mega), megatron.metadata_path(mega)]
            stale.append(stats_path(output_dir, prefix, split))
        if not write_json:
            stale.append(jsonl_path(output_dir, prefix, split))
        for path in stale:
            path.unlink(missing_ok=True)


def compress(output_dir: str | os.PathLike) -> Path:
    """``{output_dir}.tar.gz`` of the directory, members named as upstream's
    ``tar -czf {output_dir}.tar.gz {output_dir}`` names them; hidden temporaries skipped."""
    directory = Path(output_dir)
    archive = directory.with_name(directory.name + ".tar.gz")
    arcname = str(directory).lstrip("/") or directory.name

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = Path(info.name).name
        return None if name.startswith(".") and (".tmp-" in name or ".old-" in name) else info

    with atomic_files.atomic_path(archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(directory, arcname=arcname, filter=keep)
    return archive


# ----------------------------------------------------------------------------- reading


def split_format(data_path: str | os.PathLike, prefix: str, split: str) -> str:
    """``"oasst_jax"`` (our shards) or ``"megatron"``, by the files that exist; a one-line
    DataError when neither is there."""
    shard_dir = shards.split_path(data_path, prefix, split)
    if (shard_dir / shards.METADATA_FILE).is_file():
        return "oasst_jax"
    if megatron.exists(megatron.split_prefix(data_path, prefix, split)):
        return "megatron"
    raise DataError(
        f"{shard_dir} has no {shards.METADATA_FILE} and no Megatron files ({shard_dir.name}"
        "-text.bin/.idx, -role.bin/.idx) are beside it: not a finished pretokenizer output"
    )


def open_source(data_path: str | os.PathLike, prefix: str, split: str) -> Any:
    """``{data_path}/{prefix}-{split}`` as a grain data source in whichever format it is:
    :class:`~oasst_jax.data.shards.ShardDataSource` or
    :class:`~oasst_jax.data.megatron.MegatronDataSource`."""
    if split_format(data_path, prefix, split) == "oasst_jax":
        return shards.ShardDataSource(shards.split_path(data_path, prefix, split))
    return megatron.MegatronDataSource(megatron.split_prefix(data_path, prefix, split))


def check_source(
    data_path: str | os.PathLike, prefix: str, split: str, vocab_size: int, tokenizer: Any = None
) -> None:
    """:func:`shards.check_split <oasst_jax.data.shards.check_split>` or
    :func:`megatron.check_split <oasst_jax.data.megatron.check_split>`, by format."""
    if split_format(data_path, prefix, split) == "oasst_jax":
        shards.check_split(shards.split_path(data_path, prefix, split), vocab_size, tokenizer)
    else:
        megatron.check_split(megatron.split_prefix(data_path, prefix, split), vocab_size, tokenizer)


def recorded_tokenizer(data_path: str | os.PathLike, prefix: str, split: str) -> dict | None:
    """What the split's metadata records about the tokenizer it was made with
    (:func:`~oasst_jax.data.shards.tokenizer_identity`: ``model_path``, ``sha256``,
    ``megatron_new_tokens``, ...), or ``None`` for a Megatron split made by upstream's tool."""
    if split_format(data_path, prefix, split) == "oasst_jax":
        meta = shards.read_metadata(shards.split_path(data_path, prefix, split))
    else:
        meta = megatron.read_metadata(megatron.split_prefix(data_path, prefix, split))
    return (meta or {}).get("tokenizer") or None
