"""On-disk format of pretokenized splits, its atomic writer and a memory-mapped grain source.

One split is a directory ``{output_dir}/{prefix}-{split}`` holding

- ``tokens.bin``: all token ids back to back, ``uint16`` when the vocabulary is < 65500
  (as upstream's Megatron indexed datasets), else ``uint32``;
- ``roles.bin``: the aligned role id of every token (``uint8``, ``ROLES`` order);
- ``offsets.bin``: ``int64[num_samples + 1]``, sample ``i`` is ``[offsets[i], offsets[i+1])``;
- ``metadata.json``: format version, dtype, counts, the largest token id, tokenizer
  identity, the config.  Each split carries its own, so what a run reads is checked
  against the split itself, never against whatever ran last in the same directory.

A run reads a split through :func:`oasst_jax.data.outputs.open_source`, which takes these
shards or the Megatron files beside them, whichever exist.

A *ranked* split (the oasst export's rm mode, for reward models and DPO) is the same
directory with ``"layout": "ranked"`` and ``num_examples`` in its metadata and one more
index, ``examples.bin`` (``int64[num_examples + 1]``): example ``i`` is the samples
``[examples[i], examples[i+1])``, the first its prefix (a conversation ending on a user
turn), the others its replies as assistant turns, best first.  ``num_samples`` and
``num_tokens`` count those pieces.  :class:`RankedShardWriter` writes it and
:class:`RankedDataSource` reads it; :class:`ShardDataSource` refuses it (and the ranked
reader a plain split), so neither trains on the other's data by mistake.

Raw little-endian arrays read with ``np.memmap``: nothing is unpickled and nothing is loaded
into memory until a sample is read. A split directory only exists once complete: the
writer fills a hidden temp directory, fsyncs it and renames it into place.

What is served is checked, not trusted: opening a split checks its index (offsets start at
0, never go back, end at the length of ``tokens.bin``; :func:`check_offsets`) and
:func:`check_split`, which a run calls on every split it reads before its first step,
scans every token id against the model's vocabulary and every role id against ``ROLES``
(vectorised over the memory maps, :func:`first_out_of_range`: 0.02-0.04 s for 100M
tokens from the page cache, 0.5 s from disk), never the metadata's ``max_token_id``
alone, which an edited ``tokens.bin`` no longer matches.  Each failure is one line naming
the file, the first bad index and its value.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from oasst_jax import atomic_files
from oasst_jax.turns import ROLES, DataError

FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
ROLES_FILE = "roles.bin"
OFFSETS_FILE = "offsets.bin"
EXAMPLES_FILE = "examples.bin"  # ranked splits only
LAYOUTS = ("sft", "ranked")  # metadata "layout"; absent = "sft"
METADATA_FILE = "metadata.json"
UINT16_LIMIT = 65500  # upstream's threshold (Megatron indexed dataset best_fitting_dtype)
SCAN_CHUNK = 1 << 22  # items per vectorised pass of a scan: small temporaries, cache-sized


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id."""
    return np.dtype("<u2") if vocab_size < UINT16_LIMIT else np.dtype("<u4")


