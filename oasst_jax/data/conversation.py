"""The conversation types every dataset loader returns.

A loader turns one upstream dataset into a list of :class:`Sample` (a conversation of
role-tagged turns, :class:`oasst_jax.turns.Turn`) plus a counter of the records it skipped
and why, so the pretokenizer can report drops instead of crashing on bad input.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from oasst_jax.turns import Turn


@dataclass(frozen=True)
class Sample:
    """One training conversation.

    ``group`` is the split unit: samples sharing a group always land in the same
    train/val split (oasst: the ``message_tree_id``, so threads of one tree never
    straddle splits; other datasets: a unique per-record key).
    """

    turns: tuple[Turn, ...]
    group: str


@dataclass
class LoadResult:
    """A loaded dataset: display ``name`` (stats header), samples, and skip reasons.

    How upstream splits it into train/val (``custom_datasets/__init__.py``):

    - ``upstream_split="train_val_dataset"``: sklearn ``train_test_split(test_size=
      val_split)`` over the samples, the validation share rounded up; both parts are torch
      ``Subset``s (the stats file prints ``Subset of {name}``), no val part at val_split 0;
    - ``"random_split"`` (oasst export): torch ``random_split([1 - val_split, val_split])``
      over ``groups``, the validation share rounded down; both parts are ``ListDataset``s.

    ``groups`` lists every split unit in order, also those that yield no sample (oasst:
    each tree that passed the tree filter); ``None``: the samples' own groups.
    """

    name: str
    samples: list[Sample]
    skipped: collections.Counter = field(default_factory=collections.Counter)
    groups: list[str] | None = None
    upstream_split: str = "train_val_dataset"
