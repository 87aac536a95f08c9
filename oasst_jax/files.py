"""Atomic file writes: a file or directory appears complete under its name, or not at all.

A writer fills a hidden temporary beside the target (same directory, so the final
rename stays on one filesystem and is atomic), fsyncs it and renames it into
place.  On an exception the temporary is removed and whatever was at the target
before is left exactly as it was, so a failed or interrupted run never leaves a
truncated report or a half-overwritten export behind.

    with atomic_path("report.json") as tmp:      # any writer that takes a path
        save(tmp)
    write_json("config.json", obj)               # the common case
    with atomic_dir("export") as tmp:            # a whole directory, swapped in at the end
        write_everything_into(tmp)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any


def _hidden_sibling(path: str, kind: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{kind}-{uuid.uuid4().hex[:8]}")


def fsync_path(path: str) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable_dir(path: str) -> None:
    """``FileNotFoundError``/``PermissionError`` now, naming ``path``'s directory, rather
    than after the work whose result was to be written there."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory (to write {path})")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{directory}: not writable (to write {path})")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``.

    The temporary does not exist yet (the writer creates it, with the usual
    permissions); the directory is checked up front.
    """
    path = os.fspath(path)
    check_writable_dir(path)
    tmp = _hidden_sibling(path, "tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_path(os.path.dirname(os.path.abspath(path)))


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """``json.dump(obj, **dump_kwargs)`` plus a final newline, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, **dump_kwargs)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a new empty directory beside ``path``; on success it replaces ``path``.

    Every file in it is fsynced, then an existing ``path`` is renamed aside, the
    new directory renamed into place, and the old one removed.  On an exception
    the new directory is removed and ``path`` is untouched.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _hidden_sibling(path, "tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        for root, _, names in os.walk(tmp):
            for name in names:
                fsync_path(os.path.join(root, name))
            fsync_path(root)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: str, path: str) -> None:
    old = None
    if os.path.lexists(path):
        old = _hidden_sibling(path, "old")
        os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    fsync_path(os.path.dirname(path))
    if old is None:
        return
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    else:
        os.remove(old)
