"""Loaded conversations kept in a temporary file, each read back when it is encoded.

The card's stage-1 inputs hold ~2.6 GB of text (megacode2 alone 1.75 GB).  Held as Python
strings, one dataset's conversations would take more memory than the file (a string with one
character beyond Latin-1 takes 2 or 4 bytes per character), and the pretokenizer has to keep
every conversation of a dataset until its split is drawn.  So the loaders write each accepted
conversation's turns to an unnamed temporary file (:func:`tempfile.TemporaryFile`, in
``TMPDIR``: disk of about the dataset's kept text, freed when the store is garbage-collected)
and keep only a :class:`StoredSample` per conversation: its group key and where its turns lie.
Reading a sample's ``turns`` decodes them again, bit for bit (UTF-8 with ``surrogatepass``,
so any Python string round-trips).  The page cache, not the process, holds the file.

Hand-written because what is needed is an append-only list of variable-length strings with
random access, which neither the standard library nor numpy offers without holding it in
memory; the format is private to one run.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Sequence

from oasst_jax.turns import ROLES, Turn

_ENCODING = ("utf-8", "surrogatepass")
_BUFFER = 1 << 20  # bytes written at a time: one write call per ~500 of the card's rows


class SpillStore:
    """Append-only conversations (tuples of :class:`Turn`) in an unnamed temporary file."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="oasst_jax-spill-", buffering=_BUFFER)
        self._first_turn = array("q", [0])  # conversation i: turns first_turn[i]:first_turn[i+1]
        self._roles = array("B")  # per turn: index into ROLES
        self._ends = array("q")  # per turn: end offset of its UTF-8 text in the file
        self._size = 0
        self._flushed = True

    def __len__(self) -> int:
        return len(self._first_turn) - 1

    def add(self, turns: Sequence[Turn]) -> int:
        """Append one conversation; returns its index."""
        data = [t.text.encode(*_ENCODING) for t in turns]
        for turn, text in zip(turns, data, strict=True):
            self._size += len(text)
            self._roles.append(ROLES.index(turn.role))
            self._ends.append(self._size)
        self._file.write(b"".join(data))
        self._flushed = False
        self._first_turn.append(len(self._ends))
        return len(self) - 1

    def turns(self, index: int) -> tuple[Turn, ...]:
        """Conversation ``index``, as it was added."""
        if not self._flushed:
            self._file.flush()
            self._flushed = True
        first, last = self._first_turn[index], self._first_turn[index + 1]
        if first == last:
            return ()
        start = self._ends[first - 1] if first else 0
        data = os.pread(self._file.fileno(), self._ends[last - 1] - start, start)
        out, pos = [], 0
        for i in range(first, last):
            end = self._ends[i] - start
            out.append(Turn(ROLES[self._roles[i]], data[pos:end].decode(*_ENCODING)))
            pos = end
        return tuple(out)


class StoredSample:
    """A :class:`~oasst_jax.data.conversation.Sample` whose turns live in a
    :class:`SpillStore`: ``group`` is held, ``turns`` read on each access."""

    __slots__ = ("_store", "_index", "group")

    def __init__(self, store: SpillStore, index: int, group: str):
        self._store = store
        self._index = index
        self.group = group

    @property
    def turns(self) -> tuple[Turn, ...]:
        return self._store.turns(self._index)

    def __repr__(self) -> str:
        return f"StoredSample(group={self.group!r})"
