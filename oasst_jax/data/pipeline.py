"""Input pipeline: pretokenized samples -> packed, batched training rows, each host reading
only the rows its own devices hold.

Per sample (Megatron-LLM's ``instruction_dataset``): keep the first
``seq_length + 1`` tokens (the tail of a long answer is lost, as upstream), then
``inputs = tokens[:-1]``, ``targets = tokens[1:]`` and a loss weight on each
*target* token.  Shifting before packing means a label never crosses into the
next packed sample.  Rows are then either packed first-fit with segment ids and
per-segment positions (default, fast) or hold one right-padded sample each
(``packing=False``, Megatron-exact).

Which sample lands in which row depends on the samples' lengths alone: the order is
grain's seeded shuffle (a new one every epoch) and the packing first-fit over
``num_packing_bins`` rows, both computed from the lengths the shards' offsets give
without reading a token (:class:`PackPlan`).  Every host computes the same plan of
the *global* batch and then reads, masks and packs only the rows its devices hold
(:func:`host_rows`), so the global batch is the same for any number of hosts while
each host's input cost falls with their number.  The iterator state is the plan's
position, one small JSON-able dict identical on every host, saved with every
checkpoint: a resumed run sees exactly the same batches (with any number of hosts).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

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
    rows_per_batch: int  # rows of one global batch
    packing: bool = True
    seed: int = 0
    shuffle: bool = True
    num_packing_bins: int = 16
    num_threads: int = 2  # > 1: batches read ahead in this many threads
    prefetch: int = 4  # batches read ahead (with num_threads > 1)


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


def example_lengths(source: Any, seq_length: int) -> np.ndarray:
    """Each sample's example length, ``min(tokens, seq_length + 1) - 1`` (0: no example).

    Reads only the lengths where the source has them (our shards, Megatron splits)."""
    if hasattr(source, "lengths"):
        tokens = np.asarray(source.lengths(), np.int64)
    else:
        tokens = np.array([len(source[i]["tokens"]) for i in range(len(source))], np.int64)
    return np.maximum(np.minimum(tokens, seq_length + 1) - 1, 0)


def check_usable(source: Any, lengths: np.ndarray) -> None:
    """Refuse a source none of whose samples gives an example (2 or more tokens: an input and
    its target); filtering them all out, a repeating pipeline would spin forever."""
    if not (lengths > 0).any():
        name = getattr(source, "path", type(source).__name__)
        raise DataError(
            f"{name}: none of its {lengths.size} samples has 2 or more tokens (an input and "
            "its target); nothing to train or evaluate on"
        )


class PackPlan:
    """The global row stream as sample indices: the samples each row holds, in order.

    The order is grain's ``MapDataset.shuffle(seed).repeat()`` over the sample indices
    (the permutation changes every epoch), samples without an example skipped: its
    ``index_shuffle`` called directly (:meth:`sample_at`), at half the cost of a lookup
    through the dataset, since every host walks the whole order.  Packing
    is grain's ``FirstFitPackIterDataset`` with unshuffled bins: a sample goes into the
    first of ``num_packing_bins`` open rows with room for it; when none has room, the
    open rows are emitted and a new group starts with that sample (``packing=False``:
    one sample per row).  Written here rather than run through grain because grain packs
    the examples themselves, every token of every sample, where this needs lengths only;
    the rows are grain's, row for row (``tests/test_data_pipeline.py`` compares them).

    State: ``position``, where in the order the current group starts, and ``row``, how
    many of its rows were emitted (the meaning of grain's packing state, so a checkpoint
    of the grain pipeline this replaced resumes here: :meth:`set_state`).
    """

    def __init__(self, lengths: np.ndarray, cfg: PipelineConfig, *, repeat: bool):
        self.lengths = lengths
        self.size, self.seed, self.shuffle = len(lengths), cfg.seed, cfg.shuffle
        self.end = None if repeat else len(lengths)
        self.seq_length, self.packing = cfg.seq_length, cfg.packing
        self.bins = cfg.num_packing_bins if cfg.packing else 1
        self.position, self.row = 0, 0
        self._group: list[list[int]] | None = None
        self._after = 0

    def get_state(self) -> dict[str, int]:
        return {"position": self.position, "row": self.row}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`get_state`'s dict, or from the state of the grain pipeline
        this plan replaced (its map-to-iter ``next_index`` is our position)."""
        if "next_row" in state:  # grain's packing: {"parent": {"next_index"}, "next_row", ...}
            state = {"position": state["parent"]["next_index"], "row": state["next_row"]}
        elif "next_index" in state:  # grain's unpacked rows
            state = {"position": state["next_index"], "row": 0}
        self.position, self.row = int(state["position"]), int(state["row"])
        self._group = None

    def __iter__(self) -> PackPlan:
        return self

    def __next__(self) -> list[int]:
        if self._group is None:
            self._group, self._after = self._pack(self.position)
        if self.row >= len(self._group):
            raise StopIteration  # a finite stream's end
        row = self._group[self.row]
        self.row += 1
        if self.row == len(self._group):
            self.position, self.row, self._group = self._after, 0, None
        return row

    def sample_at(self, p: int) -> int:
        """The sample at position ``p`` of the order: what grain's shuffled, repeated
        dataset gives at index ``p`` (epoch ``e`` permuted with seed ``seed + e``, 4 rounds
        of ``index_shuffle``, as ``ShuffleMapDataset``)."""
        epoch, k = divmod(p, self.size)
        if not self.shuffle:
            return k
        seed = (self.seed + epoch) % 2**32
        return int(grain_exp.index_shuffle(k, max_index=self.size - 1, seed=seed, rounds=4))

    def _pack(self, start: int) -> tuple[list[list[int]], int]:
        """The group of rows packed from ``start``, and where the next one starts: after
        the group's last sample (as grain's state; samples without an example between it
        and the next group's first are skipped again)."""
        fill: list[int] = []
        rows: list[list[int]] = []
        p = after = start
        while self.end is None or p < self.end:
            i = self.sample_at(p)
            n = int(self.lengths[i])
            p += 1
            if not n:
                continue
            for j in range(len(rows) if self.packing else 0):
                if fill[j] + n <= self.seq_length:
                    fill[j] += n
                    rows[j].append(i)
                    break
            else:
                if len(rows) == self.bins:
                    return rows, after
                fill.append(n)
                rows.append([i])
            after = p
        return rows, p