def split_path(output_dir: str | os.PathLike, prefix: str, split: str) -> Path:
    """``{output_dir}/{prefix}-{split}``, the directory of one split."""
    return Path(output_dir) / f"{prefix}-{split}"


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What the metadata records about the tokenizer (compared by :func:`check_tokenizer`)."""
    return {
        "sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "base_vocab_size": tokenizer.base_vocab_size,
        "special_ids": tokenizer.special_ids(),
        "megatron_new_tokens": tokenizer.megatron_new_tokens,
        "model_path": tokenizer.model_path,
    }


class StagedWriter(abc.ABC):
    """Base of the split writers: nothing they write counts until ``commit``, and leaving
    the ``with`` block without committing (an exception, a run stopped early) calls
    ``abort``, which removes what was written, so a failed run never leaves a half split.
    ``prepare(metadata)`` writes everything (data flushed, indexes, metadata) under the
    temporary names, so ``commit`` only renames: a caller that prepares every writer
    before it commits any meets a full disk while the previous output is still whole.
    Subclasses count ``_num_samples`` and set ``_done`` in ``commit`` and ``abort``."""

    _done = False
    _num_samples = 0
    _meta: dict[str, Any] | None = None  # set by prepare

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()

    @property
    def num_samples(self) -> int:
        return self._num_samples

    @abc.abstractmethod
    def abort(self) -> None:
        """Remove everything written so far."""


def close_quietly(f: Any) -> None:
    """Close ``f`` during an abort: the error that caused the abort is the one to report,
    not a second one from flushing the buffer onto the same full disk."""
    with contextlib.suppress(OSError):
        f.close()


class ShardWriter(StagedWriter):
    """Streams samples of one split into a hidden temp dir; :meth:`commit` moves it into place.

    Use as a context manager: leaving the block without :meth:`commit` (an exception, or a
    forgotten commit) deletes the temp dir, so a failed run leaves nothing that looks done.
    """

    def __init__(self, path: str | os.PathLike, *, vocab_size: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._vocab_size = vocab_size
        self._dtype = token_dtype(vocab_size)
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._tmp.mkdir()
        try:
            self._tokens = open(self._tmp / TOKENS_FILE, "wb")
            self._roles = open(self._tmp / ROLES_FILE, "wb")
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self._offsets = [np.zeros(1, dtype=np.int64)]
        self._num_tokens = 0
        self._num_samples = 0
        self._max_token_id = -1
        self._done = False

    def add(self, tokens: np.ndarray, roles: np.ndarray) -> None:
        """Append one sample."""
        tokens = np.asarray(tokens)
        self.add_batch(tokens, roles, np.array([tokens.size], dtype=np.int64))

    def add_batch(self, tokens: np.ndarray, roles: np.ndarray, lengths: np.ndarray) -> None:
        """Append samples given as concatenated tokens/roles and their lengths."""
        tokens, roles, lengths = np.asarray(tokens), np.asarray(roles), np.asarray(lengths)
        if tokens.shape != roles.shape or tokens.ndim != 1 or int(lengths.sum()) != tokens.size:
            raise ValueError("tokens, roles and lengths are not aligned")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self._vocab_size):
            raise ValueError(f"token id out of range for vocab_size {self._vocab_size}")
        if tokens.size:
            self._max_token_id = max(self._max_token_id, int(tokens.max()))
        self._tokens.write(tokens.astype(self._dtype, copy=False).tobytes())
        self._roles.write(roles.astype(np.uint8, copy=False).tobytes())
        self._offsets.append(self._num_tokens + np.cumsum(lengths, dtype=np.int64))
        self._num_tokens += tokens.size
        self._num_samples += lengths.size

    def prepare(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """Write the rest into the temp dir (data flushed, index, metadata; fsynced)."""
        for f in (self._tokens, self._roles):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        offsets = np.concatenate(self._offsets)
        with open(self._tmp / OFFSETS_FILE, "wb") as f:
            f.write(offsets.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._meta = {
            "format_version": FORMAT_VERSION,
            "num_samples": self._num_samples,
            "num_tokens": self._num_tokens,
            "token_dtype": self._dtype.str,
            "max_token_id": self._max_token_id,  # -1: no tokens
            **metadata,
        }
        atomic_files.write_json(self._tmp / METADATA_FILE, self._meta, indent=2)
        return self._meta

    def commit(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish (:meth:`prepare`, unless done) and atomically replace ``path``."""
        meta = self._meta if self._meta is not None else self.prepare(metadata or {})
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.path, old)
        os.rename(self._tmp, self.path)
        atomic_files.fsync_path(str(self.path.parent))
        if old is not None:
            shutil.rmtree(old)
        self._done = True
        return meta

    def abort(self) -> None:
        """Drop everything written so far, whatever closing the files says (on a full disk
        a close fails flushing its buffer; the temporary directory goes all the same)."""
        for f in (self._tokens, self._roles):
            close_quietly(f)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._done = True


