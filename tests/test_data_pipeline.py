"""The grain input pipeline (oasst_jax/data/pipeline.py): a split with no sample long enough
for one example is refused in one line instead of the repeating pipeline spinning forever;
batches hold the batch fields; samples are counted per packed row."""

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO

from oasst_jax.data import pipeline, shards
from oasst_jax.turns import DataError

CFG = pipeline.PipelineConfig(seq_length=8, rows_per_batch=2, num_threads=1)


def _mask(roles, tokens):
    del tokens
    return (np.asarray(roles) == 2).astype(np.uint8)


class ListSource:
    """A grain random-access source over in-memory samples (no ``lengths()``)."""

    def __init__(self, lengths):
        self.samples = [
            {"tokens": np.arange(1, n + 1, dtype=np.int32), "roles": np.full(n, 2, np.uint8)}
            for n in lengths
        ]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def _shards(tmp_path, lengths):
    path = tmp_path / "p-train"
    with shards.ShardWriter(path, vocab_size=100) as w:
        for n in lengths:
            w.add(np.arange(1, n + 1), np.full(n, 2))
        w.commit({})
    return shards.ShardDataSource(path)


@pytest.mark.parametrize("repeat", [True, False])
def test_split_of_one_token_samples_is_refused(tmp_path, repeat):
    source = _shards(tmp_path, [1, 1, 1])
    with pytest.raises(DataError, match="p-train: none of its 3 samples has 2 or more tokens"):
        pipeline.build_dataset(source, CFG, _mask, repeat=repeat)
    with pytest.raises(DataError, match="ListSource: none of its 2 samples") as err:
        pipeline.build_dataset(ListSource([1, 0]), CFG, _mask, repeat=repeat)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("make", [ListSource, None])
def test_one_usable_sample_is_enough(tmp_path, make):
    """Short samples are still dropped one by one; the rest cycles through epochs."""
    lengths = [1, 5, 1]
    source = make(lengths) if make else _shards(tmp_path, lengths)
    batch = next(iter(pipeline.build_dataset(source, CFG, _mask)))
    assert batch["inputs"].shape == (2, 8)
    assert pipeline.samples_in_batch(batch) >= 2  # the one 5-token sample, repeated


@pytest.mark.parametrize("packing", [True, False])
def test_batches_hold_the_batch_fields(packing):
    """Packed or padded, a batch is :data:`~oasst_jax.data.pipeline.BATCH_FIELDS` of their
    ``BATCH_DTYPES`` and ``batch_shape``: the definition the loop and the planner read."""
    cfg = dataclasses.replace(CFG, packing=packing)
    batch = next(iter(pipeline.build_dataset(ListSource([3, 5, 9, 4]), cfg, _mask)))
    assert sorted(batch) == sorted(pipeline.BATCH_FIELDS)
    for k, dtype in pipeline.BATCH_DTYPES.items():
        assert batch[k].dtype == dtype and batch[k].shape == pipeline.batch_shape(2, 8), k
    assert pipeline.batch_shape(2, 8, accumulation=4) == (4, 2, 8)


def test_all_filtered_split_does_not_hang():
    """The whole scenario in a subprocess with a deadline: before the check, grain's filter
    under ``repeat(None)`` looped forever with only a warning."""
    code = textwrap.dedent(
        """
        import numpy as np
        from oasst_jax.data import pipeline
        samples = [{"tokens": np.array([7], np.int32), "roles": np.array([2], np.uint8)}] * 4
        cfg = pipeline.PipelineConfig(seq_length=8, rows_per_batch=2, num_threads=1)
        try:
            next(iter(pipeline.build_dataset(samples, cfg, lambda roles, tokens: roles)))
        except ValueError as e:
            print("refused:", e)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused: list: none of its 4 samples has 2 or more tokens")


def test_samples_in_batch_counts_segments():
    from oasst_jax.data.pipeline import samples_in_batch

    seg = np.array([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert samples_in_batch({"segment_ids": seg}) == 4
