"""Tokenizer: chatml markers as single extra ids, round-trip, id layouts, identity, CLI."""

import pickle
import subprocess
import sys

import pytest

from oasst_jax.data.conversation import DataError
from oasst_jax.tokenizer import Tokenizer, iter_corpus_text, train_sentencepiece


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
