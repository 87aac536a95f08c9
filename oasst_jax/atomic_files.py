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
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

# A full disk, an exhausted quota, a filesystem mounted read-only: nothing a retry fixes,
# so a write that meets one stops with one line naming the path and what was kept.
OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def out_of_space(error: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT / EROFS ``OSError`` in ``error``'s cause chain, or one made from
    its text (tensorstore reports the errno as text in a ``ValueError``, orbax wraps it),
    or None."""
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in seen:
        if isinstance(e, OSError) and e.errno in OUT_OF_SPACE:
            return e
        for code in OUT_OF_SPACE:
            if os.strerror(code) in str(e):
                return OSError(code, os.strerror(code))
        seen.append(e)
        e = e.__cause__ or e.__context__
    return None


class SpaceError(OSError):
    """A write that met a full disk, said in one line (:func:`space_error`); ``path`` and
    ``kept`` say where and what is left, for an outer handler to add what it knows."""

    path: str = ""
    kept: str = ""


def space_error(path: str | os.PathLike, error: OSError, kept: str) -> SpaceError:
    """One line for a write that met a full disk: ``[Errno 28] No space left on device
    writing PATH; KEPT; free space and run again``, errno kept (so callers can classify)."""
    e = SpaceError(
        error.errno,
        f"{os.strerror(error.errno)} writing {os.fspath(path)}; {kept}; free space (or make "
        "it writable) and run again",
    )
    e.path, e.kept = os.fspath(path), kept
    return e


def _kept(path: str) -> str:
    return f"the previous {path} is unchanged" if os.path.lexists(path) else "nothing was written"


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


def _umask() -> int:
    """The process umask, read without changing it (Linux: ``/proc/self/status``; setting
    and restoring it would race with files other threads, orbax's writers, create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(path: str) -> None:
    """Give a regular file the mode ``open()`` gives a new one (``0o666 & ~umask``, 0644
    usually): some writers create theirs private (safetensors' ``save_file``: 0600), and
    every file a command writes should read alike."""
    if os.path.isfile(path) and not os.path.islink(path):
        os.chmod(path, 0o666 & ~_umask())


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

    The temporary does not exist yet (the writer creates it); it gets the usual mode
    (:func:`usual_mode`) before the rename; the directory is checked up front.
    """
    path = os.fspath(path)
    check_writable_dir(path)
    tmp = _hidden_sibling(path, "tmp")
    try:
        yield tmp
        usual_mode(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        full = out_of_space(e)
        if full is not None and not isinstance(e, SpaceError):
            raise space_error(path, full, _kept(path)) from e
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

    Every file in it gets the usual mode (:func:`usual_mode`) and is fsynced, then an
    existing ``path`` is renamed aside, the new directory renamed into place, and the
    old one removed.  On an exception the new directory is removed and ``path`` is
    untouched.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _hidden_sibling(path, "tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        for root, _, names in os.walk(tmp):
            for name in names:
                usual_mode(os.path.join(root, name))
                fsync_path(os.path.join(root, name))
            fsync_path(root)
        _swap_in(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = out_of_space(e)
        if full is not None and not isinstance(e, SpaceError):
            raise space_error(path, full, _kept(path)) from e
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