class RankedShardWriter(ShardWriter):
    """A :class:`ShardWriter` of rm examples (module doc): each example's prefix and
    replies are appended as samples and ``examples.bin`` groups them."""

    def __init__(self, path: str | os.PathLike, *, vocab_size: int):
        super().__init__(path, vocab_size=vocab_size)
        self._examples = [0]

    def add_example(self, pieces: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Append one example: ``(tokens, roles)`` of its prefix, then of each reply."""
        if len(pieces) < 3:
            raise ValueError("an rm example is a prefix and at least two replies")
        tokens = np.concatenate([np.asarray(t) for t, _ in pieces])
        roles = np.concatenate([np.asarray(r) for _, r in pieces])
        self.add_batch(tokens, roles, np.array([len(t) for t, _ in pieces], dtype=np.int64))
        self._examples.append(self._num_samples)

    @property
    def num_examples(self) -> int:
        return len(self._examples) - 1

    def prepare(self, metadata: dict[str, Any]) -> dict[str, Any]:
        with open(self._tmp / EXAMPLES_FILE, "wb") as f:
            f.write(np.asarray(self._examples, dtype="<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        return super().prepare({"layout": "ranked", "num_examples": self.num_examples, **metadata})


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``metadata.json`` of a split or output directory; one-line DataError when absent."""
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        raise DataError(f"{path} has no {METADATA_FILE}: not a finished pretokenizer output")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: shard format version {meta.get('format_version')} is not "
            f"{FORMAT_VERSION}; re-run pretokenize"
        )
    return meta


def check_tokenizer(path: str | os.PathLike, tokenizer: Any) -> None:
    """Refuse a split made with a different tokenizer.

    Compares the sha256 of the model bytes + extra-token layout, so the released
    checkpoint's 32007-token layout and the compact 32002 one are told apart too.
    """
    check_tokenizer_metadata(path, read_metadata(path), tokenizer)


def check_tokenizer_metadata(path: str | os.PathLike, meta: dict[str, Any], tokenizer: Any) -> None:
    """:func:`check_tokenizer` on metadata already read (also a Megatron split's)."""
    made = meta.get("tokenizer")
    if not made:
        raise DataError(f"{path}: metadata records no tokenizer; re-run pretokenize")
    if made["sha256"] != tokenizer.sha256:
        raise DataError(
            f"{path} was pretokenized with another tokenizer (sha256 {made['sha256'][:12]}, "
            f"vocab {made['vocab_size']}) than {tokenizer.model_path} (sha256 "
            f"{tokenizer.sha256[:12]}, vocab {tokenizer.vocab_size}); re-run pretokenize"
        )


def first_out_of_range(values: np.ndarray, high: int) -> tuple[int, int] | None:
    """``(index, value)`` of the first element of ``values`` outside ``[0, high)``, or None.

    Vectorised a chunk at a time (``min``/``max`` per chunk; the index is searched only in
    a chunk that holds a bad value), so a memory-mapped split of 100M tokens is scanned
    at memory speed without a temporary of its size."""
    signed = values.dtype.kind == "i"
    for start in range(0, values.size, SCAN_CHUNK):
        chunk = values[start : start + SCAN_CHUNK]
        if int(chunk.max()) >= high or (signed and int(chunk.min()) < 0):
            bad = (chunk >= high) | (chunk < 0) if signed else chunk >= high
            i = int(np.argmax(bad))
            return start + i, int(chunk[i])
    return None


def check_ids(
    file: str | os.PathLike,
    values: np.ndarray,
    high: int,
    what: str,
    why: str,
    fix: str = "re-run pretokenize",
) -> None:
    """One-line DataError naming ``file``, the first ``what`` outside ``[0, high)`` and its
    index: ``{file} holds {what} {value} {why}, first at index {i}; {fix}``."""
    bad = first_out_of_range(values, high)
    if bad is not None:
        raise DataError(f"{file} holds {what} {bad[1]} {why}, first at index {bad[0]}; {fix}")


