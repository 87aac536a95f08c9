"""Tokenizer: chatml markers as single extra ids, round-trip, id layouts, identity, CLI."""

import collections
import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import tracemalloc

import llama2_tokenizer
import pytest

from oasst_jax.tokenizer import (
    Tokenizer,
    iter_corpus_text,
    model_dir_tokenizer,
    train_sentencepiece,
)
from oasst_jax.turns import DataError


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return Tokenizer(sp_model_path)


def test_extra_ids_follow_base_vocab(tok):
    assert tok.im_start_id == tok.base_vocab_size
    assert tok.im_end_id == tok.base_vocab_size + 1
    assert tok.vocab_size == tok.base_vocab_size + 2
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_megatron_layout(sp_model_path):
    tok = Tokenizer(sp_model_path, megatron_new_tokens=True)
    base = tok.base_vocab_size
    assert (tok.im_start_id, tok.im_end_id, tok.vocab_size) == (base + 5, base + 6, base + 7)
    assert tok.special_ids()["<PAD>"] == base + 4
    assert tok.sha256 != Tokenizer(sp_model_path).sha256


def test_markers_are_single_ids_and_round_trip(tok):
    text = "<|im_start|>user\nhello  world\n\n\tdef f():<|im_end|>\n"
    ids = tok.encode(text)
    assert ids[0] == tok.im_start_id
    assert ids.count(tok.im_start_id) == 1 and ids.count(tok.im_end_id) == 1
    assert tok.decode(ids) == text
    assert tok.encode("") == []


def _upstream_tokenize(sp, special: dict, text: str) -> list[int]:
    """Upstream's ``_SentencePieceTokenizer.tokenize`` (Megatron-LLM, NeMo): find the
    earliest special token, SentencePiece the text before it, emit its id, repeat."""
    ids, idx = [], 0
    while True:
        found = {t: text[idx:].index(t) for t in special if t in text[idx:]}
        if not found:
            break
        token = min(found, key=found.get)
        ids.extend(sp.encode_as_ids(text[idx : idx + found[token]]))
        ids.append(special[token])
        idx += found[token] + len(token)
    return ids + sp.encode_as_ids(text[idx:])


@pytest.mark.parametrize("megatron", [False, True])
def test_literal_special_tokens_in_text_match_upstream(sp_models, megatron):
    """A code sample quoting ``</s>`` or ``<s>`` gets the bos/eos ids, as upstream; under
    the Megatron layout the five new tokens too; decoding gives the text back (with the
    tiny model and with Meta's, whose dummy prefix restarts after every special token)."""
    import sentencepiece as spm

    sp_model_path = sp_models
    tok = Tokenizer(sp_model_path, megatron_new_tokens=megatron)
    base = tok.base_vocab_size
    news = {t: base + i for i, t in enumerate(("<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>"))}
    chat = {"<|im_start|>": tok.im_start_id, "<|im_end|>": tok.im_end_id}
    expected = {**(news if megatron else {}), "<s>": 1, "</s>": 2, **chat}
    assert tok.special_tokens() == expected
    assert list(tok.special_tokens()) == list(expected)  # special_tokens.json's order
    texts = [
        'print("</s>")  # end\n<s>start</s></s>',
        "a <CLS> b <SEP><EOD> <MASK>x<PAD> </ s> <s > <|im_end|>\n",
        "<<s>></s><|im_start|>user\n</s<|im_end|>",
        " <s>  x</s>\t\n <|im_start|> assistant\n    def f():\n        return 1 <unk>",
    ]
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    for text in texts:
        ids = tok.encode(text)
        assert ids == _upstream_tokenize(sp, expected, text)
        assert tok.decode(ids) == text
    ids = tok.encode(texts[0])
    assert ids.count(tok.eos_id) == 3 and ids.count(tok.bos_id) == 1
    assert (base in tok.encode("<CLS>")) == megatron


