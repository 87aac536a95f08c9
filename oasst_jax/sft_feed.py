"""sft batches on the mesh for the training loop: the train feed and the validation.

Why a module of its own: the loop (``oasst_jax/cli/train.py``) only asks a feed for the next
global batch and a validation for its metrics, whatever the objective; how a split becomes
seeded, packed global batches (``oasst_jax/data/pipeline.py``) placed on the devices, and
how an evaluation walks the val split, lives here (the rm/dpo counterparts:
``oasst_jax/preference_feed.py``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from oasst_jax import sharding
from oasst_jax.data import outputs, pipeline
from oasst_jax.data.pipeline import BATCH_FIELDS


def open_split(cfg: ml_collections.ConfigDict, split: str) -> Any:
    """``{data_path}/{data_prefix}-{split}``: our shards, or Megatron ``-text``/``-role``
    indexed datasets (upstream's pretokenizer output) when that is what exists;
    missing, unfinished or empty: a one-line error."""
    return outputs.open_source(cfg.data_path, cfg.data_prefix, split)


def make_iterator(
    cfg,
    source,
    rows: int,
    loss_mask: pipeline.LossMask,
    *,
    train: bool,
    repeat: bool = True,
    host_rows=None,
) -> pipeline.Batches:
    """The global batch stream, ``rows`` rows per batch (shuffled when ``train``; cycling
    through the split when ``repeat``, else one pass that drops a last partial batch), of
    which this process reads only ``host_rows`` (``None``: all).

    Every process plans the same global batches from the samples' lengths and reads only
    the rows its devices hold (:func:`oasst_jax.data.pipeline.host_rows`), so the batches
    and the losses are the same for any number of hosts, and so is the iterator state a
    checkpoint stores.
    """
    pc = pipeline.PipelineConfig(
        seq_length=cfg.seq_length,
        rows_per_batch=rows,
        packing=cfg.packing,
        seed=cfg.seed,
        shuffle=train,
        num_packing_bins=cfg.num_packing_bins,
        num_threads=cfg.data_threads,
    )
    return pipeline.Batches(source, pc, loss_mask, repeat=repeat, rows=host_rows)


def to_global(host_batch: dict, sharding_, global_shape: tuple[int, ...], rows=None) -> dict:
    """This process's rows of the global batch (``rows``, global row indices; ``None``:
    every row) -> one global array per field, each process transferring only the slices
    its devices hold."""
    return {
        k: jax.make_array_from_callback(
            global_shape, sharding_, pipeline.row_reader(host_batch[k], rows, global_shape)
        )
        for k in BATCH_FIELDS
    }


def _split_name(cfg, split: str) -> str:
    """``{data_path}/{data_prefix}-{split}``, as errors name a split."""
    return os.path.join(cfg.data_path, f"{cfg.data_prefix}-{split}")


def _next_batch(it, split: str) -> dict:
    try:
        return next(it)
    except StopIteration:
        raise ValueError(f"{split}: the split yields no batches (no usable samples)") from None


class Validation:
    """Evaluation as Megatron-LLM runs it.

    One evaluation is ``eval_iters`` **global** batches (``global_batch_size`` rows
    each: the card's 10 x 64 = 640 samples), read from one validation stream that
    persists across evaluations: each evaluation continues where the last one
    stopped, cycling through the split in its stored order (unshuffled).  The
    stream's position is saved with every checkpoint (``meta["val_iterator"]``), so a
    resumed run evaluates the samples an uninterrupted one would.  Each global batch
    is run in the train step's micro-batches (``rows_per_micro`` rows) and the loss
    is normalised as training's (``loss_normalization``; ``microbatch_mean`` is
    Megatron's mean over all the evaluation's micro-batches of each one's own mean).

    ``eval_full``: every sample of the split exactly once instead, in order from the
    first (the last micro-batch filled up with empty rows), the same data at every
    evaluation, so checkpoints compare on equal terms; there is no stream to save.
    """

    def __init__(self, cfg, source, loss_mask, eval_fn, mesh, rows_per_micro: int):
        self.cfg, self.source, self.loss_mask = cfg, source, loss_mask
        self.eval_fn, self.rows = eval_fn, rows_per_micro
        self.shard = sharding.batch_sharding(mesh)
        self.name = _split_name(cfg, "val")
        self.stream = None
        shape = pipeline.batch_shape(rows_per_micro, cfg.seq_length)
        self.micro_rows = pipeline.host_rows(self.shard, shape)  # each micro-batch's, here
        if not cfg.eval_full:
            chunks = range(0, cfg.global_batch_size, rows_per_micro)
            mine = np.concatenate([i + self.micro_rows for i in chunks])
            self.stream = make_iterator(
                cfg, source, cfg.global_batch_size, loss_mask, train=False, host_rows=mine
            )

    def get_state(self) -> dict | None:
        """The stream's position, for the checkpoint (None with ``eval_full``)."""
        return None if self.stream is None else self.stream.get_state()

    def set_state(self, state: dict) -> None:
        """Continue the stream from a checkpoint's ``meta["val_iterator"]``."""
        if self.stream is not None:
            self.stream.set_state(state)

    def __call__(self, params) -> dict[str, float]:
        shape = pipeline.batch_shape(self.rows, self.cfg.seq_length)
        if self.stream is None:
            terms = [self.eval_fn(params, to_global(c, self.shard, shape)) for c in self._full()]
        else:
            terms = [
                self.eval_fn(params, to_global(c, self.shard, shape, self.micro_rows))
                for c in self._continued()
            ]
        if not terms:
            raise ValueError(f"{self.name}: the split yields no batches (no usable samples)")
        return eval_metrics(terms)

    def _continued(self):
        """``eval_iters`` global batches from the stream, cut into micro-batches as the
        train step cuts its global batch."""
        n = len(self.micro_rows)  # this host's rows of each micro-batch
        for _ in range(self.cfg.eval_iters):
            batch = _next_batch(self.stream, self.name)
            for i in range(0, len(batch["inputs"]), n):
                yield {k: batch[k][i : i + n] for k in BATCH_FIELDS}

    def _full(self):
        """One pass over the split, one row at a time, in micro-batches of ``rows``."""
        it = make_iterator(self.cfg, self.source, 1, self.loss_mask, train=False, repeat=False)
        rows = []
        for row in it:
            rows.append(row)
            if len(rows) == self.rows:
                yield _stack_rows(rows)
                rows = []
        if rows:
            empty = {k: np.zeros_like(rows[0][k]) for k in BATCH_FIELDS}  # no loss tokens
            yield _stack_rows(rows + [empty] * (self.rows - len(rows)))


def _stack_rows(rows: list[dict]) -> dict:
    return {k: np.concatenate([r[k] for r in rows]) for k in BATCH_FIELDS}


def eval_metrics(terms: list) -> dict[str, float]:
    """``val_loss`` = sum of numerators / sum of denominators over an evaluation's
    micro-batches (:func:`~oasst_jax.train_step.make_eval_step`'s terms), its
    perplexity, and the loss tokens it read.  NaN when it read no loss token."""
    num, den, tokens = np.asarray(jax.device_get(terms), np.float64).sum(axis=0)
    loss = float(num / den) if den > 0 else float("nan")
    return {
        "val_loss": loss,
        "val_ppl": float(np.exp(min(loss, 50.0))),
        "val_loss_tokens": float(tokens),
    }


class SftFeed:
    """The sft global batch stream placed on the mesh, with its host-side statistics."""

    def __init__(self, cfg, source, loss_mask, trainer, accum: int):
        self.shard, self.name = trainer.batch_sharding, _split_name(cfg, "train")
        rows = cfg.global_batch_size // accum
        self.shape = pipeline.batch_shape(rows, cfg.seq_length, accumulation=accum)
        self.rows = pipeline.host_rows(self.shard, self.shape)  # the rows read here
        self.it = make_iterator(
            cfg, source, cfg.global_batch_size, loss_mask, train=True, host_rows=self.rows
        )

    def get_state(self) -> dict:
        return self.it.get_state()

    def set_state(self, state: dict) -> None:
        self.it.set_state(state)

    def next(self) -> tuple[dict, dict[str, float]]:
        host = _next_batch(self.it, self.name)
        return to_global(host, self.shard, self.shape, self.rows), dict(self.it.stats)
