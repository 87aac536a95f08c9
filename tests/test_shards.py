"""Shard format: round trip, dtypes, pickling for grain workers, atomic writes, tokenizer check."""

import json
import pickle

import numpy as np
import pytest

from oasst_jax.data import shards
from oasst_jax.data.conversation import DataError
from oasst_jax.tokenizer import Tokenizer


def _samples(n=5, seed=0, vocab=300):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = int(rng.integers(0 if i == 2 else 1, 40))
        out.append((rng.integers(0, vocab, size), rng.integers(0, 4, size).astype(np.uint8)))
    return out


def _write(path, samples, vocab=300, meta=None):
    with shards.ShardWriter(path, vocab_size=vocab) as w:
        for tokens, roles in samples:
            w.add(tokens, roles)
        return w.commit(meta or {})


def test_round_trip(tmp_path):
    samples = _samples()
    meta = _write(tmp_path / "p-train", samples, meta={"split": "train"})
    src = shards.ShardDataSource(tmp_path / "p-train")
    assert len(src) == len(samples) == meta["num_samples"]
    for i, (tokens, roles) in enumerate(samples):
        item = src[i]
        assert item["tokens"].dtype == np.int32 and item["roles"].dtype == np.uint8
        np.testing.assert_array_equal(item["tokens"], tokens)
        np.testing.assert_array_equal(item["roles"], roles)
    assert src.lengths().tolist() == [len(t) for t, _ in samples]
    assert src.metadata["split"] == "train"
    with pytest.raises(IndexError):
        src[len(samples)]


def test_add_batch_equals_add(tmp_path):
    samples = _samples(7)
    _write(tmp_path / "a", samples)
    with shards.ShardWriter(tmp_path / "b", vocab_size=300) as w:
        w.add_batch(
            np.concatenate([t for t, _ in samples]),
            np.concatenate([r for _, r in samples]),
            np.array([len(t) for t, _ in samples]),
        )
        w.commit({})
    for name in (shards.TOKENS_FILE, shards.ROLES_FILE, shards.OFFSETS_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("vocab, itemsize", [(32002, 2), (65499, 2), (65500, 4), (128256, 4)])
def test_token_dtype(tmp_path, vocab, itemsize):
    _write(tmp_path / "s", [(np.array([0, vocab - 1]), np.array([1, 2]))], vocab=vocab)
    assert (tmp_path / "s" / shards.TOKENS_FILE).stat().st_size == 2 * itemsize
    assert shards.ShardDataSource(tmp_path / "s")[0]["tokens"].tolist() == [0, vocab - 1]


def test_rejects_out_of_range_and_misaligned(tmp_path):
    with shards.ShardWriter(tmp_path / "s", vocab_size=10) as w:
        with pytest.raises(ValueError, match="out of range"):
            w.add(np.array([10]), np.array([0]))
        with pytest.raises(ValueError, match="aligned"):
            w.add(np.array([1, 2]), np.array([0]))


def test_empty_split_is_refused_when_opened(tmp_path):
    meta = _write(tmp_path / "e", [])
    assert (meta["num_samples"], meta["max_token_id"]) == (0, -1)
    with pytest.raises(DataError, match="empty split") as err:
        shards.ShardDataSource(tmp_path / "e")
    assert str(tmp_path / "e") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="empty split"):
        shards.check_split(tmp_path / "e", vocab_size=300)


def test_pickles_without_data_and_works_in_grain(tmp_path):
    samples = _samples(50)
    _write(tmp_path / "s", samples)
    src = shards.ShardDataSource(tmp_path / "s")
    src[0]  # maps the files
    blob = pickle.dumps(src)
    assert len(blob) < 2000
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again[3]["tokens"], samples[3][0])

    import grain

    ds = grain.MapDataset.source(src).shuffle(seed=0)
    assert sorted(len(ds[i]["tokens"]) for i in range(len(ds))) == sorted(
        len(t) for t, _ in samples
    )


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(tmp_path / "s", vocab_size=300) as w:
            w.add(np.array([1, 2]), np.array([1, 2]))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_previous_output(tmp_path):
    _write(tmp_path / "s", _samples(3))
    before = (tmp_path / "s" / shards.TOKENS_FILE).read_bytes()
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(tmp_path / "s", vocab_size=300) as w:
            w.add(np.array([7]), np.array([2]))
            raise RuntimeError("boom")
    assert (tmp_path / "s" / shards.TOKENS_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_commit_replaces_previous_output(tmp_path):
    _write(tmp_path / "s", _samples(3))
    _write(tmp_path / "s", _samples(2, seed=1))
    assert len(shards.ShardDataSource(tmp_path / "s")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_incomplete_or_damaged_split_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="not a finished pretokenizer output"):
        shards.ShardDataSource(tmp_path / "half")
    _write(tmp_path / "s", _samples(3))
    tokens = tmp_path / "s" / shards.TOKENS_FILE
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(DataError, match="wrong size"):
        shards.ShardDataSource(tmp_path / "s")[0]
    meta_file = tmp_path / "s" / shards.METADATA_FILE
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataError, match="format version 99"):
        shards.ShardDataSource(tmp_path / "s")


def test_check_tokenizer(tmp_path, sp_model_path):
    tok = Tokenizer(sp_model_path)
    _write(tmp_path / "s", _samples(2), meta={"tokenizer": shards.tokenizer_identity(tok)})
    shards.check_tokenizer(tmp_path / "s", tok)
    other = Tokenizer(sp_model_path, megatron_new_tokens=True)
    with pytest.raises(DataError, match="another tokenizer") as err:
        shards.check_tokenizer(tmp_path / "s", other)
    assert "\n" not in str(err.value)


def test_check_split_refuses_ids_beyond_the_model_vocab(tmp_path):
    """Ids of a 60000-token tokenizer must not train a 1002-row model silently."""
    meta = _write(tmp_path / "s", [(np.array([5, 60000]), np.array([1, 2]))], vocab=65000)
    assert meta["max_token_id"] == 60000
    shards.check_split(tmp_path / "s", vocab_size=60001)
    with pytest.raises(DataError, match="token id 60000 .* only 1002 ids") as err:
        shards.check_split(tmp_path / "s", vocab_size=1002)
    assert "\n" not in str(err.value)


def test_max_token_id_of_old_shards_is_computed_from_the_tokens(tmp_path):
    _write(tmp_path / "s", [(np.array([3, 250, 7]), np.array([1, 2, 2]))])
    meta_file = tmp_path / "s" / shards.METADATA_FILE
    meta = json.loads(meta_file.read_text())
    del meta["max_token_id"]  # written before the field existed
    meta_file.write_text(json.dumps(meta))
    assert shards.max_token_id(tmp_path / "s") == 250
    with pytest.raises(DataError, match="token id 250"):
        shards.check_split(tmp_path / "s", vocab_size=200)


def test_check_split_checks_the_tokenizer_of_the_split(tmp_path, sp_model_path):
    tok = Tokenizer(sp_model_path)
    other = Tokenizer(sp_model_path, megatron_new_tokens=True)
    _write(tmp_path / "s", _samples(2), meta={"tokenizer": shards.tokenizer_identity(tok)})
    shards.check_split(tmp_path / "s", vocab_size=tok.vocab_size, tokenizer=tok)
    with pytest.raises(DataError, match="another tokenizer"):
        shards.check_split(tmp_path / "s", vocab_size=other.vocab_size, tokenizer=other)
