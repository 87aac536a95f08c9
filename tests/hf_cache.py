"""Hugging Face hub stand-ins for tests that must not touch the network.

:func:`cache_repo` lays a repository out in a cache directory exactly as
``huggingface_hub`` does (``{type}s--ORG--NAME/refs/main``, ``snapshots/REV/PATH`` links into
``blobs/``); :func:`use_cache` points the library at such a cache (``HF_HUB_CACHE``, and
``HF_HUB_OFFLINE=1`` unless told otherwise; the library reads both at import, so its
constants are patched too) with no token set; :func:`fake_hub` serves the hub's API errors
(``X-Error-Code: RepoNotFound`` / ``GatedRepo``) on a localhost port for the online cases.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(
    cache: Path,
    repo_id: str,
    files: Mapping[str, bytes | Path],
    *,
    repo_type: str = "dataset",
    commit: str = COMMIT,
) -> Path:
    """Put ``files`` (repository path -> bytes or a file to copy) into ``cache`` as the
    library stores a download of ``repo_id`` at ``commit`` on ``main``; returns the
    snapshot directory."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    for name, data in files.items():
        data = data.read_bytes() if isinstance(data, Path) else data
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def use_cache(monkeypatch, cache: Path, *, offline: bool = True) -> None:
    """Point huggingface_hub at ``cache`` (offline by default), without any token."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH"):
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, str(cache / "no-token" / name))


def env(cache: Path) -> dict[str, str]:
    """A subprocess environment reading only ``cache``, offline, without any token."""
    out = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return {
        **out,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cache / "home"),
    }


class _Hub(BaseHTTPRequestHandler):
    """Every request fails as the hub fails it: a path naming ``gated`` as a gated repository
    (401, ``GatedRepo``), any other as a repository that does not exist (404)."""

    def _fail(self) -> None:
        gated = "gated" in self.path
        self.send_response(401 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "Access restricted" if gated else "Not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _fail

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def fake_hub(monkeypatch, cache: Path) -> Iterator[str]:
    """An online hub on localhost that knows no repository (``use_cache`` online)."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    use_cache(monkeypatch, cache, offline=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(constants, "ENDPOINT", url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


DATA = Path(__file__).parent / "data"
# The card's stage-1 datasets: hub id -> the fixture files under the hub's file names.
MEGACODE_REPO = "rombodawg/LosslessMegaCodeTrainingV2_1m_Evol_Uncensored"
MEGACODE_FILE = "DeDuped_LosslessMegaCodeTrainingV2_942k_Evol_Uncensored.json"
ORCA_REPO = "shahules786/orca-chat"
DOLLY_REPO = "argilla/databricks-dolly-15k-curated-multilingual"
LEET_REPO = "ehartford/oa_leet10k"
LEET_FILES = ("data/oa_leet10k.parquet", "data/oa_leet10k_contests_merged.parquet")
LEET_SPLIT = 10  # rows of the fixture's oa_leet10k.parquet in the first hub file


def card_cache(cache: Path, *, without: tuple[str, ...] = ()) -> None:
    """The four stage-1 datasets in ``cache`` as the hub serves them, built from the
    fixtures (``tests/data``); oa_leet10k's 25 rows split over its two hub files; a
    repository id in ``without`` is left out."""
    import io

    import pyarrow.parquet as pq

    leet = pq.read_table(DATA / "oa_leet10k.parquet")
    parts = []
    for table in (leet.slice(0, LEET_SPLIT), leet.slice(LEET_SPLIT)):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        parts.append(buf.getvalue())
    repos = {
        MEGACODE_REPO: {MEGACODE_FILE: DATA / "megacode2.json", "README.md": b"# megacode2"},
        ORCA_REPO: {"orca-chat-gpt4.json": DATA / "orca-chat-gpt4.json"},
        DOLLY_REPO: {
            f"data/{split}-00000-of-00001-5be25746d8962bce.parquet": (
                DATA / "dolly15k" / "data" / f"{split}-00000-of-00001.parquet"
            )
            for split in ("en", "de", "es", "fr")
        }
        | {"tokens_diff.png": b"png"},
        LEET_REPO: dict(zip(LEET_FILES, parts, strict=True)),
    }
    for repo_id, files in repos.items():
        if repo_id not in without:
            cache_repo(cache, repo_id, files)
