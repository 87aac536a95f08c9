"""File-format readers shared by the dataset loaders: JSON, JSON lines (optionally gzip),
parquet, and JSON lines inside a tar.gz.

The upstream datasets ship in several formats (Hugging Face hub files are .json, .jsonl
or .parquet; the Open-Assistant export is a .jsonl.gz, possibly inside a tar.gz).  These
readers stream where the format allows it and count unreadable lines into a ``skipped``
counter instead of raising, so one bad line never aborts a pretokenizer run.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from oasst_jax.data.conversation import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def require_path(path: Any, what: str) -> Path:
    """Return ``path`` as an existing :class:`Path`, or raise :class:`DataError` naming it."""
    if path is None or path == "":
        raise DataError(f"{what}: no input path configured")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"{what}: input not found: {resolved}")
    return resolved


def parse_json_lines(
    lines: Iterable[bytes], skipped: collections.Counter, source: Path
) -> Iterator[dict]:
    """Yield one dict per non-blank JSON line; undecodable or non-object lines count as
    ``bad_json`` (upstream would crash on them).  A corrupt or truncated compressed stream
    cannot be resynchronised, so it is a :class:`DataError` naming ``source``."""
    try:
        yield from _parse_lines(lines, skipped)
    except (OSError, EOFError, zlib.error) as e:
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


def _read_json_file(path: Path, skipped: collections.Counter) -> Iterator[dict]:
    """A ``.json`` file is either one JSON array of records or JSON lines: the Hugging Face
    ``json`` builder accepts both, so we sniff the first non-blank byte."""
    with _open_binary(path) as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        with _open_binary(path) as f:
            yield from parse_json_lines(f, skipped, path)
        return
    with _open_binary(path) as f:
        try:
            records = json.load(f)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
    for record in records:
        if isinstance(record, dict):
            yield record
        else:
            skipped["bad_json"] += 1


def _read_parquet(path: Path) -> Iterator[dict]:
    """Stream a parquet file batch by batch; pyarrow is imported only when needed."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    for batch in pq.ParquetFile(path).iter_batches():
        yield from batch.to_pylist()


def read_records(path: Path, skipped: collections.Counter) -> Iterator[dict]:
    """Yield the records of a .json / .json.gz / .jsonl / .jsonl.gz / .parquet file."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _read_parquet(path)
    elif name.endswith(JSONL_SUFFIXES):
        with _open_binary(path) as f:
            yield from parse_json_lines(f, skipped, path)
    elif name.endswith((".json", ".json.gz")):
        yield from _read_json_file(path, skipped)
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


def iter_tar_jsonl(archive: Path, skipped: collections.Counter) -> Iterator[dict]:
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
            yield from parse_json_lines(stream, skipped, archive)


def iter_jsonl_input(path: Path, skipped: collections.Counter) -> Iterator[dict]:
    """Records of an export given as ``.tar.gz``/``.tar``, ``.jsonl.gz`` or ``.jsonl``."""
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        yield from iter_tar_jsonl(path, skipped)
    elif name.endswith(JSONL_SUFFIXES):
        with _open_binary(path) as f:
            yield from parse_json_lines(f, skipped, path)
    else:
        raise DataError(f"{path}: unsupported export file (expected .tar.gz, .jsonl.gz, .jsonl)")
