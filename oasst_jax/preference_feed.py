"""rm/DPO batches on the mesh for the training loop: the train feed, the validation, and
the DPO reference pre-pass.

Why a module of its own: the loop (``oasst_jax/cli/train.py``) only asks a feed for the next
global batch and a validation for its metrics, as it does for sft; how ranked examples
become stacked micro-batches of whole groups (``oasst_jax/data/ranked_batches.py``), placed
per field, and how a precomputed reference's log-probs join them lives here.  It imports
the step's shardings and metrics (``train_step``), never the loop.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from oasst_jax import lora
from oasst_jax.data import ranked_batches as pref_data
from oasst_jax.objectives import batch_shardings, finish_metrics
from oasst_jax.train_step import CompiledTrainer


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def open_ranked(cfg: ml_collections.ConfigDict, split: str) -> pref_data.RankedDataSource:
    """The run's ranked ``split`` (``{data_path}/{data_prefix}-{split}``)."""
    return pref_data.open_ranked(cfg.data_path, cfg.data_prefix, split)


def preference_config(cfg, rows: int, *, train: bool) -> pref_data.PreferenceConfig:
    """The rm/dpo batch shape of one micro-batch (``rows`` rows) from the run's config."""
    p = cfg.preference
    return pref_data.PreferenceConfig(
        kind=cfg.objective, seq_length=cfg.seq_length, rows=rows,
        max_sequences=p.max_sequences, max_groups=p.max_groups, packing=cfg.packing,
        max_prefix_length=p.max_prefix_length or None, max_replies=cfg.rm.max_replies,
        pairs=cfg.dpo.pairs, max_pairs_per_prompt=cfg.dpo.max_pairs_per_prompt,
        seed=cfg.seed, shuffle=train,
    )  # fmt: skip


def preference_to_global(host: dict, shardings: dict) -> dict:
    """A host rm/dpo batch (every field, each process the same) -> global arrays of the
    fields the step reads, each process transferring only its devices' slices."""
    return {
        k: jax.make_array_from_callback(host[k].shape, s, np.asarray(host[k]).__getitem__)
        for k, s in shardings.items()
    }


class PreferenceFeed:
    """rm/dpo global batches: ``accum`` micro-batches of :class:`PreferenceBatches` stacked
    on the accumulation axis (each micro-batch holds whole groups, so the step's per-prompt
    or per-pair weighting is exact), plus a precomputed DPO reference's log-probs."""

    def __init__(self, cfg, source, loss_mask, trainer, accum: int, *, train: bool,
                 table: dict | None = None, repeat: bool = True):  # fmt: skip
        rows = cfg.global_batch_size // accum
        pc = preference_config(cfg, rows, train=train)
        self.it = pref_data.PreferenceBatches(source, pc, loss_mask, repeat=repeat)
        self.accum, self.table, self.shardings = accum, table, trainer.batch_sharding
        self.where = os.path.join(cfg.workdir, pref_data.REFERENCE_FILE)

    def get_state(self) -> dict:
        return self.it.get_state()

    def set_state(self, state: dict) -> None:
        self.it.set_state(state)

    def micro(self) -> dict[str, np.ndarray]:
        b = next(self.it)
        if self.table is not None:
            b["reference_logps"] = pref_data.reference_logps(b, self.table, self.where)
        return b

    def next(self) -> tuple[dict, dict[str, float]]:
        host = pref_data.stack([self.micro() for _ in range(self.accum)])
        stats = {
            "packing_efficiency": float(np.mean(host["segment_ids"] > 0)),
            "samples": float(host["sequence_valid"].sum()),
        }
        return preference_to_global(host, self.shardings), stats


class PreferenceValidation:
    """rm/dpo evaluation: ``eval_iters`` global batches from a persistent unshuffled stream
    (as the loop's sft ``Validation``), or with ``eval_full`` one pass over the split;
    metrics summed per micro-batch and finished as the train step's, prefixed ``val_``."""

    def __init__(self, cfg, source, loss_mask, trainer, accum: int, table, mesh):
        self.cfg, self.source, self.loss_mask, self.trainer = cfg, source, loss_mask, trainer
        self.accum, self.table = accum, table
        self.name = os.path.join(cfg.data_path, f"{cfg.data_prefix}-val")
        self.shardings = batch_shardings(mesh, trainer.step_cfg)
        self.stream = None if cfg.eval_full else self._feed(repeat=True)

    def _feed(self, repeat: bool) -> PreferenceFeed:
        return PreferenceFeed(self.cfg, self.source, self.loss_mask, self.trainer, self.accum,
                              train=False, table=self.table, repeat=repeat)  # fmt: skip

    def get_state(self) -> dict | None:
        return None if self.stream is None else self.stream.get_state()

    def set_state(self, state: dict) -> None:
        if self.stream is not None:
            self.stream.set_state(state)

    def _micro_batches(self):
        if self.stream is not None:
            for _ in range(self.cfg.eval_iters * self.accum):
                yield self.stream.micro()
            return
        yield from iter(self._feed(repeat=False).micro, None)  # until the pass ends

    def __call__(self, params: Any, reference: Any) -> dict[str, float]:
        terms = [self.trainer.eval(params, preference_to_global(b, self.shardings), reference)
                 for b in self._micro_batches()]  # fmt: skip
        if not terms:
            raise ValueError(f"{self.name}: the split yields no batches (no usable samples)")
        num, sums = jax.tree.map(lambda *x: sum(np.float64(v) for v in x), *terms)
        m = finish_metrics(num, sums, self.trainer.step_cfg)
        return {f"val_{k}": float(v) for k, v in m.items()}


def reference_table(
    cfg, trainer: CompiledTrainer, ref: Any, splits: tuple[str, ...], loss_mask, mesh
) -> dict:
    """The precomputed reference log-probs of every (pair, reply) sequence of ``splits``:
    read from ``{workdir}/reference_logps.json`` when it was made from the same data and
    weights, else computed once from the reference weights ``ref`` (through the trainer's
    ``sequence_logps``, the pipeline schedule included) and written atomically."""
    identity = {
        "reference": lora.fingerprint(ref),
        "load": cfg.load,
        **{f"data_{s}": open_ranked(cfg, s).pieces.metadata for s in splits},
        **{k: cfg[k] for k in ("seq_length", "packing", "loss_on")},
        **{f"dpo.{k}": cfg.dpo[k] for k in ("pairs", "max_pairs_per_prompt")},
        "preference.max_prefix_length": cfg.preference.max_prefix_length,
    }
    path = os.path.join(cfg.workdir, pref_data.REFERENCE_FILE)
    table = pref_data.load_reference(path, identity)
    if table is not None:
        return table
    table: dict[str, dict[tuple, float]] = {}
    shardings = batch_shardings(mesh, trainer.step_cfg)
    rows = cfg.global_batch_size // trainer.step_cfg.accumulation_steps
    for split in splits:
        table[split] = {}
        pc = preference_config(cfg, rows, train=False)
        for b in pref_data.PreferenceBatches(open_ranked(cfg, split), pc, loss_mask, repeat=False):
            b["reference_logps"] = np.zeros(b["sequence_valid"].shape, np.float32)
            got = trainer.sequence_logps(ref, preference_to_global(b, shardings))
            got = np.asarray(jax.device_get(got))
            table[split].update({k: float(got[slot]) for slot, k in pref_data.pair_keys(b)})
    if jax.process_index() == 0:
        os.makedirs(cfg.workdir, exist_ok=True)
        pref_data.save_reference(path, identity, table)
    _log(f"reference log-probs of {sum(map(len, table.values()))} sequences written to {path}")
    return table
