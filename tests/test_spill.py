"""oasst_jax.data.spill: conversations written to a temporary file read back bit for bit."""

from __future__ import annotations

import gc
import weakref

from oasst_jax.data.spill import SpillStore, StoredSample
from oasst_jax.turns import Turn

CONVERSATIONS = [
    (Turn("system", "Be brief."), Turn("user", "héllo → 中文 🙂"), Turn("assistant", "ok\n")),
    (),  # orca-chat's empty conversation
    (Turn("user", ""), Turn("context", " "), Turn("assistant", "")),  # empty turns kept
    (Turn("user", "lone surrogate \ud800 and NUL \x00"), Turn("assistant", "x" * 100_000)),
]


def test_turns_read_back_as_added():
    store = SpillStore()
    samples = [StoredSample(store, store.add(c), f"g{i}") for i, c in enumerate(CONVERSATIONS)]
    assert len(store) == len(CONVERSATIONS)
    for _ in range(2):  # reads are repeatable, in any order
        for sample, conversation in reversed(list(zip(samples, CONVERSATIONS, strict=True))):
            assert sample.turns == conversation
    late = StoredSample(store, store.add(CONVERSATIONS[0]), "late")  # adds after reads
    assert late.turns == CONVERSATIONS[0] and samples[3].turns == CONVERSATIONS[3]
    assert [s.group for s in samples] == ["g0", "g1", "g2", "g3"]


def test_the_file_goes_with_the_store():
    store = SpillStore()
    sample = StoredSample(store, store.add(CONVERSATIONS[0]), "g")
    spill = weakref.ref(store._file)  # the unnamed file's handle
    del store
    assert sample.turns == CONVERSATIONS[0]  # a sample keeps its store
    del sample
    gc.collect()
    assert spill() is None  # closed: the OS frees the unlinked file
