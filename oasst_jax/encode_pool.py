"""The pretokenizer's encoding stage: samples -> chatml ids and roles in a process pool,
filtered and appended to a split's writer.

:class:`Encoder` sends fixed-size chunks to worker processes (each holding the tokenizer)
and yields the encoded chunks in submission order with a bounded number in flight, so the
output is byte-identical for any worker count and memory stays flat.  :func:`write_samples`
drops the samples failing ``min_assistant_tokens`` or upstream's joined-text check
(counted as skip reasons in the split's :class:`~oasst_jax.data.stats.Stats`);
:func:`write_ranked` writes rm examples (a prefix and its ranked replies).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from oasst_jax.chatml import EncodedBatch, encode_batch, format_chatml
from oasst_jax.data import shards
from oasst_jax.data.conversation import Sample
from oasst_jax.data.oasst_export import RankedSample
from oasst_jax.data.stats import Stats
from oasst_jax.tokenizer import Tokenizer
from oasst_jax.turns import Turn

CHUNK_SIZE = 256  # samples per worker task: amortises IPC, keeps the pipeline streaming

_WORKER: dict[str, Any] = {}  # per worker process: set once by the pool initializer


def _init_worker(tokenizer: Tokenizer, check: bool) -> None:
    _WORKER["tokenizer"] = tokenizer
    _WORKER["check"] = check


def _encode_chunk(conversations: list[tuple[tuple[str, str], ...]]) -> EncodedBatch:
    """Worker task; turns travel as ``(role, text)`` tuples (pickling dataclasses is slower)."""
    turns = [tuple(Turn(role, text) for role, text in c) for c in conversations]
    return encode_batch(_WORKER["tokenizer"], turns, check=_WORKER["check"])


class Encoder:
    """Encodes samples in fixed-size chunks, in a process pool when ``num_workers > 1``.

    Results come back in submission order with a bounded number of chunks in flight, so
    output is identical for any worker count and memory stays flat.
    """

    def __init__(self, tokenizer: Tokenizer, *, num_workers: int, check: bool = True):
        self._tokenizer = tokenizer
        self._check = check
        self._window = 2 * num_workers
        self._pool = None
        if num_workers > 1:
            ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
            self._pool = ctx.Pool(num_workers, _init_worker, (tokenizer, check))

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def encode(self, samples: Sequence[Sample]) -> Iterator[EncodedBatch]:
        """Encoded chunks of ``CHUNK_SIZE`` samples, in order; a chunk's turns are read
        when it is sent (a loader may keep them on disk: ``data.spill``)."""
        starts = range(0, len(samples), CHUNK_SIZE)
        return self._encode_chunks([s.turns for s in samples[i : i + CHUNK_SIZE]] for i in starts)

    def encode_conversations(self, convs: Sequence[Sequence[Turn]]) -> Iterator[EncodedBatch]:
        """Encoded chunks of ``CHUNK_SIZE`` conversations, in order."""
        starts = range(0, len(convs), CHUNK_SIZE)
        return self._encode_chunks(convs[i : i + CHUNK_SIZE] for i in starts)

    def _encode_chunks(self, chunks: Iterator[Sequence[Sequence[Turn]]]) -> Iterator[EncodedBatch]:
        if self._pool is None:
            for chunk in chunks:
                yield encode_batch(self._tokenizer, chunk, check=self._check)
            return
        pending: deque = deque()
        for convs in chunks:
            chunk = [tuple((t.role, t.text) for t in c) for c in convs]
            pending.append(self._pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= self._window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_samples(
    samples: Sequence[Sample],
    encoder: Encoder,
    writer: Any,
    stats: Stats,
    *,
    min_assistant_tokens: int | None,
    desc: str = "",
) -> None:
    """Encode, filter and append ``samples`` to ``writer`` (a :class:`shards.ShardWriter`
    or :class:`outputs.SplitWriter`; the latter also takes the accepted samples' chatml
    text when it writes a jsonl), updating ``stats``."""
    start = 0
    with tqdm(total=len(samples), desc=desc, unit="sample", disable=None) as bar:
        for batch in encoder.encode(samples):
            too_short = np.zeros(batch.lengths.size, dtype=bool)
            if min_assistant_tokens:
                too_short = ~batch.mismatch & (batch.assistant_tokens() < min_assistant_tokens)
            keep = ~(batch.mismatch | too_short)
            token_keep = np.repeat(keep, batch.lengths)
            writer.add_batch(batch.tokens[token_keep], batch.roles[token_keep], batch.lengths[keep])
            if getattr(writer, "write_text", False):
                chunk = samples[start : start + batch.lengths.size]
                writer.add_texts([format_chatml(chunk[i].turns) for i in np.flatnonzero(keep)])
            start += batch.lengths.size
            reasons = {
                "min_assistant_tokens": int(too_short.sum()),
                "tokenization_mismatch": int(batch.mismatch.sum()),
            }
            stats.add(batch.lengths[keep], reasons)
            bar.update(batch.lengths.size)


def _conversations(batches: Iterator[EncodedBatch]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(tokens, roles)`` per conversation of encoded chunks; a failed check: ``None``s."""
    for batch in batches:
        ends = np.cumsum(batch.lengths)
        for end, n, bad in zip(ends, batch.lengths, batch.mismatch, strict=True):
            if bad:
                yield None, None
            else:
                yield batch.tokens[end - n : end], batch.roles[end - n : end]


def write_ranked(
    samples: Sequence[RankedSample],
    encoder: Encoder,
    writer: shards.RankedShardWriter,
    stats: Stats,
    *,
    desc: str = "",
) -> None:
    """Encode rm examples (prefix, then each reply as an assistant turn) and append them to
    ``writer``; a prompt with a piece failing the tokenisation check is skipped."""
    convs = [c for s in samples for c in (s.prefix, *((r,) for r in s.replies))]
    pieces = _conversations(encoder.encode_conversations(convs))
    for sample in tqdm(samples, desc=desc, unit="prompt", disable=None):
        parts = [next(pieces) for _ in range(1 + len(sample.replies))]
        if any(tokens is None for tokens, _ in parts):
            stats.add(np.zeros(0, np.int64), {"tokenization_mismatch": 1})
            continue
        writer.add_example(parts)
        stats.add(np.array([sum(len(t) for t, _ in parts)]), {})
        stats.add_replies(np.array([len(sample.replies)]))