def test_meta_llama2_tokenizer_passes_llama_cpp_cases(llama2):
    """Meta's tokenizer, rebuilt byte for byte (its pinned sha256), gives llama.cpp's
    expected ids on all 47 of its test strings through :class:`Tokenizer`, and decodes
    them back."""
    assert hashlib.sha256(llama2.model.read_bytes()).hexdigest() == llama2_tokenizer.SHA256
    tok = Tokenizer(llama2.model)
    assert (tok.base_vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert len(llama2.cases) == 47
    assert [tok.encode(text) for text, _ in llama2.cases] == [ids for _, ids in llama2.cases]
    assert [tok.decode(ids) for _, ids in llama2.cases] == [text for text, _ in llama2.cases]
    assert tok.encode("Hello  world") == [15043, 29871, 3186]  # the example
    megatron = Tokenizer(llama2.model, megatron_new_tokens=True)
    assert (megatron.im_start_id, megatron.im_end_id, megatron.vocab_size) == (32005, 32006, 32007)


def test_llama2_build_never_trusts_a_stale_cache_and_says_why_it_skips(tmp_path, monkeypatch):
    """A cached file that is not Meta's is rebuilt; where the sdist cannot be fetched the
    reason (the skip message of the tests using it) names the sdist."""
    cache = tmp_path / "llama2"
    cache.mkdir()
    (cache / llama2_tokenizer.MODEL_FILE).write_bytes(b"not the model")
    (cache / llama2_tokenizer.CASES_FILE).write_text("[]")
    monkeypatch.setattr(llama2_tokenizer, "INDEX", "http://127.0.0.1:9/simple")  # refused
    with pytest.raises(llama2_tokenizer.Unavailable, match="could not fetch the sdist "
                       "llama-cpp-python==0.3.36"):  # fmt: skip
        llama2_tokenizer.build(cache)
    monkeypatch.setenv("OASST_JAX_CACHE", str(tmp_path))
    assert llama2_tokenizer.cache_dir() == cache


def _edited_model(src, dst, edit) -> str:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(open(src, "rb").read())
    edit(proto)
    dst.write_bytes(proto.SerializeToString())
    return str(dst)


def test_model_dir_tokenizer_is_the_directorys_own_unless_the_same(tmp_path, sp_model_path):
    """A model directory's own tokenizer.model by default (the layout from the vocabulary);
    ``--tokenizer`` with other metadata but the same pieces is fine; one that tokenizes
    differently (a score changed, a piece renamed) is one line naming both."""
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    own = _edited_model(sp_model_path, model_dir / "tokenizer.model", lambda p: None)
    base = Tokenizer(own)
    tok = model_dir_tokenizer(str(model_dir), base.vocab_size + 5)
    assert tok.model_path == own and tok.megatron_new_tokens

    def rename(p):
        p.trainer_spec.model_prefix = "elsewhere"

    renamed = _edited_model(sp_model_path, tmp_path / "renamed.model", rename)
    assert model_dir_tokenizer(str(model_dir), base.vocab_size, renamed).model_path == renamed

    def rescore(p):
        p.pieces[-1].score = 10.0

    def dummy_prefix(p):
        p.normalizer_spec.add_dummy_prefix = True

    for edit in (rescore, dummy_prefix):
        bad = _edited_model(sp_model_path, tmp_path / f"{edit.__name__}.model", edit)
        with pytest.raises(DataError, match=f"--tokenizer {bad} tokenizes differently from {own}"):
            model_dir_tokenizer(str(model_dir), base.vocab_size, bad)
    empty = tmp_path / "ckpt"
    empty.mkdir()  # a directory without one (an orbax checkpoint): the given file
    assert model_dir_tokenizer(str(empty), base.vocab_size, renamed).model_path == renamed
    with pytest.raises(DataError, match="tokenizer model not found"):
        model_dir_tokenizer(str(empty), base.vocab_size)


def test_no_bos_or_eos_added(tok):
    ids = tok.encode("hello world")
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_unseen_characters_fall_back_to_bytes(tok):
    text = "ünïcode ✓ 日本"
    assert tok.decode(tok.encode(text)) == text


def test_pickle_round_trip(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("hello <|im_end|>") == tok.encode("hello <|im_end|>")
    assert again.sha256 == tok.sha256


def test_missing_model_is_data_error(tmp_path):
    with pytest.raises(DataError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "nope.model")


def test_corpus_reader_extracts_json_strings(tmp_path):
    (tmp_path / "a.json").write_text('[{"USER": "hi there", "n": 3}]')
    (tmp_path / "b.jsonl").write_text('{"x": ["one", {"y": "two"}]}\nnot json\n')
    assert list(iter_corpus_text([tmp_path])) == ["hi there", "one", "two", "not json"]


def test_train_is_deterministic(tmp_path):
    lines = [f"line {i} of some text with words" for i in range(200)]
    a = train_sentencepiece(iter(lines), tmp_path / "a", 300)
    b = train_sentencepiece(iter(lines), tmp_path / "b", 300)
    assert a.read_bytes() == b.read_bytes()
    assert not (tmp_path / "a.vocab").exists()


def test_cli_trains_on_fixtures(tmp_path):
    out = tmp_path / "tok.model"
    cmd = [sys.executable, "-m", "oasst_jax.tokenizer", "train", "--input", "tests/data",
           "--out", str(out), "--vocab-size", "500"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    tok = Tokenizer(out)
    assert 260 < tok.base_vocab_size <= 500
    assert "wrote" in res.stdout


def test_cli_missing_input_is_one_line_error(tmp_path):
    cmd = [sys.executable, "-m", "oasst_jax.tokenizer", "train", "--input", str(tmp_path / "x"),
           "--out", str(tmp_path / "t.model")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "no such file" in res.stderr


def _cli_train(*inputs, out):
    cmd = [sys.executable, "-m", "oasst_jax.tokenizer", "train", "--input", *map(str, inputs),
           "--out", str(out), "--vocab-size", "300"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_corpus_reader_streams_archive_members(tmp_path):
    """A tar member is read a line at a time: a 48 MiB line inside a ~50 KB archive is
    read past (peak memory ~2x the cap) and counted, the lines around it are kept."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as g:
        g.write(b'{"text": "before"}\n{"text": "')
        for _ in range(48):
            g.write(b"a" * 2**20)
        g.write(b'"}\n{"text": "after"}\n')
    member = buf.getvalue()
    path = tmp_path / "corpus.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("corpus/lines.jsonl.gz")
        info.size = len(member)
        tar.addfile(info, io.BytesIO(member))
    skipped = collections.Counter()
    tracemalloc.start()
    try:
        texts = list(iter_corpus_text([path], skipped, max_line_bytes=2**20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert texts == ["before", "after"]
    assert dict(skipped) == {"oversize_record": 1}
    assert peak < 4 * 2**20


def test_cli_truncated_gzip_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "corpus.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "hello world"}\n' * 2000)[:-50])
    res = _cli_train(bad, out=tmp_path / "t.model")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0
    assert "corpus.jsonl.gz: corrupt or truncated" in res.stderr
    assert not (tmp_path / "t.model").exists()


def test_cli_unreadable_parquet_names_the_file(tmp_path):
    bad = tmp_path / "rows.parquet"
    bad.write_bytes(b"PAR1 not parquet at all")
    res = _cli_train(bad, out=tmp_path / "t.model")
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0
    assert "rows.parquet: not a readable parquet file" in res.stderr