def check_offsets(file: str | os.PathLike, offsets: np.ndarray, end: int, unit: str) -> None:
    """A sample index ``offsets`` (``int64[n + 1]``) must start at 0, never decrease and
    end at ``end`` (the data file's length in ``unit``s), so every sample is a
    non-negative slice inside the file; else one line naming the first bad index."""
    offsets = np.asarray(offsets)
    if offsets.size == 0 or int(offsets[0]) != 0:
        first = int(offsets[0]) if offsets.size else "missing"
        raise DataError(f"{file}: offset 0 is {first}, not 0; re-run pretokenize")
    past = np.flatnonzero(offsets > end)
    if past.size:
        i = int(past[0])
        raise DataError(
            f"{file}: offset {i} is {int(offsets[i])}, past the end of the data ({end} "
            f"{unit}); re-run pretokenize"
        )
    back = np.flatnonzero(np.diff(offsets) < 0)
    if back.size:
        i = int(back[0]) + 1
        raise DataError(
            f"{file}: offset {i} is {int(offsets[i])}, below offset {i - 1} "
            f"({int(offsets[i - 1])}): sample {i - 1} would have a negative length; "
            "re-run pretokenize"
        )
    if int(offsets[-1]) != end:
        raise DataError(
            f"{file}: the last offset ({offsets.size - 1}) is {int(offsets[-1])}, but the "
            f"data holds {end} {unit}; re-run pretokenize"
        )


def check_split(path: str | os.PathLike, vocab_size: int, tokenizer: Any = None) -> None:
    """Refuse a split a model of ``vocab_size`` ids cannot train on: missing, empty,
    damaged (index, role ids), holding a token id >= ``vocab_size`` (a scan of
    ``tokens.bin`` itself), or (given ``tokenizer``) made with another one."""
    meta = read_metadata(path)
    if tokenizer is not None:
        check_tokenizer_metadata(path, meta, tokenizer)
    _check_not_empty(path, meta)
    tokens, roles, _ = map_split(Path(path), meta)
    check_contents(Path(path) / TOKENS_FILE, tokens, Path(path) / ROLES_FILE, roles, vocab_size)


def check_contents(
    tokens_file: Path, tokens: np.ndarray, roles_file: Path, roles: np.ndarray, vocab_size: int
) -> None:
    """Every token id below ``vocab_size`` and every role id a role (``ROLES``), in either
    format; else one line naming the file, the first bad index and its value."""
    why = f"but the model has only {vocab_size} ids (model.vocab_size)"
    fix = "pretokenize with the model's tokenizer"
    check_ids(tokens_file, tokens, vocab_size, "token id", why, fix)
    check_ids(roles_file, roles, len(ROLES), "role id", f"but the roles are {ROLES}")


