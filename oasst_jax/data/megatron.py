"""Megatron's mmap indexed dataset: the ``.bin``/``.idx`` pairs upstream's pretokenizer
writes and Megatron-LLM (or megatron-core's ``IndexedDataset``) trains on.

One indexed dataset is ``{path}.bin``, the sequences back to back in one dtype, and
``{path}.idx`` (``MMapIndexedDataset.Index`` of epfLLM/Megatron-LLM
``megatron/data/indexed_dataset.py``), little-endian::

    b"MMIDIDX\\x00\\x00"  <Q version (1)  <B dtype code  <Q sequence count n  <Q document count d
    int32[n] sequence lengths  int64[n] byte offsets into .bin  int64[d] document index

Dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16 (6 and 7 are floats).

A split ``{dir}/{prefix}-{split}`` is two of them with one sequence per sample:
``{prefix}-{split}-text`` (token ids: uint16 when the vocabulary is < 65500, else int32, as
upstream's ``best_fitting_dtype``) and ``{prefix}-{split}-role`` (uint16 role ids: system 0,
user 1, assistant 2, context 3).  Megatron-LLM trains on ``role == assistant``.

Document index: upstream's pretokenizer never ends a document, so its ``.idx`` holds
``[0]``; we write ``[0, 1, ..., n]`` (one document per sample, as Megatron's
``preprocess_data``), which megatron-core requires (``document_indices[-1] == n``).  Neither
trainer reads it, and :class:`MegatronDataSource` accepts both.

Beside a split we write ``{prefix}-{split}-metadata.json`` (ours, the shard metadata: counts,
largest token id, tokenizer identity); data made by upstream's tool has none, and is then
checked against the directory's ``special_tokens.json``.  Every split read is checked
(:func:`check_split`): index against data, every token and role id scanned.
Files are written under hidden temporary names and renamed into place only by
:meth:`MegatronSplitWriter.commit`.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from oasst_jax import atomic_files
from oasst_jax.data import shards
from oasst_jax.turns import DataError

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<u1"),
    2: np.dtype("<i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f4"),
    8: np.dtype("<u2"),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
ROLE_DTYPE = np.dtype("<u2")
SPECIAL_TOKENS_FILE = "special_tokens.json"
_HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


def text_dtype(vocab_size: int) -> np.dtype:
    """Upstream's ``best_fitting_dtype``: uint16 below 65500 ids, else int32."""
    return np.dtype("<u2") if vocab_size < shards.UINT16_LIMIT else np.dtype("<i4")


def split_prefix(output_dir: str | os.PathLike, prefix: str, split: str) -> Path:
    """``{output_dir}/{prefix}-{split}``: append ``-text``/``-role`` and ``.bin``/``.idx``."""
    return Path(output_dir) / f"{prefix}-{split}"


def _feature(split: Path, feature: str) -> Path:
    return split.with_name(f"{split.name}-{feature}")


def metadata_path(split: Path) -> Path:
    return _feature(split, "metadata.json")


def split_files(split: Path) -> list[Path]:
    """The four files of a split (text and role ``.bin``/``.idx``)."""
    return [
        _feature(split, f"{feature}{ext}")
        for feature in ("text", "role")
        for ext in (".bin", ".idx")
    ]


def exists(split: Path) -> bool:
    """Whether all four files of a split are there."""
    return all(f.is_file() for f in split_files(split))


# ----------------------------------------------------------------------------- writing


