"""Batches for reward-model and DPO training from ranked shards (``mode = "rm"`` data).

A *sequence* is an example's chatml prefix followed by one of its replies (an assistant
turn); a *group* is what the loss compares: for ``kind="rm"`` one prompt's replies (the
best ``max_replies``, best first), for ``kind="dpo"`` one ``(chosen, rejected)`` pair
(:func:`make_pairs`).  A group never straddles two batches.

Truncation (:func:`truncate`), per group so every sequence of it sees the same prefix:
when prefix + longest reply exceeds ``seq_length`` tokens, the prefix keeps its *tail*
(at least ``max_prefix_length`` tokens where it has them, more when the replies leave
room) and each reply its *head* (``seq_length - kept prefix`` tokens).

Batch layout (static shapes; ``R = rows``, ``L = seq_length``, ``S = max_sequences``,
``P = max_groups``), the interface of the train step (:mod:`oasst_jax.preference_loss`):

==================== ========= ======= ==================================================
field                shape     dtype   meaning
==================== ========= ======= ==================================================
``inputs``           [R, L]    int32   token ids: sequences packed first-fit (``packing``)
                                       or one per row, right-padded with 0
``targets``          [R, L]    int32   the next token of the same sequence (0 at its last
                                       token and on padding)
``weights``          [R, L]    float32 1 where the target is a loss token of the *reply*
                                       (``loss_mask``: ``assistant_turn`` or
                                       ``assistant_answer``); never a prefix token
``segment_ids``      [R, L]    int32   1, 2, ... per sequence of a row; 0 on padding
``positions``        [R, L]    int32   position within its sequence (0 on padding)
``sequence_ids``     [R, L]    int32   the sequence's slot in ``[0, S)``; ``S`` on padding
``sequence_row``     [S]       int32   row of each slot's sequence
``sequence_last``    [S]       int32   column of its last token (the RM reads its score
                                       there: ``hidden[row, last]``)
``sequence_group``   [S]       int32   group index in ``[0, P)``: prompt (rm) / pair (dpo)
``sequence_rank``    [S]       int32   rm: position in the best-first list (0 best);
                                       dpo: 0 chosen, 1 rejected
``sequence_reply``   [S]       int32   the reply's index in its example's best-first list
``sequence_valid``   [S]       bool    False for padding slots (all other slot fields 0)
``group_example``    [P]       int32   source example of each group; -1 for padding
==================== ========= ======= ==================================================

Per-sequence log-probs are ``segment_sum(token log p(target) * weights, sequence_ids,
num_segments=S)`` (:func:`oasst_jax.preference_loss.sequence_logps`).  The order of groups is a
seeded shuffle of the examples, redrawn every epoch; :meth:`PreferenceBatches.get_state`
is a small JSON-able dict, so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from oasst_jax import atomic_files
from oasst_jax.data.pipeline import LossMask
from oasst_jax.data.shards import RankedDataSource, split_path
from oasst_jax.turns import DataError

REFERENCE_FILE = "reference_logps.json"  # a DPO run's precomputed reference, in its workdir

KINDS = ("rm", "dpo")
PAIR_SCHEMES = ("best_vs_rest", "all")
ROW_FIELDS = ("inputs", "targets", "weights", "segment_ids", "positions", "sequence_ids")
SLOT_FIELDS = ("sequence_row", "sequence_last", "sequence_group", "sequence_rank", "sequence_reply")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """The batch shape (module doc) and how groups are formed.  ``max_replies``: rm, the
    best replies kept per prompt (upstream's reward-model collator caps them too);
    ``pairs`` / ``max_pairs_per_prompt``: dpo, which pairs of a prompt and how many."""

    kind: str
    seq_length: int
    rows: int
    max_sequences: int
    max_groups: int
    packing: bool = True
    max_prefix_length: int | None = None  # None: seq_length // 2
    max_replies: int = 5
    pairs: str = "best_vs_rest"
    max_pairs_per_prompt: int = 4
    seed: int = 0
    shuffle: bool = True

    @property
    def group_size(self) -> int:
        """The most sequences a group has."""
        return self.max_replies if self.kind == "rm" else 2

    @property
    def prefix_budget(self) -> int:
        return self.seq_length // 2 if self.max_prefix_length is None else self.max_prefix_length

    def validate(self) -> None:
        """One-line DataError naming the first bad field: every group must fit an empty
        batch (one row per sequence at worst)."""
        if self.kind not in KINDS:
            raise DataError(f"preference kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.pairs not in PAIR_SCHEMES:
            raise DataError(f"pairs must be one of {', '.join(PAIR_SCHEMES)}, got {self.pairs!r}")
        for name in ("seq_length", "rows", "max_sequences", "max_groups", "max_pairs_per_prompt"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_replies < 2:
            raise DataError(f"max_replies must be >= 2, got {self.max_replies}")
        if not 1 <= self.prefix_budget < self.seq_length:
            raise DataError(
                f"max_prefix_length must be in [1, seq_length), got {self.prefix_budget}"
            )
        for name in ("rows", "max_sequences"):
            if getattr(self, name) < self.group_size:
                raise DataError(
                    f"{name} = {getattr(self, name)} cannot hold one {self.kind} group of "
                    f"{self.group_size} sequences"
                )


def make_pairs(num_replies: int, scheme: str, cap: int) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` reply indices of a best-first list: ``best_vs_rest`` the best
    against each worse one, ``all`` every ordered pair (``i < j``) by ``i`` then ``j``;
    the first ``cap`` of them."""
    if scheme == "best_vs_rest":
        pairs = [(0, j) for j in range(1, num_replies)]
    else:
        pairs = [(i, j) for i in range(num_replies) for j in range(i + 1, num_replies)]
    return pairs[:cap]


def truncate(
    prefix_len: int, reply_lens: list[int], seq_length: int, max_prefix_length: int
) -> tuple[int, list[int]]:
    """``(prefix tokens kept from its tail, reply tokens kept from each head)`` (module doc)."""
    longest = max(reply_lens)
    if prefix_len + longest <= seq_length:
        return prefix_len, list(reply_lens)
    keep = min(prefix_len, max(max_prefix_length, seq_length - longest))
    return keep, [min(n, seq_length - keep) for n in reply_lens]


def open_ranked(data_path: str, prefix: str, split: str) -> RankedDataSource:
    """``{data_path}/{prefix}-{split}``, a ranked split written by ``pretokenize`` in rm mode."""
    return RankedDataSource(split_path(data_path, prefix, split))


def _groups(k: int, cfg: PreferenceConfig) -> list[list[tuple[int, int]]]:
    """The groups of an example with ``k`` replies: lists of ``(reply index, rank)``."""
    if cfg.kind == "rm":
        return [[(i, i) for i in range(min(k, cfg.max_replies))]]
    return [[(c, 0), (r, 1)] for c, r in make_pairs(k, cfg.pairs, cfg.max_pairs_per_prompt)]


def _sequences(
    example: dict[str, Any], group: list[tuple[int, int]], cfg: PreferenceConfig, mask: LossMask
) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """``(tokens, loss mask, rank, reply index)`` of each sequence of a group, truncated."""
    prefix = np.asarray(example["prefix_tokens"], np.int32)
    replies = [np.asarray(example["reply_tokens"][i], np.int32) for i, _ in group]
    keep, lens = truncate(len(prefix), [len(r) for r in replies], cfg.seq_length, cfg.prefix_budget)
    out = []
    for (i, rank), reply, n in zip(group, replies, lens, strict=True):
        reply_mask = mask(roles=np.asarray(example["reply_roles"][i]), tokens=reply)
        tokens = np.concatenate([prefix[len(prefix) - keep :], reply[:n]])
        weights = np.concatenate([np.zeros(keep, np.float32), reply_mask[:n].astype(np.float32)])
        out.append((tokens, weights, rank, i))
    return out


class _Batch:
    """One batch being filled; :meth:`add` places a whole group or nothing."""

    def __init__(self, cfg: PreferenceConfig):
        self.cfg = cfg
        r, length, s, p = cfg.rows, cfg.seq_length, cfg.max_sequences, cfg.max_groups
        self.rows = {k: np.zeros((r, length), np.int32) for k in ROW_FIELDS}
        self.rows["weights"] = np.zeros((r, length), np.float32)
        self.rows["sequence_ids"][:] = s
        self.slots = {k: np.zeros(s, np.int32) for k in SLOT_FIELDS}
        self.slots["sequence_valid"] = np.zeros(s, bool)
        self.group_example = np.full(p, -1, np.int32)
        self.used = np.zeros(r, np.int64)
        self.segments = np.zeros(r, np.int32)
        self.num_slots = 0
        self.num_groups = 0

    def _place(self, lengths: list[int]) -> list[int] | None:
        """Rows for sequences of these lengths (first fit), or None."""
        used = self.used.copy()
        rows = []
        for n in lengths:
            room = used + n <= self.cfg.seq_length if self.cfg.packing else used == 0
            fits = np.flatnonzero(room)
            if not fits.size:
                return None
            used[fits[0]] += n
            rows.append(int(fits[0]))
        return rows

    def add(self, example_index: int, seqs: list[tuple[np.ndarray, np.ndarray, int, int]]) -> bool:
        if self.num_groups == self.cfg.max_groups:
            return False
        if self.num_slots + len(seqs) > self.cfg.max_sequences:
            return False
        rows = self._place([len(s[0]) for s in seqs])
        if rows is None:
            return False
        g = self.num_groups
        for (tokens, weights, rank, reply), row in zip(seqs, rows, strict=True):
            n, start, slot = len(tokens), int(self.used[row]), self.num_slots
            cols = slice(start, start + n)
            self.segments[row] += 1
            self.rows["inputs"][row, cols] = tokens
            self.rows["targets"][row, start : start + n - 1] = tokens[1:]
            self.rows["weights"][row, start : start + n - 1] = weights[1:]
            self.rows["segment_ids"][row, cols] = self.segments[row]
            self.rows["positions"][row, cols] = np.arange(n)
            self.rows["sequence_ids"][row, cols] = slot
            self.slots["sequence_row"][slot] = row
            self.slots["sequence_last"][slot] = start + n - 1
            self.slots["sequence_group"][slot] = g
            self.slots["sequence_rank"][slot] = rank
            self.slots["sequence_reply"][slot] = reply
            self.slots["sequence_valid"][slot] = True
            self.used[row] += n
            self.num_slots += 1
        self.group_example[g] = example_index
        self.num_groups += 1
        return True

    def arrays(self) -> dict[str, np.ndarray]:
        return {**self.rows, **self.slots, "group_example": self.group_example}


class PreferenceBatches:
    """Batches (module doc) over a ranked source, epoch after epoch (``repeat``) or once
    (the last batch then partly padding).  ``loss_mask`` is ``chatml.loss_mask`` bound to
    a tokenizer and mode, as for :class:`oasst_jax.data.pipeline.Batches`."""

    def __init__(
        self, source: Any, cfg: PreferenceConfig, loss_mask: LossMask, *, repeat: bool = True
    ):
        cfg.validate()
        if len(source) == 0:
            raise DataError(f"{getattr(source, 'path', source)}: no rm examples")
        self.source, self.cfg, self.loss_mask, self.repeat = source, cfg, loss_mask, repeat
        if hasattr(source, "num_replies"):  # RankedDataSource: from the index alone
            self._num_replies = [int(k) for k in source.num_replies()]
        else:
            self._num_replies = [len(source[i]["reply_tokens"]) for i in range(len(source))]
        self._epoch, self._position = 0, 0
        self._order: list[tuple[int, list[tuple[int, int]]]] | None = None

    def get_state(self) -> dict[str, int]:
        """Where the next batch starts: ``{"epoch", "position"}`` (a group index)."""
        return {"epoch": self._epoch, "position": self._position}

    def set_state(self, state: dict[str, int]) -> None:
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._order = None

    def _epoch_order(self) -> list[tuple[int, list[tuple[int, int]]]]:
        """``(example index, group)`` in this epoch's order."""
        if self._order is None:
            n = len(self.source)
            rng = np.random.default_rng([self.cfg.seed, self._epoch])
            examples = rng.permutation(n) if self.cfg.shuffle else np.arange(n)
            self._order = [
                (int(i), g) for i in examples for g in _groups(self._num_replies[i], self.cfg)
            ]
        return self._order

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = _Batch(self.cfg)
        while True:
            order = self._epoch_order()
            if self._position == len(order):
                if not self.repeat:
                    if batch.num_groups:
                        return batch.arrays()
                    raise StopIteration
                self._epoch, self._position, self._order = self._epoch + 1, 0, None
                continue
            index, group = order[self._position]
            seqs = _sequences(self.source[index], group, self.cfg, self.loss_mask)
            if not batch.add(index, seqs):
                return batch.arrays()  # never empty: validate() lets a group fit one
            self._position += 1


def stack(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Micro-batches stacked along a new leading axis: the train step's accumulation axis."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def pair_keys(batch: dict[str, np.ndarray]) -> list[tuple[int, tuple[int, int, int, int]]]:
    """``(slot, (example, chosen reply, rejected reply, rank))`` of each valid slot of a
    DPO batch: what a sequence's reference log-prob is stored under.  The pair is part of
    the key because truncation is per group (the kept prefix depends on both replies)."""
    valid = np.flatnonzero(batch["sequence_valid"])
    members: dict[int, dict[int, int]] = {}
    for slot in valid:
        members.setdefault(int(batch["sequence_group"][slot]), {})[
            int(batch["sequence_rank"][slot])
        ] = int(batch["sequence_reply"][slot])
    out = []
    for slot in valid:
        g = int(batch["sequence_group"][slot])
        pair = members[g]
        key = (int(batch["group_example"][g]), pair[0], pair[1], int(batch["sequence_rank"][slot]))
        out.append((int(slot), key))
    return out


def save_reference(
    path: str, identity: dict[str, Any], logps: dict[str, dict[tuple, float]]
) -> None:
    """Write a precomputed reference, ``{split: {pair_keys key: summed log-prob}}`` (example
    indices are per split), and the identity of the data and weights it was computed from,
    atomically (JSON: nothing unpickled)."""
    splits = {
        split: {"keys": [list(k) for k in sorted(t)], "logps": [float(t[k]) for k in sorted(t)]}
        for split, t in logps.items()
    }
    atomic_files.write_json(path, {"identity": identity, "splits": splits})


def load_reference(path: str, identity: dict[str, Any]) -> dict[str, dict[tuple, float]] | None:
    """The tables :func:`save_reference` wrote, None when there are none; one line naming
    the first field that differs when they were made from other data or weights."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            obj = json.load(f)
        stored = obj.get("identity", {})
        splits = obj["splits"].items()
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise _damaged(path, e) from None
    for field in sorted(set(identity) | set(stored)):
        if stored.get(field) != identity.get(field):
            raise DataError(
                f"{path} was computed for {field}={stored.get(field)!r}, this run has "
                f"{identity.get(field)!r}; delete it to recompute the reference log-probs"
            )
    try:
        return {
            split: {tuple(k): float(v) for k, v in zip(t["keys"], t["logps"], strict=True)}
            for split, t in splits
        }
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise _damaged(path, e) from None


def _damaged(path: str, error: BaseException) -> DataError:
    """A reference file that does not read as :func:`save_reference` wrote it (truncated,
    not JSON, a field missing or of another type), in one line that says what to do."""
    what = " ".join(str(error).split()) or type(error).__name__
    return DataError(
        f"{path} is damaged ({type(error).__name__}: {what[:200]}); delete it to recompute "
        "the reference log-probs"
    )


def reference_logps(batch: dict[str, np.ndarray], table: dict[tuple, float], where: str):
    """``[S]`` float32: each valid slot's reference log-prob from ``table`` (0 on padding);
    a sequence the table lacks is a one-line error naming ``where``."""
    out = np.zeros(batch["sequence_valid"].shape, np.float32)
    for slot, key in pair_keys(batch):
        if key not in table:
            raise DataError(f"{where} has no reference log-prob for (example, chosen, rejected, "
                            f"rank) = {key}; delete it to recompute")  # fmt: skip
        out[slot] = table[key]
    return out
