"""File-format readers shared by the dataset loaders (:mod:`oasst_jax.data`) and the
tokenizer trainer: JSON, JSON lines (optionally gzip), parquet, and JSON lines inside a tar.gz.

The upstream datasets ship in several formats (Hugging Face hub files are .json, .jsonl
or .parquet; the Open-Assistant export is a .jsonl.gz, possibly inside a tar.gz).  These
readers stream where the format allows it and count unreadable lines into a ``skipped``
counter instead of raising, so one bad line never aborts a pretokenizer run.

A JSON line is read with a bounded ``readline``: a line longer than ``max_bytes`` (default
:data:`MAX_RECORD_BYTES`) is never held whole, it is read past in chunks and counted as
``oversize_record``.  16 MiB is ~100x the largest record of the card's datasets (an
Open-Assistant message tree is well under 1 MiB) and bounds what one hostile line costs:
~2x the cap to read it (``readline`` copies once), a small multiple of it to parse it.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Any

import ijson

from oasst_jax.turns import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
MAX_RECORD_BYTES = 16 * 2**20
_SKIP_CHUNK = 2**20  # bytes read at a time when reading past an oversize line
CORRUPT_STREAM_ERRORS = (OSError, EOFError, zlib.error)  # truncated/corrupt gzip or file
_ARRAY_BUFFER = 2**16  # bytes the JSON-array parser reads at a time
_OPEN_EVENTS = frozenset({"start_map", "start_array"})
_CLOSE_EVENTS = frozenset({"end_map", "end_array"})
_SCALAR_EVENTS = frozenset({"null", "boolean", "integer", "double", "number", "string"})


def require_path(path: Any, what: str) -> Path:
    """Return ``path`` as an existing :class:`Path`, or raise :class:`DataError` naming it."""
    if path is None or path == "":
        raise DataError(f"{what}: no input path configured")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"{what}: input not found: {resolved}")
    return resolved


def iter_lines(
    stream: IO[bytes], skipped: collections.Counter, max_bytes: int = MAX_RECORD_BYTES
) -> Iterator[bytes]:
    """The lines of a binary stream, none longer than ``max_bytes`` (newline excluded).

    A longer line is read past ``_SKIP_CHUNK`` bytes at a time, so memory stays within
    ~2x ``max_bytes`` whatever the input, and counted as ``oversize_record``.
    """
    while line := stream.readline(max_bytes + 1):
        if len(line) <= max_bytes or line.endswith(b"\n"):
            yield line
            continue
        skipped["oversize_record"] += 1
        while line and not line.endswith(b"\n"):
            line = stream.readline(_SKIP_CHUNK)


def record_limit(options: Mapping[str, Any]) -> int:
    """A loader's ``max_record_bytes`` option (default :data:`MAX_RECORD_BYTES`)."""
    value = options.get("max_record_bytes")
    if value is None:
        return MAX_RECORD_BYTES
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"max_record_bytes must be a positive int, got {value!r}")
    return value


def parse_json_lines(
    stream: IO[bytes],
    skipped: collections.Counter,
    source: Path,
    max_bytes: int = MAX_RECORD_BYTES,
) -> Iterator[dict]:
    """Yield one dict per non-blank JSON line; undecodable or non-object lines count as
    ``bad_json`` (upstream would crash on them), lines over ``max_bytes`` as
    ``oversize_record``.  A corrupt or truncated compressed stream cannot be
    resynchronised, so it is a :class:`DataError` naming ``source``."""
    try:
        yield from _parse_lines(iter_lines(stream, skipped, max_bytes), skipped)
    except CORRUPT_STREAM_ERRORS as e:
        raise DataError(f"{source}: corrupt or truncated file ({e})") from None


def _parse_lines(lines: Iterable[bytes], skipped: collections.Counter) -> Iterator[dict]:
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, nesting
            skipped["bad_json"] += 1
            continue
        if not isinstance(record, dict):
            skipped["bad_json"] += 1
            continue
        yield record


