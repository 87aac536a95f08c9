"""SentencePiece tokenizer with the chatml markers as extra ids, plus a tiny-model trainer.

Why a wrapper: Llama-2's ``tokenizer.model`` has no ``<|im_start|>``/``<|im_end|>`` pieces.
Megatron-LLM (the trainer of the card) appends them *after* the SentencePiece vocabulary and
encodes text by splitting it on those markers, SentencePiece-encoding the pieces in between,
and emitting the marker ids verbatim. We do the same, so ids match data made upstream:

- default (compact, Megatron ``--no_new_tokens``): ``<|im_start|>`` = base, ``<|im_end|>`` =
  base + 1 (32000/32001 for Llama-2);
- ``megatron_new_tokens=True`` (what the card actually ran): ``<CLS> <SEP> <EOD> <MASK> <PAD>``
  first, then the markers: 32005/32006 in a 32007-token vocabulary.

Before SentencePiece, text is split on every *registered special token* (upstream
``model/pretokenizer/tokenizer.py``, ``tokenize``): the extra tokens above and the base
model's bos/eos piece strings (``<s>``/``</s>`` for Llama-2).  Each occurrence becomes its id,
so a code sample quoting ``</s>`` gets id 2, as upstream; :meth:`Tokenizer.decode` turns
every special id back into its string, so such text round-trips.

No BOS/EOS is ever added by :meth:`Tokenizer.encode` (the recipe's samples start with
``<|im_start|>``).

CLI (:mod:`oasst_jax.cli.tokenizer`): ``python -m oasst_jax.tokenizer train --input tests/data
--out output/sample/tokenizer.model --vocab-size 1000`` trains a small BPE model from text,
json(l)(.gz), tar.gz and parquet files (:func:`train_sentencepiece`).
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

import sentencepiece as spm

from oasst_jax.readers import (
    CORRUPT_STREAM_ERRORS,
    MAX_RECORD_BYTES,
    iter_lines,
    iter_parquet_rows,
)
from oasst_jax.turns import DataError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHATML_TOKENS: tuple[str, ...] = (IM_START, IM_END)
# Megatron-LLM's SentencePiece tokenizer adds these before --vocab_extra_ids_list unless
# --no_new_tokens is given.
MEGATRON_NEW_TOKENS: tuple[str, ...] = ("<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>")


def extra_tokens(megatron_new_tokens: bool = False) -> tuple[str, ...]:
    """The extra tokens appended after the SentencePiece vocabulary, in id order."""
    return (MEGATRON_NEW_TOKENS if megatron_new_tokens else ()) + CHATML_TOKENS


class Tokenizer:
    """SentencePiece model + extra ids appended after its vocabulary.

    Picklable (pickles the model bytes, not the C++ object) so process pools can use it.
    """

    def __init__(self, model_path: str | os.PathLike, *, megatron_new_tokens: bool = False):
        path = Path(model_path)
        if not path.is_file():
            raise DataError(f"tokenizer model not found: {path}")
        self._model_path = str(path)
        self._megatron_new_tokens = megatron_new_tokens
        self._proto = path.read_bytes()
        self._setup()

    def _setup(self) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        base = self._sp.get_piece_size()
        extras = extra_tokens(self._megatron_new_tokens)
        self._extra_ids = {tok: base + i for i, tok in enumerate(extras)}
        # upstream's registration order: <CLS>..<PAD>, bos and eos pieces, the chatml markers
        # (a tie between two tokens at one position would go to the earlier one, as upstream)
        specials = {t: self._extra_ids[t] for t in extras if t not in CHATML_TOKENS}
        for i in (self._sp.bos_id(), self._sp.eos_id()):
            if 0 <= i < base:
                specials[self._sp.id_to_piece(i)] = i
        specials.update({t: self._extra_ids[t] for t in CHATML_TOKENS})
        self._special_ids = specials
        self._id_to_special = {i: tok for tok, i in specials.items()}
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "path": self._model_path, "mnt": self._megatron_new_tokens}

    def __setstate__(self, state: dict) -> None:
        self._proto = state["proto"]
        self._model_path = state["path"]
        self._megatron_new_tokens = state["mnt"]
        self._setup()

    @property
    def model_path(self) -> str:
        return self._model_path

    @property
    def megatron_new_tokens(self) -> bool:
        return self._megatron_new_tokens

    @property
    def base_vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus the extra tokens (unpadded; the model pads its embedding)."""
        return self.base_vocab_size + len(self._extra_ids)

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def im_start_id(self) -> int:
        return self._extra_ids[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._extra_ids[IM_END]

    @property
    def extra_ids(self) -> dict[str, int]:
        return dict(self._extra_ids)

    @property
    def sha256(self) -> str:
        """Identity of the id mapping: model bytes plus the extra-token layout.

        Shards record it so the trainer can refuse data made with another tokenizer.
        """
        h = hashlib.sha256(self._proto)
        h.update(json.dumps(sorted(self._extra_ids.items(), key=lambda kv: kv[1])).encode())
        return h.hexdigest()

    def special_ids(self) -> dict[str, int]:
        """The ids a consumer needs (bos, eos, markers, extras), for metadata files."""
        return {"bos": self.bos_id, "eos": self.eos_id, **self._extra_ids}

    def special_tokens(self) -> dict[str, int]:
        """Every string :meth:`encode` maps to one id, in upstream's order: what upstream
        writes to ``special_tokens.json`` (its tokenizer's ``_special_tokens``)."""
        return dict(self._special_ids)

    def encode_plain(self, texts: Sequence[str]) -> list[list[int]]:
        """SentencePiece-encode strings free of special tokens in one batched C++ call."""
        return self._sp.encode(list(texts), out_type=int, num_threads=1)

    def has_special_tokens(self, text: str) -> bool:
        """Whether ``text`` contains a special-token string (it then encodes to its id)."""
        return self._split_re.search(text) is not None

    def encode(self, text: str) -> list[int]:
        """Encode ``text``; special tokens inside it (:meth:`special_tokens`) become their
        single ids, the text between them goes through SentencePiece."""
        ids: list[int] = []
        for i, part in enumerate(self._split_re.split(text)):
            if i % 2:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self._sp.encode(part, out_type=int))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids; special ids (bos/eos included) become their token strings."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._id_to_special:
                out.append(self._sp.decode(run))
                out.append(self._id_to_special[i])
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)


