"""The input pipeline (oasst_jax/data/pipeline.py): its batches are those of the grain pipeline
it replaced (grain's shuffle and first-fit packing), planned from the samples' lengths; with
H hosts each reads only its rows' samples and together they hold the one-host batch; the state
resumes bit-exactly (also from a grain pipeline's state); a split with no sample long enough for
one example is refused in one line instead of the repeating pipeline spinning forever."""

import dataclasses
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
from conftest import REPO
from grain import experimental as grain_exp

from oasst_jax.data import pipeline, shards
from oasst_jax.turns import DataError

CFG = pipeline.PipelineConfig(seq_length=8, rows_per_batch=2, num_threads=1)


def _mask(roles, tokens):
    del tokens
    return (np.asarray(roles) == 2).astype(np.uint8)


class ListSource:
    """A random-access source over in-memory samples (no ``lengths()``); counts its reads."""

    def __init__(self, lengths, seed=0):
        rs = np.random.RandomState(seed)
        self.samples = [
            {"tokens": rs.randint(1, 100, n).astype(np.int32), "roles": rs.randint(1, 3, n)}
            for n in lengths
        ]
        self.reads = []

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.samples[i]


class LengthsSource(ListSource):
    """... with ``lengths()``, as our shards and Megatron splits."""

    def lengths(self):
        return np.array([len(s["tokens"]) for s in self.samples])


def _shards(tmp_path, lengths):
    path = tmp_path / "p-train"
    with shards.ShardWriter(path, vocab_size=100) as w:
        for n in lengths:
            w.add(np.arange(1, n + 1), np.full(n, 2))
        w.commit({})
    return shards.ShardDataSource(path)


def _grain_batches(source, cfg, repeat):
    """The grain pipeline this module replaced (shuffle, repeat, example, filter, first-fit
    pack or pad, batch), kept here as the reference its batches must equal."""

    def pad(e):
        n = len(e["inputs"])
        out = {k: np.pad(v, (0, cfg.seq_length - n)) for k, v in e.items()}
        out["segment_ids"] = (np.arange(cfg.seq_length) < n).astype(np.int32)
        out["positions"] = np.arange(cfg.seq_length, dtype=np.int32)
        return out

    def rename(row):
        out = {k: row[k] for k in pipeline.FIELDS}
        out["segment_ids"] = row["inputs_segment_ids"].astype(np.int32)
        out["positions"] = row["inputs_positions"].astype(np.int32)
        return out

    ds = grain.MapDataset.source(source)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map(lambda s: pipeline.make_example(s, cfg.seq_length, _mask))
    it = ds.filter(lambda e: len(e["inputs"]) > 0).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    )
    if cfg.packing:
        it = grain_exp.FirstFitPackIterDataset(
            it,
            length_struct={k: cfg.seq_length for k in pipeline.FIELDS},
            num_packing_bins=cfg.num_packing_bins,
            seed=cfg.seed,
            shuffle_bins=False,
        ).map(rename)
    else:
        it = it.map(pad)
    return iter(it.batch(cfg.rows_per_batch, drop_remainder=True))


def _equal(a, b):
    assert sorted(a) == sorted(b) == sorted(pipeline.BATCH_FIELDS)
    for k in pipeline.BATCH_FIELDS:
        assert a[k].dtype == b[k].dtype == pipeline.BATCH_DTYPES[k], k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# lengths: one-token samples (no example), samples longer than a row, many that pack together
LENGTHS = [1, 5, 9, 3, 12, 2, 7, 4, 1, 6, 8, 3, 10, 2, 5, 4, 9, 0, 3, 6, 2, 11, 7, 5]


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"num_packing_bins": 1},
        {"num_packing_bins": 16, "rows_per_batch": 3},
        {"packing": False},
        {"shuffle": False, "num_packing_bins": 3},
        {"seed": 7, "seq_length": 5, "rows_per_batch": 4},
    ],
)
@pytest.mark.parametrize("repeat", [True, False])
def test_batches_are_the_grain_pipelines(change, repeat):
    """Row for row (two epochs or more when repeating): the order is grain's shuffle, the packing
    grain's first fit; so a run's batches (and the demo's losses) did not move."""
    cfg = dataclasses.replace(CFG, **{"num_packing_bins": 4, **change})
    want = _grain_batches(ListSource(LENGTHS), cfg, repeat)
    got = pipeline.Batches(LengthsSource(LENGTHS), cfg, _mask, repeat=repeat)
    n = 0
    for b in got:
        _equal(b, next(want))
        seg = b["segment_ids"]  # the plan's statistics describe the batch read
        starts = (seg > 0) & np.concatenate([seg[:, :1] > -1, seg[:, 1:] != seg[:, :-1]], 1)
        assert got.stats == {"packing_efficiency": np.mean(seg > 0), "samples": starts.sum()}
        n += 1
        if n == len(LENGTHS):  # 24 batches: two epochs or more
            break
    else:
        assert next(want, None) is None  # one pass: the same number of batches
    assert n > 2


