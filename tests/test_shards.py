"""Shard format: round trip, dtypes, pickling for grain workers, atomic writes, tokenizer check;
the Megatron indexed-dataset format against its spec, and reading either format."""

import json
import pickle
import struct

import numpy as np
import pytest

from oasst_jax.data import megatron, outputs, shards
from oasst_jax.tokenizer import Tokenizer
from oasst_jax.turns import DataError


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


def test_check_split_scans_the_tokens_not_the_metadata(tmp_path):
    """An id >= the vocabulary written into tokens.bin after pretokenize (metadata
    unchanged, or written before it recorded max_token_id) is found by the scan: one line
    naming the file, the id and its first index; a bad role id likewise."""
    _write(tmp_path / "s", [(np.array([3, 250, 7]), np.array([1, 2, 2]))])
    shards.check_split(tmp_path / "s", vocab_size=251)
    tokens = tmp_path / "s" / shards.TOKENS_FILE
    tokens.write_bytes(np.array([3, 250, 9000], "<u2").tobytes())
    meta_file = tmp_path / "s" / shards.METADATA_FILE
    assert json.loads(meta_file.read_text())["max_token_id"] == 250  # the metadata says fine
    with pytest.raises(DataError) as err:
        shards.check_split(tmp_path / "s", vocab_size=251)
    assert str(err.value) == (
        f"{tokens} holds token id 9000 but the model has only 251 ids (model.vocab_size), "
        "first at index 2; pretokenize with the model's tokenizer"
    )
    meta = json.loads(meta_file.read_text())
    del meta["max_token_id"]  # written before the field existed
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="token id 250 .*first at index 1"):
        shards.check_split(tmp_path / "s", vocab_size=200)
    tokens.write_bytes(np.array([3, 250, 7], "<u2").tobytes())
    (tmp_path / "s" / shards.ROLES_FILE).write_bytes(bytes([1, 2, 9]))
    with pytest.raises(DataError, match=r"roles.bin holds role id 9 .*first at index 2; re-run"):
        shards.check_split(tmp_path / "s", vocab_size=251)


def test_scan_finds_the_first_bad_id_across_chunks(monkeypatch):
    monkeypatch.setattr(shards, "SCAN_CHUNK", 4)
    values = np.zeros(11, "<u2")
    assert shards.first_out_of_range(values, 1) is None
    values[[6, 9]] = [70, 80]
    assert shards.first_out_of_range(values, 50) == (6, 70)
    signed = np.zeros(11, "<i4")
    signed[5] = -3
    assert shards.first_out_of_range(signed, 50) == (5, -3)


@pytest.mark.parametrize(
    "offsets, problem",
    [
        ([0, 5, 10000, 12, 20], r"offset 2 is 10000, past the end of the data \(20 tokens"),
        ([0, 12, 5, 20, 20], r"offset 2 is 5, below offset 1 \(12\): sample 1 would have"),
        ([3, 5, 10, 12, 20], "offset 0 is 3, not 0"),
        ([0, 5, 10, 12, 19], r"the last offset \(4\) is 19, but the data holds 20 tokens"),
    ],
)
def test_offsets_out_of_order_or_past_the_end_are_refused_on_open(tmp_path, offsets, problem):
    """offsets.bin of the right size whose offsets go back or past tokens.bin: one line
    naming the file and the first bad index when the split is opened (not at a step)."""
    _write(tmp_path / "s", [(np.arange(5), np.ones(5, np.uint8))] * 4)
    index = tmp_path / "s" / shards.OFFSETS_FILE
    index.write_bytes(np.array(offsets, "<i8").tobytes())
    with pytest.raises(DataError, match=problem) as err:
        shards.ShardDataSource(tmp_path / "s")
    assert str(err.value).startswith(f"{index}: ") and "\n" not in str(err.value)


def test_check_split_checks_the_tokenizer_of_the_split(tmp_path, sp_model_path):
    tok = Tokenizer(sp_model_path)
    other = Tokenizer(sp_model_path, megatron_new_tokens=True)
    _write(tmp_path / "s", _samples(2), meta={"tokenizer": shards.tokenizer_identity(tok)})
    shards.check_split(tmp_path / "s", vocab_size=tok.vocab_size, tokenizer=tok)
    with pytest.raises(DataError, match="another tokenizer"):
        shards.check_split(tmp_path / "s", vocab_size=other.vocab_size, tokenizer=other)


# ----------------------------------------------------------------------------- Megatron format


def _mega(path, samples, vocab=300, meta=None):
    with megatron.MegatronSplitWriter(path, vocab_size=vocab) as w:
        for tokens, roles in samples:
            w.add_batch(tokens, roles, np.array([len(tokens)]))
        return w.commit(meta or {})