def pack_row(examples: Sequence[dict[str, np.ndarray]], row: dict, packing: bool) -> None:
    """Fill one zeroed row (``{field: [seq_length] array}``) with its examples: packed, one
    after the other, segment ids 1, 2, ... and positions from 0 in each; unpacked (one
    example), segment id 1 on it and positions running on to the row's end (as Megatron's
    padded rows)."""
    start = 0
    for seg, ex in enumerate(examples, 1):
        end = start + len(ex["inputs"])
        for k in FIELDS:
            row[k][start:end] = ex[k]
        row["segment_ids"][start:end] = seg
        row["positions"][start:end] = np.arange(end - start)
        start = end
    if not packing:
        row["positions"][:] = np.arange(len(row["positions"]))


class Batches:
    """Global batches of ``rows_per_batch`` rows, of which this host materializes ``rows``.

    ``rows``: the global row indices (within a batch) the host's devices hold, sorted
    (:func:`host_rows`); ``None``: all.  Each ``next`` gives ``{field: [len(rows),
    seq_length]}``; :attr:`stats` describes the whole global batch (from the plan, so
    every host logs the same figures).  With ``repeat`` the data cycles through epochs;
    else one pass that drops a last partial batch.  With ``num_threads > 1`` up to
    ``prefetch`` batches are read ahead in threads (the plan stays in this thread;
    :meth:`get_state` is the position after the batches handed out).
    """

    def __init__(
        self,
        source: Any,
        cfg: PipelineConfig,
        loss_mask: LossMask,
        *,
        repeat: bool = True,
        rows: Sequence[int] | None = None,
    ):
        self.source, self.cfg, self.loss_mask = source, cfg, loss_mask
        lengths = example_lengths(source, cfg.seq_length)
        check_usable(source, lengths)
        self.plan = PackPlan(lengths, cfg, repeat=repeat)
        self.rows = np.arange(cfg.rows_per_batch) if rows is None else np.asarray(rows)
        self.stats: dict[str, float] = {}
        self._state = self.plan.get_state()
        self._ahead: collections.deque = collections.deque()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __iter__(self) -> Batches:
        return self

    def get_state(self) -> dict[str, int]:
        return dict(self._state)

    def set_state(self, state: Mapping[str, Any]) -> None:
        for _, fut, _ in self._ahead:
            fut.cancel()
        self._ahead.clear()
        self.plan.set_state(state)
        self._state = self.plan.get_state()

    def __next__(self) -> dict[str, np.ndarray]:
        if self.cfg.num_threads <= 1:
            plan = self._next_plan()
            batch = self._read(plan)
            self._state = self.plan.get_state()
        else:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.cfg.num_threads)
            while len(self._ahead) < max(self.cfg.prefetch, 1):
                try:
                    plan = self._next_plan()
                except StopIteration:
                    break
                fut = self._pool.submit(self._read, plan)
                self._ahead.append((plan, fut, self.plan.get_state()))
            if not self._ahead:
                self._pool.shutdown()  # a finite stream's end: its threads end too
                self._pool = None
                raise StopIteration
            plan, fut, self._state = self._ahead.popleft()
            batch = fut.result()
        lengths = self.plan.lengths
        self.stats = {
            "packing_efficiency": float(sum(lengths[i] for row in plan for i in row))
            / (len(plan) * self.cfg.seq_length),
            "samples": sum(len(row) for row in plan),
        }
        return batch

    def _next_plan(self) -> list[list[int]]:
        """The next global batch's rows (raises StopIteration at a finite stream's end)."""
        return [next(self.plan) for _ in range(self.cfg.rows_per_batch)]

    def _read(self, plan: list[list[int]]) -> dict[str, np.ndarray]:
        """This host's rows of a planned batch, read from the source."""
        seq = self.cfg.seq_length
        out = {k: np.zeros((len(self.rows), seq), dt) for k, dt in BATCH_DTYPES.items()}
        for n, r in enumerate(self.rows):
            examples = [make_example(self.source[i], seq, self.loss_mask) for i in plan[r]]
            pack_row(examples, {k: v[n] for k, v in out.items()}, self.cfg.packing)
        return out


