"""A local path or a Hugging Face hub id -> local files, through the standard HF cache.

Upstream names its inputs by hub id (the datasets of ``custom_datasets``, the base model
``meta-llama/Llama-2-70b-hf``), and users keep them in the Hugging Face cache.  This module is
the one place that turns such a name into local files.  It calls ``huggingface_hub``'s
``snapshot_download`` without a cache directory or token of its own, so the library's
settings apply unchanged: ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache lives), ``HF_TOKEN``
(or ``hf auth login``), ``HF_HUB_OFFLINE=1`` (the cache only, no network), ``HF_ENDPOINT``.
Files already cached are not downloaded again.

A path that exists on disk always wins over a hub id of the same spelling.  Every failure is
one :class:`~oasst_jax.turns.DataError` line naming the setting, the repository and what to
do: a repository that does not exist, a gated one without an accepted token (the line names
``HF_TOKEN``), an offline cache without the file, a file the repository does not hold.
Nothing but the library's own cache is ever written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oasst_jax.turns import DataError

# ``org/name``: a hub repository id (letters, digits, ``-``, ``_``, ``.``; no ``..``).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_URL = "https://huggingface.co"


def is_repo_id(value: str) -> bool:
    """Whether ``value`` is spelt as a hub repository id (``org/name``); a path with more or
    fewer components, or starting with ``/``, ``.`` or ``~``, is not."""
    return bool(_REPO_ID.fullmatch(value)) and ".." not in value


def fetch(
    repo_id: str,
    patterns: str | Sequence[str],
    *,
    what: str,
    repo_type: str = "dataset",
    revision: str | None = None,
    optional: Sequence[str] = (),
) -> tuple[Path, list[Path]]:
    """``(snapshot directory, files)`` of the hub repository ``repo_id``.

    ``files`` are those matching each of ``patterns`` (a path in the repository, or a glob
    such as ``data/*.parquet``), in pattern order, each pattern's matches sorted; every
    pattern must match.  Files matching ``optional`` are fetched too when the repository
    has them.  ``what`` names the setting in error lines."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise DataError(f"{what}: data_files must name files of {repo_id}, got {patterns!r}")
    try:
        import huggingface_hub as hf
        from huggingface_hub import errors
    except ImportError:
        raise DataError(
            f"{what}: {repo_id} is a hub id; reading it needs huggingface_hub "
            "(pip install huggingface_hub)"
        ) from None
    where = f"{what}: {repo_id}"
    try:
        root = hf.snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            allow_patterns=[*patterns, *optional],
        )
    except errors.GatedRepoError:
        raise DataError(_gated(where, _repo_url(repo_id, repo_type), hf)) from None
    except errors.RepositoryNotFoundError:
        raise DataError(
            f"{where}: no {repo_type} repository of that id on the Hugging Face hub (a private "
            "one needs HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise DataError(f"{where}: revision {revision!r} not found on the hub") from None
    except errors.LocalEntryNotFoundError as e:
        raise DataError(_not_cached(where, ", ".join(patterns), hf, e)) from None
    except errors.HFValidationError as e:
        raise DataError(f"{where}: not a valid hub repository id ({_first_line(e)})") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise DataError(f"{where}: download failed: {_first_line(e)}") from None
    root = Path(root)
    try:
        return root, match_files(root, patterns, where=where)
    except _Unmatched as e:
        raise DataError(_missing(where, e.pattern, repo_type, hf)) from None


class _Unmatched(DataError):
    def __init__(self, message: str, pattern: str):
        super().__init__(message)
        self.pattern = pattern


def match_files(root: Path, patterns: str | Sequence[str], *, where: str) -> list[Path]:
    """The files under ``root`` matching each of ``patterns`` (a relative path or a glob),
    in pattern order, each pattern's matches sorted; a pattern matching nothing is a
    :class:`DataError` (``where: no file PATTERN under ROOT``)."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    files: list[Path] = []
    for pattern in patterns:
        matched = sorted(p for p in root.glob(pattern) if p.is_file())
        if not matched:
            raise _Unmatched(f"{where}: no file {pattern} under {root}", pattern)
        files.extend(matched)
    return files


def local_or_hub_file(value: str, filename: str, *, what: str, repo_type: str = "model") -> str:
    """``value`` itself when it exists on disk or is not spelt as a hub id (the caller's own
    not-found error then names it), else the cached ``filename`` of hub repository
    ``value`` (a tokenizer: ``meta-llama/Llama-2-7b-hf`` -> its ``tokenizer.model``)."""
    if not value or Path(value).expanduser().exists() or not is_repo_id(value):
        return value
    _, files = fetch(value, filename, what=f"{what} (no such local file)", repo_type=repo_type)
    return str(files[0])


def local_or_hub_dir(
    value: str,
    patterns: Sequence[str],
    *,
    what: str,
    optional: Sequence[str] = (),
    repo_type: str = "model",
) -> str:
    """``value`` itself when it exists on disk or is not spelt as a hub id, else the cached
    snapshot directory of hub repository ``value`` holding ``patterns`` (each must match)
    and ``optional`` (where the repository has them)."""
    if not value or Path(value).expanduser().exists() or not is_repo_id(value):
        return value
    what = f"{what} (no such local directory)"
    root, _ = fetch(value, patterns, what=what, repo_type=repo_type, optional=optional)
    return str(root)


def _repo_url(repo_id: str, repo_type: str) -> str:
    return f"{HUB_URL}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _offline(hf: Any) -> bool:
    return bool(getattr(hf.constants, "HF_HUB_OFFLINE", False))


def _cache(hf: Any) -> str:
    return str(getattr(hf.constants, "HF_HUB_CACHE", "the Hugging Face cache"))


def _gated(where: str, url: str, hf: Any) -> str:
    if hf.get_token() is None:
        return (
            f"{where} is a gated repository and no token is set: accept its terms at {url} "
            "and set HF_TOKEN to a token of that account"
        )
    return (
        f"{where} is a gated repository and the token in use (HF_TOKEN or `hf auth login`) "
        f"has no access: accept its terms at {url}"
    )


def _not_cached(where: str, names: str, hf: Any, error: Exception) -> str:
    if _offline(hf):
        return f"{where}: HF_HUB_OFFLINE is set and the cache ({_cache(hf)}) holds no {names} of it"
    return (
        f"{where}: the hub cannot be reached and the cache ({_cache(hf)}) holds no {names} of it "
        f"({_first_line(error)})"
    )


def _missing(where: str, pattern: str, repo_type: str, hf: Any) -> str:
    if _offline(hf):
        return (
            f"{where}: HF_HUB_OFFLINE is set and the cache ({_cache(hf)}) holds no {pattern} of it"
        )
    return f"{where}: the {repo_type} repository has no file {pattern}"
