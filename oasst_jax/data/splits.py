"""A dataset's train/val split, the val cap and the train fraction, seeded per dataset.

In this order (upstream ``custom_datasets/__init__.py``):

1. ``val_split``: a seeded shuffle of the *groups* (:attr:`Sample.group`), the first
   ``n_val`` go to val, so samples of one group never straddle splits.  oasst splits every
   message tree that passed the tree filter (those yielding no thread included) with
   ``n_val = floor(val_split * n_trees)`` (torch ``random_split``, ``rounding="floor"``); the
   other datasets split their records with ``n_val = ceil(val_split * n)`` (sklearn
   ``train_test_split``);
2. ``max_val_set`` (unset or 0: no cap, as upstream): a seeded subset of val of that many
   samples, drawn without replacement;
3. ``fraction``: a seeded subset of ``int(len(train) * fraction)`` train samples.

Each dataset has its own RNG seeded by ``(seed, crc32(name))`` (:func:`dataset_rng`), so
editing one dataset of a mix does not reshuffle the others; samples keep their loader order
inside a split.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oasst_jax.data.conversation import Sample


def dataset_rng(seed: int, name: str) -> np.random.Generator:
    """The RNG of one dataset, independent of the other datasets of the mix."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


@dataclass
class Split:
    """One dataset's train and val parts, and whether ``fraction`` / ``max_val_set`` drew
    from them (upstream then wraps them in another ``Subset``: stats titles)."""

    train: list[Sample]
    val: list[Sample]
    train_subsampled: bool = False
    val_capped: bool = False


def split_parts(
    samples: Sequence[Sample],
    *,
    val_split: float,
    max_val_set: int | None,
    fraction: float,
    rng: np.random.Generator,
    groups: Sequence[str] | None = None,
    rounding: str = "ceil",
) -> Split:
    """Split by group, then the val cap, then the train fraction (module doc).  ``groups``:
    every split unit in order, also those without a sample (default: the samples')."""
    units = list(dict.fromkeys(s.group for s in samples) if groups is None else groups)
    units = list(dict.fromkeys(units))
    share = val_split * len(units)
    n_val = min(len(units), math.floor(share) if rounding == "floor" else math.ceil(share))
    val_groups = {units[i] for i in rng.permutation(len(units))[:n_val]}
    out = Split(
        train=[s for s in samples if s.group not in val_groups],
        val=[s for s in samples if s.group in val_groups],
    )
    if max_val_set and len(out.val) > max_val_set:
        out.val, out.val_capped = _subset(out.val, max_val_set, rng), True
    if fraction < 1.0 and int(len(out.train) * fraction) < len(out.train):
        out.train = _subset(out.train, int(len(out.train) * fraction), rng)
        out.train_subsampled = True
    return out


def split_dataset(samples: Sequence[Sample], **kwargs: Any) -> tuple[list[Sample], list[Sample]]:
    """``(train, val)`` of :func:`split_parts`."""
    parts = split_parts(samples, **kwargs)
    return parts.train, parts.val


def _subset(samples: list[Sample], size: int, rng: np.random.Generator) -> list[Sample]:
    """A seeded random subset without replacement, in the original order."""
    return [samples[i] for i in np.sort(rng.choice(len(samples), size, replace=False))]