@pytest.mark.parametrize("hosts", [1, 2, 4])
@pytest.mark.parametrize("packing", [True, False])
def test_each_host_reads_only_its_rows(hosts, packing):
    """H hosts, each holding a contiguous block of rows (the batch axis split over
    processes), read only the samples of their rows; stacked, they are the one-host batch,
    and their statistics (the global batch's) and states are equal."""
    cfg = dataclasses.replace(CFG, rows_per_batch=8, seq_length=16, packing=packing)
    one = pipeline.Batches(LengthsSource(LENGTHS), cfg, _mask)
    per = 8 // hosts
    sources = [LengthsSource(LENGTHS) for _ in range(hosts)]
    parts = [
        pipeline.Batches(s, cfg, _mask, rows=np.arange(h * per, (h + 1) * per))
        for h, s in enumerate(sources)
    ]
    for _ in range(5):
        want = next(one)
        got = [next(p) for p in parts]
        _equal({k: np.concatenate([g[k] for g in got]) for k in want}, want)
        assert all(p.stats == one.stats and p.get_state() == one.get_state() for p in parts)
    read_here = [len(s.reads) for s in sources]
    assert sum(read_here) == len(one.source.reads)
    if hosts > 1:
        assert max(read_here) < len(one.source.reads)  # each reads a share


@pytest.mark.parametrize("threads", [1, 2])
def test_resume_is_bit_exact(threads):
    """A new iterator set to a saved state gives the batches the first one goes on to give
    (reading ahead in threads or not), and a grain pipeline's saved state resumes here."""
    cfg = dataclasses.replace(CFG, num_threads=threads, prefetch=3, num_packing_bins=4)
    it = pipeline.Batches(LengthsSource(LENGTHS), cfg, _mask)
    ref = _grain_batches(ListSource(LENGTHS), cfg, repeat=True)
    for _ in range(7):
        next(it), next(ref)
    state, grain_state = it.get_state(), ref.get_state()
    assert state == {"position": state["position"], "row": state["row"]}
    later = [next(it) for _ in range(6)]
    for saved in (state, grain_state):
        again = pipeline.Batches(LengthsSource(LENGTHS), cfg, _mask)
        next(again)  # somewhere else first
        again.set_state(saved)
        assert again.get_state() == state
        for want in later:
            _equal(next(again), want)


@pytest.mark.parametrize("repeat", [True, False])
def test_split_of_one_token_samples_is_refused(tmp_path, repeat):
    source = _shards(tmp_path, [1, 1, 1])
    with pytest.raises(DataError, match="p-train: none of its 3 samples has 2 or more tokens"):
        pipeline.Batches(source, CFG, _mask, repeat=repeat)
    with pytest.raises(DataError, match="ListSource: none of its 2 samples") as err:
        pipeline.Batches(ListSource([1, 0]), CFG, _mask, repeat=repeat)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("make", [ListSource, None])
def test_one_usable_sample_is_enough(tmp_path, make):
    """Short samples are still dropped one by one; the rest cycles through epochs."""
    lengths = [1, 5, 1]
    source = make(lengths) if make else _shards(tmp_path, lengths)
    it = pipeline.Batches(source, CFG, _mask)
    assert next(it)["inputs"].shape == (2, 8)
    assert it.stats["samples"] >= 2  # the one 5-token sample, repeated


@pytest.mark.parametrize("packing", [True, False])
def test_batches_hold_the_batch_fields(packing):
    """Packed or padded, a batch is :data:`~oasst_jax.data.pipeline.BATCH_FIELDS` of their
    ``BATCH_DTYPES`` and ``batch_shape``: the definition the loop and the planner read."""
    cfg = dataclasses.replace(CFG, packing=packing)
    batch = next(pipeline.Batches(ListSource([3, 5, 9, 4]), cfg, _mask))
    assert sorted(batch) == sorted(pipeline.BATCH_FIELDS)
    for k, dtype in pipeline.BATCH_DTYPES.items():
        assert batch[k].dtype == dtype and batch[k].shape == pipeline.batch_shape(2, 8), k
    assert pipeline.batch_shape(2, 8, accumulation=4) == (4, 2, 8)


class _Sharding:
    """A stand-in for a process's view of a ``jax.sharding.Sharding``: its devices' slices."""

    def __init__(self, indices):
        self.indices = indices

    def addressable_devices_indices_map(self, shape):
        del shape
        return dict(enumerate(self.indices))


def test_host_rows_and_the_row_reader():
    """The rows a process's devices hold (accumulation x rows flattened, a row split along
    its length counted whole), and the callback that hands each device its slice of them."""
    shape = (2, 4, 6)  # accumulation 2, 4 rows, length 6
    held = _Sharding(
        [(slice(None), slice(2, 4), slice(0, 3)), (slice(None), slice(2, 4), slice(3, 6))]
    )
    rows = pipeline.host_rows(held, shape)
    np.testing.assert_array_equal(rows, [2, 3, 6, 7])
    full = np.arange(8 * 6).reshape(8, 6)
    read = pipeline.row_reader(full[rows], rows, shape)
    index = (slice(None), slice(2, 4), slice(3, 6))
    np.testing.assert_array_equal(read(index), full.reshape(shape)[index])
    with pytest.raises(ValueError, match=r"rows \[0 1 4 5\] were not read on this host"):
        read((slice(None), slice(0, 2), slice(None)))
    every = pipeline.row_reader(full, None, shape)
    np.testing.assert_array_equal(every(index), full.reshape(shape)[index])


def test_all_filtered_split_does_not_hang():
    """The whole scenario in a subprocess with a deadline: before the check, a repeating
    pipeline over samples that all fall out looped forever with only a warning."""
    code = textwrap.dedent(
        """
        import numpy as np
        from oasst_jax.data import pipeline
        samples = [{"tokens": np.array([7], np.int32), "roles": np.array([2], np.uint8)}] * 4
        cfg = pipeline.PipelineConfig(seq_length=8, rows_per_batch=2, num_threads=1)
        try:
            next(pipeline.Batches(samples, cfg, lambda roles, tokens: roles))
        except ValueError as e:
            print("refused:", e)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused: list: none of its 4 samples has 2 or more tokens")
