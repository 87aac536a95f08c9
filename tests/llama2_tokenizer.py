"""Meta's Llama-2 ``tokenizer.model``, rebuilt byte for byte from public files, for tests.

Why rebuilt: the file is Llama 2 material (Llama 2 Community License), so it is never
committed here and the hub wants a login.  The PyPI sdist of ``llama-cpp-python`` vendors
llama.cpp's tokenizer test files: ``ggml-vocab-llama-spm.gguf`` (Llama-2's 32,000 pieces
with their scores and types, no weights) and ``.inp``/``.out`` (llama.cpp's test strings and
the ids SentencePiece gives them).  The pieces plus Meta's published trainer and normalizer
specs serialise to Meta's exact file (its sha256 is what public projects pin), so these
tests tokenize with the real thing.  The result is cached outside the repository
(``$OASST_JAX_CACHE/llama2``, default ``~/.cache/oasst_jax/llama2``); where the sdist
cannot be fetched, :class:`Unavailable` says so and the tests using it skip with that
reason.  How it was found: ``../shared/reference/llama2-tokenizer.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest

SDIST = "llama-cpp-python==0.3.36"
INDEX = "https://pypi.org/simple"
SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
VOCAB = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
SEPARATOR = "\n__ggml_vocab_test__\n"  # between the strings of llama.cpp's .inp files
MODEL_FILE = "tokenizer.model"
CASES_FILE = "llama_cpp_cases.json"


class Llama2(NamedTuple):
    model: Path  # Meta's tokenizer.model
    cases: list[tuple[str, list[int]]]  # llama.cpp's (text, SentencePiece ids)


class Unavailable(RuntimeError):
    """The tokenizer cannot be built here (no network to PyPI, no ``gguf``); the message
    is the skip reason."""


def cache_dir() -> Path:
    """``$OASST_JAX_CACHE/llama2`` (default ``~/.cache/oasst_jax/llama2``)."""
    root = os.environ.get("OASST_JAX_CACHE") or os.path.join("~", ".cache", "oasst_jax")
    return Path(root).expanduser() / "llama2"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(cache: Path | None = None) -> Llama2:
    """Meta's tokenizer and llama.cpp's (text, ids) cases, built once into ``cache``.

    A cached model whose sha256 is not Meta's is rebuilt; a build that does not give
    Meta's bytes raises :class:`Unavailable` (then something upstream changed).
    """
    from filelock import FileLock  # (huggingface_hub's dependency)

    cache = cache or cache_dir()
    model, cases = cache / MODEL_FILE, cache / CASES_FILE
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(cache / ".lock"):  # xdist workers: one builds, the others wait for it
        if not (model.is_file() and cases.is_file() and _sha256(model) == SHA256):
            _build_into(cache)
    pairs = [(text, ids) for text, ids in json.loads(cases.read_text(encoding="utf-8"))]
    return Llama2(model, pairs)


def _build_into(cache: Path) -> None:
    try:
        from gguf import GGUFReader  # test extra
    except ImportError:
        raise Unavailable("Meta's Llama-2 tokenizer: the `gguf` package is not installed") from None
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama2-sdist-", dir=cache) as tmp:
        members = _fetch_members(Path(tmp))
        proto = _model_proto(GGUFReader(members[""]))
        cases = _cases(members[".inp"], members[".out"])
    if hashlib.sha256(proto).hexdigest() != SHA256:
        raise Unavailable(f"the tokenizer rebuilt from {SDIST} is not Meta's (sha256 differs)")
    _write(cache / CASES_FILE, json.dumps(cases, ensure_ascii=False).encode())
    _write(cache / MODEL_FILE, proto)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sdist_url() -> tuple[str, str]:
    """The sdist's ``(url, sha256)`` from PyPI's simple index (its JSON form, PEP 691: what
    pip reads).

    Not ``pip download``: for an sdist pip also installs the package's build backend in an
    isolated environment and asks it for the package's metadata, ~10 CPU s of a ~12 s fetch,
    and minutes in a loaded suite; only the archive is needed."""
    name, _, version = SDIST.partition("==")
    request = urllib.request.Request(
        f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        files = json.load(r)["files"]
    wanted = f"{name.replace('-', '_')}-{version}.tar.gz"
    for f in files:
        if f["filename"] == wanted:
            return f["url"], f["hashes"]["sha256"]
    raise Unavailable(f"Meta's Llama-2 tokenizer: {INDEX} lists no {wanted}")


def _fetch_members(tmp: Path) -> dict[str, Path]:
    """Download the sdist (its registry digest checked) and extract the vocabulary and its
    test files; keys: the suffix after ``VOCAB`` ("", ".inp", ".out")."""
    archive = tmp / "sdist.tar.gz"
    try:
        url, digest = _sdist_url()
        with urllib.request.urlopen(url, timeout=300) as r, open(archive, "wb") as out:
            shutil.copyfileobj(r, out, 1 << 20)
    except (OSError, ValueError, KeyError) as e:  # URLError, timeouts, a malformed answer
        raise Unavailable(
            f"Meta's Llama-2 tokenizer: could not fetch the sdist {SDIST} ({e})"
        ) from None
    if _sha256(archive) != digest:
        raise Unavailable(f"the {SDIST} sdist downloaded is not the one PyPI lists (sha256)")
    found: dict[str, Path] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            top, _, rest = member.name.partition("/")
            if member.isfile() and rest.startswith(VOCAB):
                suffix = rest[len(VOCAB) :]
                if suffix in ("", ".inp", ".out"):
                    out = tmp / f"vocab{suffix}"
                    with tar.extractfile(member) as src:
                        out.write_bytes(src.read())
                    found[suffix] = out
    if len(found) != 3:
        raise Unavailable(f"{SDIST}'s sdist holds no {VOCAB} (+ .inp, .out)")
    return found


def _model_proto(reader) -> bytes:
    """Llama-2's ModelProto: the GGUF's pieces, scores and types (SentencePiece's own
    numbering; ``type`` written only where not NORMAL, as SentencePiece writes it) and
    Meta's published trainer/normalizer specs, every field its dump shows set."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    field = reader.get_field
    pieces = field("tokenizer.ggml.tokens").contents()
    scores = field("tokenizer.ggml.scores").contents()
    types = field("tokenizer.ggml.token_type").contents()
    m = pb.ModelProto()
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        p = m.pieces.add(piece=piece, score=score)
        if kind != pb.ModelProto.SentencePiece.NORMAL:
            p.type = kind
    m.trainer_spec.MergeFrom(
        pb.TrainerSpec(
            input=["/large_experiments/theorem/datasets/MERGED/all.test1.merged"],
            model_prefix="spm_model_32k_200M_charcov099995_allowWSO__v2",
            model_type=pb.TrainerSpec.BPE, vocab_size=32000, self_test_sample_size=0,
            input_format="text", character_coverage=0.99995, input_sentence_size=200000000,
            seed_sentencepiece_size=1000000, shrinking_factor=0.75, num_threads=80,
            num_sub_iterations=2, max_sentence_length=4192, shuffle_input_sentence=True,
            max_sentencepiece_length=16, split_by_unicode_script=True,
            split_by_whitespace=True, split_by_number=True, treat_whitespace_as_suffix=False,
            split_digits=True, allow_whitespace_only_pieces=True,
            vocabulary_output_piece_score=True, hard_vocab_limit=True, use_all_vocab=False,
            byte_fallback=True, required_chars="", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            unk_surface=" \u2047 ", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            pad_piece="<pad>", train_extremely_large_corpus=False,
            enable_differential_privacy=False, differential_privacy_noise_level=0.0,
            differential_privacy_clipping_threshold=0,
        )
    )  # fmt: skip
    m.normalizer_spec.MergeFrom(
        pb.NormalizerSpec(
            name="identity", precompiled_charsmap=b"", add_dummy_prefix=True,
            remove_extra_whitespaces=False, normalization_rule_tsv="",
        )
    )  # fmt: skip
    return m.SerializeToString()


def _cases(inp: Path, out: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's pairs: ``.inp`` strings split on :data:`SEPARATOR`, ``.out`` one line of
    ids per string (both files end with a separator, so the last pair is the empty string:
    47 pairs for this vocabulary)."""
    texts = inp.read_text(encoding="utf-8").split(SEPARATOR)
    lines = out.read_text(encoding="utf-8").split("\n")
    if len(texts) != len(lines):
        raise Unavailable(f"{inp.name} has {len(texts)} strings but {out.name} {len(lines)} lines")
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, lines, strict=True)]


@pytest.fixture(scope="session")
def llama2() -> Llama2:
    """Meta's Llama-2 tokenizer (:func:`build`); skips, saying why, where it cannot be built."""
    try:
        return build()
    except Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session", params=["tiny", "llama2"])
def sp_models(request) -> Path:
    """The suite's tiny SentencePiece model, then Meta's Llama-2 one: for the tests that
    compare with upstream's rules, which the tiny model (no dummy prefix, none of Llama-2's
    whitespace pieces) cannot show wrong alone."""
    if request.param == "tiny":
        return Path(request.getfixturevalue("sp_model_path"))
    return request.getfixturevalue("llama2").model