def _check_not_empty(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    if int(meta["num_samples"]) == 0:
        raise DataError(f"{path} is an empty split (0 samples); nothing to train or evaluate on")


def _check_layout(path: str | os.PathLike, meta: dict[str, Any], layout: str) -> None:
    found = meta.get("layout", "sft")
    if found != layout:
        hint = {"ranked": "rm examples (datasets.oasst_export.mode=rm)", "sft": "sft samples"}
        raise DataError(
            f"{path} holds {hint.get(found, repr(found))} (layout {found!r}), not the "
            f"{layout!r} layout this reader takes"
        )


class ShardDataSource:
    """A split as a grain ``RandomAccessDataSource``: ``len`` and ``[i]`` over samples.

    ``source[i]`` is ``{"tokens": int32[n], "roles": uint8[n]}``. Files are memory-mapped
    (and the index checked) when the split is opened and again on first access in each
    process that unpickles it; pickling carries only the path (grain workers).
    An empty split is refused: no sampler can draw from it, and so is a ranked split
    (``layout`` names the layout a subclass reads).
    """

    layout = "sft"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        _check_layout(self.path, self.metadata, self.layout)
        _check_not_empty(self.path, self.metadata)
        self._len = int(self.metadata["num_samples"])
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._open()  # the index is checked when the split is opened, not at a later step

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "metadata": self.metadata}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.metadata = state["metadata"]
        self._len = int(self.metadata["num_samples"])
        self._arrays = None

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"ShardDataSource({str(self.path)!r}, num_samples={self._len})"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"sample {index} out of range for {self._len} samples")
        tokens, roles, offsets = self._open()
        start, end = int(offsets[index]), int(offsets[index + 1])
        return {
            "tokens": tokens[start:end].astype(np.int32),
            "roles": np.array(roles[start:end], dtype=np.uint8),
        }

    def lengths(self) -> np.ndarray:
        """Tokens per sample (int64), e.g. for packing plans; reads only the index."""
        return np.diff(self._open()[2])

    def _open(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = map_split(self.path, self.metadata)
        return self._arrays


class _RankedPieces(ShardDataSource):
    """The samples (prefixes and replies) of a ranked split."""

    layout = "ranked"


class RankedDataSource:
    """A ranked split (module doc) as a random-access source of rm examples:
    ``source[i]`` is ``{"prefix_tokens": int32[n], "prefix_roles": uint8[n],
    "reply_tokens": [int32[m_k]], "reply_roles": [uint8[m_k]]}``, replies best first."""

    def __init__(self, path: str | os.PathLike):
        self.pieces = _RankedPieces(path)
        self.path = self.pieces.path
        self._len = int(self.pieces.metadata["num_examples"])
        self._examples: np.ndarray | None = None
        self.examples()  # checked when the split is opened

    def __getstate__(self) -> dict[str, Any]:
        return {"pieces": self.pieces, "path": self.path, "_len": self._len, "_examples": None}

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"RankedDataSource({str(self.path)!r}, num_examples={self._len})"

    def examples(self) -> np.ndarray:
        """``int64[num_examples + 1]``: example ``i`` is samples ``[e[i], e[i+1])``."""
        if self._examples is None:
            file = self.path / EXAMPLES_FILE
            examples = _memmap(file, np.dtype("<i8"), self._len + 1)
            check_offsets(file, examples, len(self.pieces), "samples in the split")
            short = np.flatnonzero(np.diff(examples) < 3)
            if short.size:
                i = int(short[0])
                raise DataError(
                    f"{file}: example {i} has {int(examples[i + 1] - examples[i])} samples, "
                    "not a prefix and at least two replies; re-run pretokenize"
                )
            self._examples = examples
        return self._examples

    def num_replies(self) -> np.ndarray:
        """Replies per example (int64)."""
        return np.diff(self.examples()) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"example {index} out of range for {self._len} examples")
        start, end = (int(i) for i in self.examples()[index : index + 2])
        prefix = self.pieces[start]
        replies = [self.pieces[i] for i in range(start + 1, end)]
        return {
            "prefix_tokens": prefix["tokens"],
            "prefix_roles": prefix["roles"],
            "reply_tokens": [r["tokens"] for r in replies],
            "reply_roles": [r["roles"] for r in replies],
        }


def map_split(path: Path, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, roles, offsets)`` of a split, memory-mapped, the files' sizes and the
    index checked (:func:`check_offsets`)."""
    n_tok, n = int(meta["num_tokens"]), int(meta["num_samples"])
    offsets = _memmap(path / OFFSETS_FILE, np.dtype("<i8"), n + 1)
    tokens = _memmap(path / TOKENS_FILE, np.dtype(meta["token_dtype"]), n_tok)
    roles = _memmap(path / ROLES_FILE, np.dtype(np.uint8), n_tok)
    check_offsets(path / OFFSETS_FILE, offsets, n_tok, f"tokens in {TOKENS_FILE}")
    return tokens, roles, offsets


def _memmap(file: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """Read-only map of exactly ``count`` items (missing or mis-sized: a damaged split)."""
    if not file.is_file() or file.stat().st_size != count * dtype.itemsize:
        raise DataError(f"{file} has the wrong size for {count} items; re-run pretokenize")
    if count == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r", shape=(count,))