def _idx_spec(path):
    """The ``.idx`` decoded from the format as megatron-core's ``_IndexReader`` reads it."""
    raw = path.read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, d = struct.unpack("<QBQQ", raw[9:34])
    sizes = np.frombuffer(raw, "<i4", n, 34)
    pointers = np.frombuffer(raw, "<i8", n, 34 + 4 * n)
    doc_idx = np.frombuffer(raw, "<i8", d, 34 + 12 * n)
    assert len(raw) == 34 + 12 * n + 8 * d
    return version, code, sizes, pointers, doc_idx


@pytest.mark.parametrize("vocab, code, dtype", [(32007, 8, "<u2"), (65500, 4, "<i4")])
def test_megatron_files_follow_the_format(tmp_path, vocab, code, dtype):
    samples = [
        (np.array([1, vocab - 1, 5]), np.array([1, 2, 2])),
        (np.array([7, 8]), np.array([0, 3])),
    ]
    meta = _mega(tmp_path / "p-train", samples, vocab=vocab, meta={"split": "train"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "p-train-metadata.json", "p-train-role.bin", "p-train-role.idx",
        "p-train-text.bin", "p-train-text.idx",
    ]  # fmt: skip
    version, text_code, sizes, pointers, doc_idx = _idx_spec(tmp_path / "p-train-text.idx")
    assert (version, text_code) == (1, code)
    assert sizes.tolist() == [3, 2] and doc_idx.tolist() == [0, 1, 2]
    assert pointers.tolist() == [0, 3 * np.dtype(dtype).itemsize]
    text = np.frombuffer((tmp_path / "p-train-text.bin").read_bytes(), dtype)
    assert text.tolist() == [1, vocab - 1, 5, 7, 8]
    assert _idx_spec(tmp_path / "p-train-role.idx")[1] == 8  # roles: uint16
    assert np.frombuffer((tmp_path / "p-train-role.bin").read_bytes(), "<u2").tolist() == [
        1,
        2,
        2,
        0,
        3,
    ]
    assert (meta["num_samples"], meta["max_token_id"], meta["split"]) == (2, vocab - 1, "train")


def test_megatron_round_trip_equals_shards(tmp_path):
    samples = _samples(9)
    _write(tmp_path / "p-train", samples)
    _mega(tmp_path / "m" / "p-train", samples)
    ours, mega = (
        shards.ShardDataSource(tmp_path / "p-train"),
        megatron.MegatronDataSource(tmp_path / "m" / "p-train"),
    )
    assert len(mega) == len(ours) == 9 and mega.lengths().tolist() == ours.lengths().tolist()
    for i in range(len(ours)):
        for key in ("tokens", "roles"):
            assert mega[i][key].dtype == ours[i][key].dtype
            np.testing.assert_array_equal(mega[i][key], ours[i][key])
    again = pickle.loads(pickle.dumps(mega))
    assert len(pickle.dumps(mega)) < 2000
    np.testing.assert_array_equal(again[4]["tokens"], samples[4][0])
    with pytest.raises(IndexError):
        mega[9]


def test_upstream_written_split_is_read(tmp_path):
    """Upstream's pretokenizer never ends a document (document index ``[0]``) and writes
    no metadata of ours: read all the same, checked by a pass over its tokens."""
    samples = _samples(4)
    for feature, dtype, col in (("text", "<u2", 0), ("role", "<u2", 1)):
        values = np.concatenate([s[col] for s in samples]).astype(dtype)
        (tmp_path / f"up-val-{feature}.bin").write_bytes(values.tobytes())
        megatron.write_index(
            tmp_path / f"up-val-{feature}.idx", np.dtype(dtype), [len(s[0]) for s in samples], [0]
        )
    src = outputs.open_source(tmp_path, "up", "val")
    assert isinstance(src, megatron.MegatronDataSource) and src.metadata is None
    for i, (tokens, roles) in enumerate(samples):
        np.testing.assert_array_equal(src[i]["tokens"], tokens)
        np.testing.assert_array_equal(src[i]["roles"], roles)
    top = int(max(s[0].max() for s in samples if len(s[0])))
    outputs.check_source(tmp_path, "up", "val", vocab_size=top + 1)
    with pytest.raises(DataError, match=f"token id {top} but the model has only {top} ids"):
        outputs.check_source(tmp_path, "up", "val", vocab_size=top)


def _rewrite_index(idx, sizes=None, pointers=None):
    """``idx`` with its sizes / pointers replaced (same length: only the values lie)."""
    version, code, old_sizes, old_pointers, doc_idx = _idx_spec(idx)
    with open(idx, "wb") as f:
        head = struct.pack("<QBQQ", version, code, len(old_sizes), len(doc_idx))
        f.write(b"MMIDIDX\x00\x00" + head)
        f.write(np.asarray(old_sizes if sizes is None else sizes, "<i4").tobytes())
        f.write(np.asarray(old_pointers if pointers is None else pointers, "<i8").tobytes())
        f.write(doc_idx.tobytes())


def test_megatron_index_and_ids_are_checked_against_the_data(tmp_path):
    """The .idx of a Megatron split must describe its .bin: sequences back to back from
    byte 0 (a pointer going back, a negative size, an end past the file: one line naming
    the .idx or .bin and the first bad sequence), and every id of the .bin is scanned
    whatever our metadata says."""
    samples = [(np.arange(1, 6), np.full(5, 2)), (np.arange(3), np.ones(3))]
    samples.append((np.arange(4), np.ones(4)))
    _mega(tmp_path / "p-train", samples)
    megatron.check_split(tmp_path / "p-train", vocab_size=6)
    idx = tmp_path / "p-train-text.idx"
    _rewrite_index(idx, pointers=[0, 10, 2])
    problem = r"text.idx: pointer 2 is byte 2, not 16 where sequence 1 ends"
    with pytest.raises(DataError, match=problem):
        megatron.MegatronDataSource(tmp_path / "p-train")
    _rewrite_index(idx, sizes=[5, -3, 4], pointers=[0, 10, 4])
    problem = r"text.idx holds sequence length -3 \(negative\), first at index 1"
    with pytest.raises(DataError, match=problem):
        megatron.MegatronDataSource(tmp_path / "p-train")
    _rewrite_index(idx, sizes=[5, 3, 400], pointers=[0, 10, 16])
    problem = r"text.bin: .*: sequence 2 ends at byte 816, past the end of the file \(24 bytes\)"
    with pytest.raises(DataError, match=problem):
        megatron.MegatronDataSource(tmp_path / "p-train")
    _rewrite_index(idx, sizes=[5, 3, 4], pointers=[0, 10, 16])
    text = tmp_path / "p-train-text.bin"
    values = np.frombuffer(text.read_bytes(), "<u2").copy()
    values[7] = 40000
    text.write_bytes(values.tobytes())
    assert json.loads((tmp_path / "p-train-metadata.json").read_text())["max_token_id"] == 5
    problem = r"text.bin holds token id 40000 but the model has only 6 ids .*first at index 7"
    with pytest.raises(DataError, match=problem):
        outputs.check_source(tmp_path, "p", "train", vocab_size=6)


def test_open_source_prefers_shards_and_names_missing_splits(tmp_path):
    samples = _samples(3)
    _mega(tmp_path / "p-train", samples)
    assert outputs.split_format(tmp_path, "p", "train") == "megatron"
    _write(tmp_path / "p-train", samples[:2])
    assert outputs.split_format(tmp_path, "p", "train") == "oasst_jax"
    assert len(outputs.open_source(tmp_path, "p", "train")) == 2
    with pytest.raises(DataError, match="p-val has no metadata.json and no Megatron files") as err:
        outputs.open_source(tmp_path, "p", "val")
    assert "\n" not in str(err.value)


def test_megatron_damaged_or_empty_split_is_refused(tmp_path):
    _mega(tmp_path / "e-train", [])
    with pytest.raises(DataError, match="empty split"):
        megatron.MegatronDataSource(tmp_path / "e-train")
    _mega(tmp_path / "p-train", _samples(3))
    text = tmp_path / "p-train-text.bin"
    text.write_bytes(text.read_bytes()[:-2])
    with pytest.raises(DataError, match="p-train-text.bin: missing or not the size"):
        megatron.MegatronDataSource(tmp_path / "p-train")
    _mega(tmp_path / "q-train", _samples(3))
    _mega(tmp_path / "r-train", _samples(3, seed=5))
    (tmp_path / "r-train-role.idx").replace(tmp_path / "q-train-role.idx")
    with pytest.raises(DataError, match="different sample lengths"):
        megatron.MegatronDataSource(tmp_path / "q-train")[0]
    _mega(tmp_path / "s-train", _samples(3))
    meta = json.loads((tmp_path / "s-train-metadata.json").read_text())
    (tmp_path / "s-train-metadata.json").write_text(json.dumps({**meta, "num_tokens": 1}))
    with pytest.raises(DataError, match="s-train-metadata.json describes other files"):
        megatron.MegatronDataSource(tmp_path / "s-train")
    idx = tmp_path / "q-train-text.idx"
    idx.write_bytes(b"TNTIDX\x00\x00" + idx.read_bytes()[8:])
    with pytest.raises(DataError, match="not a Megatron mmap index"):
        megatron.MegatronDataSource(tmp_path / "q-train")


def test_megatron_failed_write_leaves_nothing(tmp_path):
    _mega(tmp_path / "p-train", _samples(3))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        with megatron.MegatronSplitWriter(tmp_path / "p-train", vocab_size=300) as w:
            w.add_batch(np.array([1]), np.array([2]), np.array([1]))
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_megatron_split_tokenizer_checks(tmp_path, sp_model_path):
    """Our Megatron splits carry the tokenizer fingerprint; upstream's are checked against
    the directory's special_tokens.json (which names the id layout)."""
    tok = Tokenizer(sp_model_path)
    mega_tok = Tokenizer(sp_model_path, megatron_new_tokens=True)
    _mega(tmp_path / "p-train", _samples(2), meta={"tokenizer": shards.tokenizer_identity(tok)})
    outputs.check_source(tmp_path, "p", "train", vocab_size=tok.vocab_size, tokenizer=tok)
    with pytest.raises(DataError, match="another tokenizer"):
        outputs.check_source(tmp_path, "p", "train", mega_tok.vocab_size, mega_tok)
    (tmp_path / "p-train-metadata.json").unlink()  # as upstream's tool leaves it
    megatron.write_special_tokens(tmp_path, mega_tok)
    assert (tmp_path / "special_tokens.json").read_text() == json.dumps(mega_tok.special_tokens())
    outputs.check_source(tmp_path, "p", "train", mega_tok.vocab_size, mega_tok)
    with pytest.raises(DataError, match="other special-token ids") as err:
        outputs.check_source(tmp_path, "p", "train", tok.vocab_size, tok)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- ranked splits


def _ranked(path, examples, vocab=300):
    with shards.RankedShardWriter(path, vocab_size=vocab) as w:
        for pieces in examples:
            w.add_example(pieces)
        return w.commit({"split": "train"})


def test_ranked_round_trip_pickle_and_layout_checks(tmp_path):
    """rm examples (prefix + replies) read back as written, also after pickling; a plain
    reader refuses a ranked split and the ranked reader a plain one; nothing is left by a
    write that does not commit; a damaged examples.bin is one line."""
    pieces = _samples(9, vocab=300)
    pieces = [p for p in pieces if p[0].size]  # prefixes and replies are never empty
    examples = [pieces[:3], pieces[3:7]]
    meta = _ranked(tmp_path / "r-train", examples)
    assert (meta["layout"], meta["num_examples"], meta["num_samples"]) == ("ranked", 2, 7)
    src = pickle.loads(pickle.dumps(shards.RankedDataSource(tmp_path / "r-train")))
    assert len(src) == 2 and src.num_replies().tolist() == [2, 3]
    for i, ex in enumerate(examples):
        item = src[i]
        np.testing.assert_array_equal(item["prefix_tokens"], ex[0][0])
        np.testing.assert_array_equal(item["prefix_roles"], ex[0][1])
        for (tokens, roles), got, got_roles in zip(
            ex[1:], item["reply_tokens"], item["reply_roles"], strict=True
        ):
            np.testing.assert_array_equal(got, tokens)
            np.testing.assert_array_equal(got_roles, roles)
    with pytest.raises(DataError, match="holds rm examples .*not the 'sft' layout"):
        outputs.open_source(tmp_path, "r", "train")
    _write(tmp_path / "p-train", pieces)
    with pytest.raises(DataError, match="holds sft samples .*not the 'ranked' layout"):
        shards.RankedDataSource(tmp_path / "p-train")
    with pytest.raises(ValueError, match="a prefix and at least two replies"):
        _ranked(tmp_path / "bad", [pieces[:2]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p-train", "r-train"]
    examples_file = tmp_path / "r-train" / shards.EXAMPLES_FILE
    examples_file.write_bytes(np.array([0, 5, 7], "<i8").tobytes())
    with pytest.raises(DataError, match="examples.bin: example 1 has 2 samples, not a prefix"):
        shards.RankedDataSource(tmp_path / "r-train")
    examples_file.write_bytes(np.array([0, 9, 7], "<i8").tobytes())
    with pytest.raises(DataError, match="examples.bin: offset 1 is 9, past the end of the data"):
        shards.RankedDataSource(tmp_path / "r-train")
    examples_file.write_bytes(np.array([0, 3], "<i8").tobytes())
    with pytest.raises(DataError, match="examples.bin has the wrong size"):
        shards.RankedDataSource(tmp_path / "r-train")[0]