class IndexedDatasetWriter:
    """Streams sequences into a hidden ``.bin``; :meth:`finish` writes the ``.idx`` beside
    it and :meth:`commit` renames both into place."""

    def __init__(self, path: Path, dtype: np.dtype):
        if np.dtype(dtype) not in CODES:
            raise ValueError(f"no indexed-dataset code for dtype {dtype}")
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        tag = uuid.uuid4().hex[:8]
        self._tmp = {
            ext: self.path.with_name(f".{self.path.name}{ext}.tmp-{tag}")
            for ext in (".bin", ".idx")
        }
        self._bin = open(self._tmp[".bin"], "wb")
        self._sizes: list[np.ndarray] = []

    def add_batch(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` sequences given back to back in ``values``."""
        self._bin.write(np.asarray(values).astype(self.dtype, copy=False).tobytes())
        self._sizes.append(np.asarray(lengths, dtype=np.int32))

    def finish(self) -> None:
        """Close the ``.bin`` and write the ``.idx`` (both fsynced, still hidden)."""
        _close(self._bin)
        sizes = np.concatenate([np.zeros(0, np.int32), *self._sizes])
        write_index(self._tmp[".idx"], self.dtype, sizes, np.arange(sizes.size + 1))

    def commit(self) -> None:
        for ext, tmp in self._tmp.items():
            os.replace(tmp, self.path.with_name(self.path.name + ext))

    def abort(self) -> None:
        shards.close_quietly(self._bin)
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)


def write_index(path: Path, dtype: np.dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
    """An ``.idx`` for sequences of ``sizes`` stored contiguously in ``dtype``."""
    sizes = np.asarray(sizes, dtype="<i4")
    pointers = np.zeros(sizes.size, dtype="<i8")
    np.cumsum(sizes[:-1], dtype="<i8", out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    doc_idx = np.asarray(doc_idx, dtype="<i8")
    with open(path, "wb") as f:
        f.write(_HEAD.pack(HEADER, VERSION, CODES[np.dtype(dtype)], sizes.size, doc_idx.size))
        for array in (sizes, pointers, doc_idx):
            f.write(array.tobytes())
        _close(f)


def _close(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


class MegatronSplitWriter(shards.StagedWriter):
    """The ``-text`` and ``-role`` datasets of one split (and our metadata beside them).

    Same interface as :class:`shards.ShardWriter`: ``add_batch``, ``num_samples``,
    ``commit(metadata)``; leaving the ``with`` block without committing removes everything.
    """

    def __init__(self, split: Path, *, vocab_size: int):
        self.split = Path(split)
        self.split.parent.mkdir(parents=True, exist_ok=True)
        self._vocab_size = vocab_size
        self._text = IndexedDatasetWriter(_feature(self.split, "text"), text_dtype(vocab_size))
        self._role = IndexedDatasetWriter(_feature(self.split, "role"), ROLE_DTYPE)
        meta = metadata_path(self.split)
        self._meta_tmp = meta.with_name(f".{meta.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._num_samples = 0
        self._num_tokens = 0
        self._max_token_id = -1
        self._done = False

    def add_batch(self, tokens: np.ndarray, roles: np.ndarray, lengths: np.ndarray) -> None:
        tokens, roles, lengths = np.asarray(tokens), np.asarray(roles), np.asarray(lengths)
        if tokens.shape != roles.shape or tokens.ndim != 1 or int(lengths.sum()) != tokens.size:
            raise ValueError("tokens, roles and lengths are not aligned")
        if tokens.size:
            if tokens.min() < 0 or tokens.max() >= self._vocab_size:
                raise ValueError(f"token id out of range for vocab_size {self._vocab_size}")
            self._max_token_id = max(self._max_token_id, int(tokens.max()))
        self._text.add_batch(tokens, lengths)
        self._role.add_batch(roles, lengths)
        self._num_samples += lengths.size
        self._num_tokens += tokens.size

    def prepare(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """Write the indexes and our metadata, still under hidden names."""
        self._text.finish()
        self._role.finish()
        self._meta = {
            "format": "megatron_mmap",
            "format_version": shards.FORMAT_VERSION,
            "num_samples": self._num_samples,
            "num_tokens": self._num_tokens,
            "token_dtype": self._text.dtype.str,
            "max_token_id": self._max_token_id,
            **metadata,
        }
        atomic_files.write_json(self._meta_tmp, self._meta, indent=2)
        return self._meta

    def commit(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`prepare` (unless done), then rename the split's files into place."""
        meta = self._meta if self._meta is not None else self.prepare(metadata or {})
        metadata_path(self.split).unlink(missing_ok=True)  # the split reads as ours only once whole
        self._text.commit()
        self._role.commit()
        os.replace(self._meta_tmp, metadata_path(self.split))
        self._done = True
        return meta

    def abort(self) -> None:
        """Remove both datasets' temporaries and our metadata's (closing quietly)."""
        self._text.abort()
        self._role.abort()
        self._meta_tmp.unlink(missing_ok=True)
        self._done = True


def write_special_tokens(output_dir: Path, tokenizer: Any) -> None:
    """``special_tokens.json`` as upstream writes it (``json.dump``, no newline)."""
    with atomic_files.atomic_path(Path(output_dir) / SPECIAL_TOKENS_FILE) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(tokenizer.special_tokens(), f)


# ----------------------------------------------------------------------------- reading


class Index:
    """The parsed ``.idx`` of one indexed dataset (arrays memory-mapped)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size if self.path.is_file() else -1
        if size < _HEAD.size:
            raise DataError(f"{self.path}: missing or too short for a Megatron index")
        with open(self.path, "rb") as f:
            magic, version, code, n, d = _HEAD.unpack(f.read(_HEAD.size))
        if magic != HEADER or version != VERSION or code not in DTYPES:
            raise DataError(
                f"{self.path}: not a Megatron mmap index (header {magic!r}, version {version}, "
                f"dtype code {code})"
            )
        if size != _HEAD.size + 4 * n + 8 * n + 8 * d:
            raise DataError(f"{self.path}: size {size} does not match {n} sequences, {d} documents")
        self.dtype = DTYPES[code]
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.sizes = raw[_HEAD.size : _HEAD.size + 4 * n].view("<i4")
        self.pointers = raw[_HEAD.size + 4 * n : _HEAD.size + 12 * n].view("<i8")
        self.doc_idx = raw[_HEAD.size + 12 * n :].view("<i8")

    def __len__(self) -> int:
        return int(self.sizes.size)


def _open_feature(split: Path, feature: str) -> tuple[Index, np.ndarray]:
    """The index and the memory-mapped data of ``{split}-{feature}``, checked to agree:
    no negative length, and the sequences back to back from byte 0 (the layout every
    writer of the format produces, Megatron's ``_get_pointers``) inside the ``.bin``, so a
    pointer that goes back or past the end is one line naming the first bad sequence."""
    index = Index(_feature(split, f"{feature}.idx"))
    data_path = _feature(split, f"{feature}.bin")
    n_bytes = data_path.stat().st_size if data_path.is_file() else -1
    itemsize = index.dtype.itemsize
    if n_bytes < 0 or n_bytes % itemsize:
        raise DataError(f"{data_path}: missing or not the size its index says; re-run pretokenize")
    shards.check_ids(index.path, index.sizes, 1 << 31, "sequence length", "(negative)")
    starts = np.zeros(len(index) + 1, np.int64)
    np.cumsum(index.sizes, dtype=np.int64, out=starts[1:])
    bad = np.flatnonzero(index.pointers != starts[:-1] * itemsize)
    if bad.size:
        i = int(bad[0])
        where = f"where sequence {i - 1} ends" if i else "(the start of the file)"
        raise DataError(
            f"{index.path}: pointer {i} is byte {int(index.pointers[i])}, not "
            f"{int(starts[i]) * itemsize} {where} (out of order, overlapping or gapped); "
            "re-run pretokenize"
        )
    if int(starts[-1]) * itemsize > n_bytes:
        end = int(np.searchsorted(starts[1:] * itemsize, n_bytes, side="right"))
        raise DataError(
            f"{data_path}: missing or not the size its index says: sequence {end} ends at "
            f"byte {int(starts[end + 1]) * itemsize}, past the end of the file ({n_bytes} "
            "bytes); re-run pretokenize"
        )
    data = (
        np.memmap(data_path, dtype=index.dtype, mode="r") if n_bytes else np.zeros(0, index.dtype)
    )
    return index, data[: int(starts[-1])]


def read_metadata(split: Path) -> dict[str, Any] | None:
    """Our ``{split}-metadata.json``, or ``None`` (data made by upstream's tool)."""
    path = metadata_path(split)
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


class MegatronDataSource:
    """A Megatron-format split as a grain ``RandomAccessDataSource``, like
    :class:`shards.ShardDataSource`: ``source[i]`` is ``{"tokens": int32[n], "roles":
    uint8[n]}``.  Files are mapped lazily in each process; pickling carries only the path.
    An empty split, or text and role datasets that do not line up, are refused."""

    def __init__(self, split: str | os.PathLike):
        self.path = Path(split)
        self.metadata = read_metadata(self.path)
        self._arrays: tuple | None = None
        text_index = self._open()[0]
        self._len = len(text_index)
        if self.metadata is not None and (
            self.metadata.get("num_samples") != self._len
            or self.metadata.get("num_tokens") != int(text_index.sizes.sum(dtype=np.int64))
        ):
            raise DataError(
                f"{metadata_path(self.path)} describes other files than {self.path.name}-text/"
                "-role (written over by another tool?); remove it or re-run pretokenize"
            )
        if self._len == 0:
            raise DataError(
                f"{self.path} is an empty split (0 samples); nothing to train or evaluate on"
            )

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "metadata": self.metadata, "len": self._len}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.metadata, self._len = state["path"], state["metadata"], state["len"]
        self._arrays = None

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"MegatronDataSource({str(self.path)!r}, num_samples={self._len})"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"sample {index} out of range for {self._len} samples")
        text_idx, text, role_idx, role = self._open()
        return {
            "tokens": _sequence(text_idx, text, index).astype(np.int32),
            "roles": _sequence(role_idx, role, index).astype(np.uint8),
        }

    def lengths(self) -> np.ndarray:
        """Tokens per sample (int64); reads only the index."""
        return self._open()[0].sizes.astype(np.int64)

    def tokens(self) -> np.ndarray:
        """Every token id of the split (memory-mapped, in file order)."""
        return self._open()[1]

    def roles(self) -> np.ndarray:
        """Every role id of the split (memory-mapped, in file order)."""
        return self._open()[3]

    def _open(self) -> tuple:
        if self._arrays is None:
            text_idx, text = _open_feature(self.path, "text")
            role_idx, role = _open_feature(self.path, "role")
            if not np.array_equal(text_idx.sizes, role_idx.sizes):
                raise DataError(
                    f"{self.path}: -text and -role datasets hold different sample lengths "
                    f"({len(text_idx)} and {len(role_idx)} samples); re-run pretokenize"
                )
            self._arrays = (text_idx, text, role_idx, role)
        return self._arrays


def _sequence(index: Index, data: np.ndarray, i: int) -> np.ndarray:
    start = int(index.pointers[i]) // index.dtype.itemsize
    return data[start : start + int(index.sizes[i])]


def check_split(split: str | os.PathLike, vocab_size: int, tokenizer: Any = None) -> None:
    """Refuse a Megatron-format split a model of ``vocab_size`` ids cannot train on: missing,
    damaged (index, role ids), empty, holding a token id >= ``vocab_size`` (a scan of the
    ``-text.bin`` itself, whatever our metadata says), or (given ``tokenizer``) made with
    another tokenizer: by our metadata's fingerprint when present, else by the directory's
    ``special_tokens.json`` (upstream's), which names the id layout."""
    split = Path(split)
    source = MegatronDataSource(split)
    meta = source.metadata
    if tokenizer is not None:
        if meta is not None and meta.get("tokenizer"):
            shards.check_tokenizer_metadata(split, meta, tokenizer)
        else:
            _check_special_tokens(split, tokenizer)
    shards.check_contents(
        _feature(split, "text.bin"), source.tokens(), _feature(split, "role.bin"),
        source.roles(), vocab_size,
    )  # fmt: skip


def _check_special_tokens(split: Path, tokenizer: Any) -> None:
    path = split.parent / SPECIAL_TOKENS_FILE
    if not path.is_file():
        return
    try:
        made = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: not JSON ({e})") from None
    ours = tokenizer.special_tokens()
    if made != ours:
        raise DataError(
            f"{split} was pretokenized with other special-token ids ({path}: {made}) than "
            f"{tokenizer.model_path} gives ({ours}); set megatron_new_tokens to the layout "
            "the data was made with"
        )