def _open_binary(path: Path) -> IO[bytes]:
    """Open ``path`` for binary reading, transparently un-gzipping a ``.gz`` name (as the
    Open-Assistant ``read_oasst_jsonl`` does)."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _read_json_file(path: Path, skipped: collections.Counter, max_bytes: int) -> Iterator[dict]:
    """A ``.json`` file is either one JSON array of records or JSON lines: the Hugging Face
    ``json`` builder accepts both, so we sniff the first non-blank byte.  An array is
    streamed element by element (:func:`iter_json_array`), never read whole."""
    try:
        with _open_binary(path) as f:
            head = f.read(4096).lstrip()
    except CORRUPT_STREAM_ERRORS as e:
        raise DataError(f"{path}: corrupt or truncated file ({e})") from None
    with _open_binary(path) as f:
        if head.startswith(b"["):
            yield from iter_json_array(f, skipped, path, max_bytes)
        else:
            yield from parse_json_lines(f, skipped, path, max_bytes)


class _CountingReader:
    """A binary stream that counts the bytes the parser has read from it."""

    def __init__(self, stream: IO[bytes]):
        self._stream = stream
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.read_bytes += len(data)
        return data


def iter_json_array(
    stream: IO[bytes],
    skipped: collections.Counter,
    source: Path,
    max_bytes: int = MAX_RECORD_BYTES,
) -> Iterator[dict]:
    """Yield the objects of a top-level JSON array, streamed with ``ijson`` (events from
    its C parser, objects built by its ``ObjectBuilder``): memory holds one element, never
    the file.  Elements that are not objects count as ``bad_json``; an element for which
    the parser has to read more than ``max_bytes`` (+ one read buffer, ``_ARRAY_BUFFER``)
    counts as ``oversize_record`` and is dropped as soon as that shows, so it is never held
    whole (one string longer than the cap is, once, by the parser).  Invalid JSON, such as
    a truncated element, cannot be resynchronised: a :class:`DataError` naming ``source``
    and the element."""
    reader = _CountingReader(stream)
    events = ijson.basic_parse(reader, buf_size=_ARRAY_BUFFER, use_float=True)
    index, depth, start, builder = 0, 0, 0, None
    oversize = False
    try:
        for event, value in events:
            if depth <= 1 and event in _SCALAR_EVENTS:  # a scalar element (or document)
                skipped["bad_json"] += 1
                index += 1
                continue
            if event in _OPEN_EVENTS:
                depth += 1
                if depth == 2:  # an element begins
                    start, oversize = reader.read_bytes, False
                    builder = ijson.ObjectBuilder()
            elif event in _CLOSE_EVENTS:
                depth -= 1
            if depth == 1 and event in _OPEN_EVENTS:
                continue  # the array itself
            if builder is not None:
                if reader.read_bytes - start > max_bytes + _ARRAY_BUFFER:
                    builder, oversize = None, True
                else:
                    builder.event(event, value)
            if depth == 1 and event in _CLOSE_EVENTS:  # the element is complete
                if oversize:
                    skipped["oversize_record"] += 1
                elif isinstance(builder.value, dict):
                    yield builder.value
                else:
                    skipped["bad_json"] += 1
                builder, index = None, index + 1
    except ijson.JSONError as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{source}: invalid or truncated JSON in array element {index} ({why})"
        ) from None
    except CORRUPT_STREAM_ERRORS as e:
        raise DataError(f"{source}: corrupt or truncated file ({e})") from None


def iter_parquet_rows(source: Path | IO[bytes], name: Any) -> Iterator[dict]:
    """Stream the rows of a parquet file (path or seekable binary stream) batch by batch;
    an unreadable file is a :class:`DataError` naming ``name`` (pyarrow's does not)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{name}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        for batch in pq.ParquetFile(source).iter_batches():
            yield from batch.to_pylist()
    except (pa.ArrowException, *CORRUPT_STREAM_ERRORS) as e:
        raise DataError(f"{name}: not a readable parquet file ({e})") from None


def read_records(
    path: Path, skipped: collections.Counter, max_bytes: int = MAX_RECORD_BYTES
) -> Iterator[dict]:
    """Yield the records of a .json / .json.gz / .jsonl / .jsonl.gz / .parquet file;
    JSON lines over ``max_bytes`` are skipped as ``oversize_record``."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from iter_parquet_rows(path, path)
    elif name.endswith(JSONL_SUFFIXES):
        with _open_binary(path) as f:
            yield from parse_json_lines(f, skipped, path, max_bytes)
    elif name.endswith((".json", ".json.gz")):
        yield from _read_json_file(path, skipped, max_bytes)
    else:
        raise DataError(f"{path}: unsupported file type (expected .json, .jsonl[.gz], .parquet)")


def check_tar_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse a tar member that could escape an extraction directory or is not plain data:
    absolute paths, ``..`` components, links and device/fifo entries (CVE-2007-4559 class).
    We never extract to disk, but an archive holding such members is not a clean export."""
    parts = member.name.replace("\\", "/").split("/")
    if parts[0] == "" or re.match(r"^[A-Za-z]:", member.name):
        raise DataError(f"{archive}: refusing tar member with absolute path: {member.name!r}")
    if ".." in parts:
        raise DataError(f"{archive}: refusing tar member with '..' in its path: {member.name!r}")
    if member.issym() or member.islnk():
        raise DataError(f"{archive}: refusing link tar member: {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: refusing special (device/fifo) tar member: {member.name!r}")


def _select_jsonl_member(members: list[tarfile.TarInfo], archive: Path) -> tarfile.TarInfo:
    """Pick the one JSON-lines member of an export archive.  If an archive holds several
    (Open-Assistant publishes ``*.trees.jsonl.gz`` beside ``*.messages.jsonl.gz``), the
    ``trees`` file is the one holding message trees."""
    candidates = [m for m in members if m.isfile() and m.name.lower().endswith(JSONL_SUFFIXES)]
    trees = [m for m in candidates if ".trees." in PurePosixPath(m.name).name.lower()]
    if len(candidates) > 1 and trees:
        candidates = trees
    if len(candidates) != 1:
        names = [m.name for m in candidates] or "none"
        raise DataError(f"{archive}: expected exactly one .jsonl[.gz] member, found {names}")
    return candidates[0]


def iter_tar_jsonl(
    archive: Path, skipped: collections.Counter, max_bytes: int = MAX_RECORD_BYTES
) -> Iterator[dict]:
    """Stream the JSON lines of the single jsonl(.gz) member of a tar archive, in memory.

    Every member is checked with :func:`check_tar_member` before anything is read.
    """
    try:
        tar = tarfile.open(archive, "r:*")
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{archive}: not a readable tar archive ({e})") from None
    with tar:
        for member in members:
            check_tar_member(member, archive)
        member = _select_jsonl_member(members, archive)
        raw = tar.extractfile(member)
        assert raw is not None  # regular file, checked above
        with raw:
            stream = gzip.GzipFile(fileobj=raw) if member.name.lower().endswith(".gz") else raw
            yield from parse_json_lines(stream, skipped, archive, max_bytes)


def iter_jsonl_input(
    path: Path, skipped: collections.Counter, max_bytes: int = MAX_RECORD_BYTES
) -> Iterator[dict]:
    """Records of an export given as ``.tar.gz``/``.tar``, ``.jsonl.gz`` or ``.jsonl``."""
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        yield from iter_tar_jsonl(path, skipped, max_bytes)
    elif name.endswith(JSONL_SUFFIXES):
        with _open_binary(path) as f:
            yield from parse_json_lines(f, skipped, path, max_bytes)
    else:
        raise DataError(f"{path}: unsupported export file (expected .tar.gz, .jsonl.gz, .jsonl)")
