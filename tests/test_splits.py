"""Train/val splits of a dataset (``oasst_jax.data.splits``): counts, groups, seeds,
upstream's rounding."""

import math

import numpy as np

from oasst_jax.data.conversation import Sample
from oasst_jax.data.sources import load_dataset
from oasst_jax.data.splits import dataset_rng, split_dataset, split_parts
from oasst_jax.turns import Turn


def _samples(n_groups, per_group=1):
    return [
        Sample((Turn("user", f"q{g}.{k}"), Turn("assistant", f"a{g}.{k}")), f"g{g}")
        for g in range(n_groups)
        for k in range(per_group)
    ]


def _split(samples, seed=0, **kw):
    kw = {"val_split": 0.2, "max_val_set": None, "fraction": 1.0, **kw}
    return split_dataset(samples, rng=dataset_rng(seed, "x"), **kw)


def test_val_split_counts_and_partition():
    samples = _samples(101)
    train, val = _split(samples, val_split=0.05)
    assert len(val) == math.ceil(0.05 * 101) == 6
    assert len(train) == 95
    assert sorted(s.group for s in train + val) == sorted(s.group for s in samples)


def test_groups_never_straddle_splits():
    samples = _samples(40, per_group=3)
    train, val = _split(samples, val_split=0.25)
    assert {s.group for s in train}.isdisjoint({s.group for s in val})
    assert len(val) == 3 * math.ceil(0.25 * 40)


def test_oasst_trees_never_straddle_splits():
    result = load_dataset("oasst_export", {"input_file_path": "tests/data/oasst_ready.tar.gz",
                                           "lang": "en,de,es,fr", "top_k": None})  # fmt: skip
    assert len({s.group for s in result.samples}) < len(result.samples)  # trees with branches
    train, val = _split(result.samples, val_split=0.5)
    assert val and train
    assert {s.group for s in train}.isdisjoint({s.group for s in val})


def test_max_val_set_and_fraction_counts():
    samples = _samples(1000)
    train, val = _split(samples, val_split=0.1, max_val_set=30, fraction=0.5)
    assert len(val) == 30
    assert len(train) == int(900 * 0.5) == 450
    assert len({s.group for s in train}) == 450  # without replacement
    order = {s.group: i for i, s in enumerate(samples)}
    assert [order[s.group] for s in train] == sorted(order[s.group] for s in train)


def test_splits_are_seeded():
    samples = _samples(200)
    a, b, c = _split(samples, fraction=0.3), _split(samples, fraction=0.3), _split(samples, 1)
    assert a == b and a != c


def test_zero_val_split():
    train, val = _split(_samples(10), val_split=0.0)
    assert len(train) == 10 and val == []


def test_oasst_val_is_floor_of_all_accepted_trees():
    """Upstream: torch ``random_split`` of every tree that passed the tree filter (trees
    without a thread included), ``floor(val_split * n)`` to val; sklearn's ``ceil`` for
    the other datasets."""
    result = load_dataset("oasst_export", {"input_file_path": "tests/data/oasst_ready.tar.gz",
                                           "lang": "en,de,es,fr", "top_k": 1})  # fmt: skip
    assert len(result.groups) == 7 and len({s.group for s in result.samples}) == 4
    for val_split, n_val in ((0.2, 1), (0.3, 2), (0.42, 2), (0.99, 6)):
        for seed in range(5):
            parts = split_parts(
                result.samples, val_split=val_split, max_val_set=None, fraction=1.0,
                rng=dataset_rng(seed, "oasst_export"), groups=result.groups, rounding="floor",
            )  # fmt: skip
            assert {s.group for s in parts.train}.isdisjoint(s.group for s in parts.val)
            assert len(parts.train) + len(parts.val) == len(result.samples)
            # the val trees are n_val of the 7, so at most n_val of the 4 with threads
            assert len({s.group for s in parts.val}) <= n_val
    trees_in_val = set()
    for seed in range(40):  # every tree, threadless ones included, can be drawn for val
        rng = dataset_rng(seed, "oasst_export")
        trees_in_val |= set(np.array(result.groups)[rng.permutation(7)[:1]])
    assert trees_in_val == set(result.groups)
    assert len(_split(_samples(19), val_split=0.1)[1]) == math.ceil(0.1 * 19) == 2