def host_rows(sharding: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The global rows (flat over ``shape[:-1]``, the batch's rows in order) that this
    process's devices hold under ``sharding`` (a ``jax.sharding.Sharding``), sorted.  A row
    split along its length (context parallelism) counts whole."""
    ids = np.arange(math.prod(shape[:-1])).reshape(shape[:-1])
    held = sharding.addressable_devices_indices_map(shape).values()
    return np.unique(np.concatenate([ids[index[:-1]].ravel() for index in held]))


def row_reader(
    host: np.ndarray, rows: np.ndarray | None, shape: tuple[int, ...]
) -> Callable[[tuple], np.ndarray]:
    """``jax.make_array_from_callback``'s callback for one batch field of global ``shape``
    when this host holds only the global ``rows`` of it (``host[k]`` is row ``rows[k]``;
    ``None``: every row, in order)."""
    ids = np.arange(math.prod(shape[:-1])).reshape(shape[:-1])
    local = ids.ravel() if rows is None else np.full(ids.size, -1)
    if rows is not None:
        local[rows] = np.arange(len(rows))
    host = np.asarray(host)

    def read(index: tuple) -> np.ndarray:
        want = local[ids[index[:-1]]]
        if (want < 0).any():
            raise ValueError(f"rows {ids[index[:-1]][want < 0]} were not read on this host")
        return host[want][..., index[-1]]

    return read
