"""grain input pipeline: pretokenized samples -> packed, batched training rows.

Per sample (Megatron-LLM's ``instruction_dataset``): keep the first
``seq_length + 1`` tokens (the tail of a long answer is lost, as upstream), then
``inputs = tokens[:-1]``, ``targets = tokens[1:]`` and a loss weight on each
*target* token.  Shifting before packing means a label never crosses into the
next packed sample.  Rows are then either packed first-fit with segment ids and
per-segment positions (default, fast) or hold one right-padded sample each
(``packing=False``, Megatron-exact).

The order is a seeded shuffle that changes every epoch; every host reads the
same global stream (and keeps only its devices' rows), and the iterator state
is a small JSON-able dict saved with every checkpoint, so a resumed run sees
exactly the same batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import grain
import numpy as np
from grain import experimental as grain_exp

from oasst_jax.turns import DataError

FIELDS = ("inputs", "targets", "weights")
# A batch's fields and their dtypes, each field [rows, seq_length]: the one list the loop,
# the train step and the planner's abstract batch read.
BATCH_DTYPES: Mapping[str, type] = MappingProxyType(
    {
        "inputs": np.int32,
        "targets": np.int32,
        "weights": np.float32,
        "segment_ids": np.int32,
        "positions": np.int32,
    }
)
BATCH_FIELDS = tuple(BATCH_DTYPES)
# ``loss_mask(roles=..., tokens=...)`` -> per-token 0/1 mask: ``chatml.loss_mask`` bound
# to a tokenizer and mode (the data pipeline itself knows no loss rule)
LossMask = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    seq_length: int
    rows_per_batch: int  # rows this host delivers per training step
    packing: bool = True
    seed: int = 0
    shuffle: bool = True
    num_packing_bins: int = 16
    num_threads: int = 2
    prefetch: int = 4


def batch_shape(rows: int, seq_length: int, *, accumulation: int | None = None) -> tuple:
    """A batch field's shape: ``(rows, seq_length)`` (an eval step's micro-batch), or with
    ``accumulation`` the train step's ``(accumulation, rows, seq_length)``, its
    micro-batches stacked."""
    return (rows, seq_length) if accumulation is None else (accumulation, rows, seq_length)


def make_example(
    sample: dict[str, np.ndarray],
    seq_length: int,
    loss_mask: LossMask,
) -> dict[str, np.ndarray]:
    """One sample -> shifted ``inputs``/``targets``/``weights`` of at most ``seq_length``."""
    tokens = np.asarray(sample["tokens"], np.int32)[: seq_length + 1]
    roles = np.asarray(sample["roles"])[: seq_length + 1]
    mask = loss_mask(roles=roles, tokens=tokens)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "weights": mask[1:].astype(np.float32),
    }


def pad_example(example: dict[str, np.ndarray], seq_length: int) -> dict[str, np.ndarray]:
    """Right-pad one example to a full row (``packing=False``)."""
    n = len(example["inputs"])
    out = {k: np.pad(v, (0, seq_length - n)) for k, v in example.items()}
    out["segment_ids"] = (np.arange(seq_length) < n).astype(np.int32)
    out["positions"] = np.arange(seq_length, dtype=np.int32)
    return out


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: row[k] for k in FIELDS}
    out["segment_ids"] = row["inputs_segment_ids"].astype(np.int32)
    out["positions"] = row["inputs_positions"].astype(np.int32)
    return out


def _nonempty(example: dict[str, np.ndarray]) -> bool:
    return len(example["inputs"]) > 0


def check_usable(source: Any) -> None:
    """Refuse a source none of whose samples gives an example (2 or more tokens: an input and
    its target); filtering them all out, a repeating grain pipeline would spin forever.

    Reads only the lengths where the source has them (our shards, Megatron splits)."""
    if hasattr(source, "lengths"):
        lengths = np.asarray(source.lengths())
    else:
        lengths = np.array([len(source[i]["tokens"]) for i in range(len(source))])
    if not (lengths >= 2).any():
        name = getattr(source, "path", type(source).__name__)
        raise DataError(
            f"{name}: none of its {lengths.size} samples has 2 or more tokens (an input and "
            "its target); nothing to train or evaluate on"
        )


def build_dataset(
    source: Any,
    cfg: PipelineConfig,
    loss_mask: LossMask,
    *,
    repeat: bool = True,
) -> grain.IterDataset:
    """An iterable of batches ``{inputs, targets, weights, segment_ids, positions}``.

    Each field is ``[rows_per_batch, seq_length]``.  ``source`` is any grain
    random-access source yielding ``{"tokens", "roles"}`` (the pretokenizer's
    shards); with ``repeat`` the data cycles through epochs, reshuffled each time.  A source
    without a sample of 2 or more tokens is refused (:func:`check_usable`).
    """
    check_usable(source)
    ds = grain.MapDataset.source(source)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map(lambda s: make_example(s, cfg.seq_length, loss_mask)).filter(_nonempty)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
    )
    if cfg.packing:
        it = grain_exp.FirstFitPackIterDataset(
            it,
            length_struct={k: cfg.seq_length for k in FIELDS},
            num_packing_bins=cfg.num_packing_bins,
            seed=cfg.seed,
            shuffle_bins=False,
        ).map(_rename_packed)
    else:
        it = it.map(lambda e: pad_example(e, cfg.seq_length))
    return it.batch(cfg.rows_per_batch, drop_remainder=True)


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Fraction of row slots holding real tokens (1.0 = no padding)."""
    return float(np.mean(batch["segment_ids"] > 0))


def samples_in_batch(batch: dict[str, np.ndarray]) -> int:
    """Samples (segments) in a batch: with packing a row holds several, so this is what
    to compare with Megatron's samples per step (its ``global_batch_size``)."""
    seg = batch["segment_ids"]
    first = np.ones_like(seg[..., :1], dtype=bool)
    starts = (seg > 0) & np.concatenate([first, seg[..., 1:] != seg[..., :-1]], axis=-1)
    return int(starts.sum())