def tokenizer_for_vocab(model_path: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """The tokenizer in the extra-id layout a model's vocabulary implies.

    A model trained on Megatron's 32007 layout has 5 more rows than the compact
    one, so a checkpoint picks its own layout without another flag.
    """
    tok = Tokenizer(model_path)
    if vocab_size == tok.vocab_size + len(MEGATRON_NEW_TOKENS):
        tok = Tokenizer(model_path, megatron_new_tokens=True)
    if tok.vocab_size > vocab_size:
        raise DataError(
            f"tokenizer {model_path} has {tok.vocab_size} ids, the model only {vocab_size}"
        )
    return tok


def model_dir_tokenizer(model_dir: str, vocab_size: int, override: str | None = None) -> Tokenizer:
    """The tokenizer to sample or evaluate a model directory with: the directory's own
    ``tokenizer.model`` (what an export holds), in the layout its vocabulary implies, or
    ``override`` (``--tokenizer``).  An override that tokenizes differently from the
    directory's own file is a :class:`DataError`: the model would be fed ids it was not
    trained on, which no later check could notice."""
    own = os.path.join(model_dir, "tokenizer.model")
    tok = tokenizer_for_vocab(override or own, vocab_size)
    if override and os.path.isfile(own) and _encoding_spec(own) != _encoding_spec(override):
        raise DataError(
            f"--tokenizer {override} tokenizes differently from {own}, the tokenizer "
            f"{model_dir} holds; leave out --tokenizer to use it"
        )
    return tok


def _encoding_spec(path: str | os.PathLike) -> bytes:
    """What decides a SentencePiece model's ids: its pieces (with scores and types), its
    normalizer and the trainer settings the encoder reads; not the training metadata."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(Path(path).read_bytes())
    t = proto.trainer_spec
    kept = pb.TrainerSpec(
        model_type=t.model_type, byte_fallback=t.byte_fallback, unk_id=t.unk_id,
        bos_id=t.bos_id, eos_id=t.eos_id, pad_id=t.pad_id,
        treat_whitespace_as_suffix=t.treat_whitespace_as_suffix,
    )  # fmt: skip
    spec = pb.ModelProto(pieces=proto.pieces, normalizer_spec=proto.normalizer_spec)
    return spec.SerializeToString(deterministic=True) + kept.SerializeToString(deterministic=True)


# --------------------------------------------------------------------------- training

_TRAINER_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    # Keep newlines and runs of spaces (chatml needs "\n"; code needs indentation).
    add_dummy_prefix=False,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    character_coverage=1.0,
    hard_vocab_limit=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    input_sentence_size=2_000_000,
    shuffle_input_sentence=True,
    max_sentence_length=16384,
    num_threads=2,
    minloglevel=2,
)


def train_sentencepiece(
    texts: Iterable[str | os.PathLike] | Iterator[str],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    skipped: collections.Counter | None = None,
) -> Path:
    """Train a small BPE SentencePiece model and write ``{model_prefix}.model``.

    ``texts`` is a list of files/directories (read with :func:`iter_corpus_text`, lines
    it skips counted into ``skipped``) or an iterator of text chunks. Only the ``.model``
    file is written (atomically).
    """
    if isinstance(texts, (list, tuple)) and all(isinstance(t, (str, os.PathLike)) for t in texts):
        chunks: Iterable[str] = iter_corpus_text([Path(t) for t in texts], skipped)
    else:
        chunks = texts
    buf = io.BytesIO()
    failed: list[BaseException] = []
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(chunks, failed), model_writer=buf,
            vocab_size=vocab_size, **_TRAINER_SETTINGS,
        )  # fmt: skip
    except RuntimeError:
        if failed:  # SentencePiece wraps the reader's error in a multi-line RuntimeError
            raise failed[0] from None
        raise
    out = Path(f"{model_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)
    return out


def _sentences(chunks: Iterable[str], failed: list[BaseException]) -> Iterator[str]:
    """Split text into non-empty lines (SentencePiece's unit), keeping it bounded in length;
    an error raised while reading is kept in ``failed`` to be re-raised as itself."""
    try:
        for chunk in chunks:
            for line in chunk.splitlines():
                if line.strip():
                    yield line[:8000]
    except Exception as e:
        failed.append(e)
        raise


def iter_corpus_text(
    paths: Sequence[Path],
    skipped: collections.Counter | None = None,
    max_line_bytes: int = MAX_RECORD_BYTES,
) -> Iterator[str]:
    """Text from files and directories (recursively): plain text, json/jsonl, gzip, tar, parquet.

    JSON is parsed and its string values yielded, so the model learns the content rather
    than the quoting; anything unparsable is used as raw text.  Everything streams: tar
    members and gzip are read a line at a time (never extracted, never whole), parquet a
    batch at a time.  A line over ``max_line_bytes`` is read past and counted in
    ``skipped["oversize_record"]``; a truncated or corrupt file is a :class:`DataError`
    naming it.
    """
    skipped = collections.Counter() if skipped is None else skipped
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            yield from iter_corpus_text(files, skipped, max_line_bytes)
        elif path.is_file():
            try:
                with path.open("rb") as f:
                    yield from _stream_text(path.name, f, str(path), skipped, max_line_bytes)
            except (*CORRUPT_STREAM_ERRORS, tarfile.TarError) as e:
                raise DataError(f"{path}: corrupt or truncated file ({e})") from None
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")


_TEXT_SUFFIXES = (".txt", ".md", ".py", ".csv", ".tsv")


def _stream_text(
    name: str, f: IO[bytes], where: str, skipped: collections.Counter, max_bytes: int
) -> Iterator[str]:
    """Text of one (possibly nested) file, chosen by ``name``; ``where`` names it in errors."""
    lower = name.lower()
    if lower.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(fileobj=f, mode="r:*") as tar:
            for member in tar:
                fh = tar.extractfile(member) if member.isfile() else None
                if fh is not None:
                    with fh:
                        inner = f"{where}:{member.name}"
                        yield from _stream_text(member.name, fh, inner, skipped, max_bytes)
    elif lower.endswith(".gz"):
        with gzip.GzipFile(fileobj=f) as unzipped:
            yield from _stream_text(name[:-3], unzipped, where, skipped, max_bytes)
    elif lower.endswith(".parquet"):
        if importlib.util.find_spec("pyarrow") is None:  # optional (extras: parquet)
            skipped["parquet_without_pyarrow"] += 1
            return
        for row in iter_parquet_rows(f, where):
            yield from _json_strings(row)
    elif lower.endswith((".json", ".jsonl")):
        yield from _json_text(f, skipped, max_bytes)
    elif lower.endswith(_TEXT_SUFFIXES):
        for line in iter_lines(f, skipped, max_bytes):
            yield line.decode("utf-8", errors="replace")


def _json_text(f: IO[bytes], skipped: collections.Counter, max_bytes: int) -> Iterator[str]:
    """A JSON document of at most ``max_bytes`` is parsed whole; otherwise (or when it does
    not parse) each line is parsed on its own (a trailing comma, as in a pretty-printed
    array, is ignored) or, failing that, used as raw text."""
    head = f.read(max_bytes + 1)
    if len(head) <= max_bytes:
        try:
            yield from _json_strings(json.loads(head))
            return
        except (ValueError, RecursionError):
            lines = iter_lines(io.BytesIO(head), skipped, max_bytes)
    else:
        del head
        f.seek(0)
        lines = iter_lines(f, skipped, max_bytes)
    for line in lines:
        try:
            doc = json.loads(line.rstrip().rstrip(b","))
        except (ValueError, RecursionError):
            doc = line.decode("utf-8", errors="replace").rstrip("\r\n")
        yield from _json_strings(doc)


def _json_strings(obj: object) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _json_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _json_strings(v)


if __name__ == "__main__":  # python -m oasst_jax.tokenizer train: the command's own module
    from oasst_jax.cli.tokenizer import main

    main()
