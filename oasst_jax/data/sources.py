"""The card's datasets as loaders over local files in their upstream formats.

Each loader mirrors the Open-Assistant class that reads the dataset
(``model/model_training/custom_datasets/``): ``InstructionDataset`` for megacode2 and
oa_leet10k, ``OrcaChat``, ``Dolly15kMultilingual`` and ``load_oasst_export``.  A loader takes
its dataset's options (a dict or ``ml_collections.ConfigDict``; keys it does not know, such
as ``fraction`` / ``val_split`` / ``max_val_set``, belong to the splitter and are ignored;
:data:`OPTIONS` lists each loader's own, so a config can reject misspelt ones) and returns
a :class:`LoadResult`.  Rows are kept or dropped as upstream does (refusal phrases, empty
sides, empty turns: see each loader); records that upstream would crash on (missing or
mistyped fields, bad JSON) are skipped and counted by reason.

Where the input comes from (:func:`input_files`): a local ``path`` wins; without one, the
dataset's Hugging Face hub id ``repo_id`` and its ``data_files`` (``revision`` optional) are
fetched into the standard Hugging Face cache by :mod:`oasst_jax.hub`, as upstream's
``load_dataset`` calls read them (the card configs name each dataset's upstream source).
Accepted conversations are kept on disk (:mod:`oasst_jax.data.spill`) and JSON arrays are
streamed (:mod:`oasst_jax.readers`), so loading the card's 1.75 GB megacode2 file takes memory
for its per-row bookkeeping only.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ahocorasick_rs
import numpy as np

from oasst_jax import hub
from oasst_jax.data.conversation import LoadResult
from oasst_jax.data.oasst_export import load_oasst_export
from oasst_jax.data.spill import SpillStore, StoredSample
from oasst_jax.readers import read_records, record_limit, require_path
from oasst_jax.turns import DataError, Turn

# Upstream ``INSTRUCTION_DATASETS`` column names (role -> column).
INSTRUCTION_COLUMNS: dict[str, dict[str, str]] = {
    "megacode2": {"user": "USER", "assistant": "ASSISTANT"},
    "oa_leet10k": {"user": "INSTRUCTION", "assistant": "RESPONSE"},
}
DOLLY_SPLITS = ("en", "de", "es", "fr")
# Files holding one split of the Hugging Face dataset, in lookup order: the hub's parquet
# conversion (``data/en-00000-of-00001.parquet``) or a local export per split.
DOLLY_SPLIT_PATTERNS = (
    "data/{split}-*.parquet",
    "{split}-*.parquet",
    "{split}.parquet",
    "{split}.jsonl",
    "{split}.jsonl.gz",
    "{split}.json",
)
# Upstream ``Dolly15kMultilingual._process_instruction`` cleans ``context`` with exactly
# these three steps, in this order, and nothing else (no strip): ``re_reference_remove``
# (``[1]``, ``[1, 2]``; not ``[ 1 ]`` nor ``[12-14]``), the literal ``[citation needed]``,
# then ``citation_regex`` (``[a]``, ``[A]``).
REFERENCE_RE = re.compile(r"\[\d+(?:,\s*\d+)*?\]")
CITATION_NEEDED = "[citation needed]"
LETTER_CITATION_RE = re.compile(r"\[[a-zA-Z]\]")

# Upstream ``FILTER_BY_WORDS`` (``custom_datasets/utils.py``): a megacode2, oa_leet10k or
# dolly15k_multilingual row whose question or answer contains one of these (case-insensitive
# substring) is dropped.  Trailing spaces are part of a phrase.  Duplicates kept as upstream.
REFUSAL_PHRASES: tuple[str, ...] = (
    "as a language model",
    "as an AI language model",
    "As a large language model",
    "As an AI ",
    "an AI language model you don't have",
    "As an AI language model, I cannot",
    "As an AI language model, I do not",
    "As an AI language model, I am not able",
    "As an AI language model, I don't have personal",
    "I am an AI language model and do not",
    "As an AI language model, I don't have",
    "As an AI language model, I am only able",
    "AI language model and I do not",
    "As an AI language model, I cannot modify",
    "As an AI language model, I do not",
    "I know as an AI language model you don't have",
    "as an AI language model, you cannot",
    "I'm sorry, but as an AI language model",
    "As an AI language model, I don't have",
    "I'm an AI ",
    "I am an AI ",
    "As your dedicated AI language model",
    "As a hypothetical AI",
    "As a neutral AI",
    "my knowledge cutoff",
    "my knowledge cut off",
    "As a machine",
    "I cannot assist",
    "I do not have personal preferences",
    "I don't have personal preferences",
    "Unfortunately, I cannot provide",
    "I'm sorry, I cannot",
    "I'm sorry, I cannot generate",
    "AI cannot create or program",
    "I'm afraid I cannot create",
    "OpenAI",
)


def _text(record: Mapping[str, Any], column: str) -> tuple[str | None, str | None]:
    """``(text, None)`` for a usable string column, else ``(None, reason)``: a missing or
    null column is ``missing_field``, a non-string ``bad_field``, blank ``empty_text``."""
    value = record.get(column)
    if value is None:
        return None, "missing_field"
    if not isinstance(value, str):
        return None, "bad_field"
    if not value.strip():
        return None, "empty_text"
    return value, None


class PhraseFilter:
    """Whether a text holds one of many phrases, case-insensitively, in one pass per text.

    Upstream tests each phrase with ``in`` (36 phrases, two texts a row): at the card's size
    that was ~22 s of megacode2's ~42 s load on one core, before any encoding can start.  An
    Aho-Corasick automaton (``ahocorasick_rs``) over the lowered phrases finds the same rows
    scanning each lowered text once (~8 s); ``tests/test_sources.py`` checks it against the
    per-phrase ``in``."""

    def __init__(self, phrases: Iterable[str]):
        lowered = list(dict.fromkeys(p.lower() for p in phrases if p))
        self._automaton = ahocorasick_rs.AhoCorasick(lowered) if lowered else None

    def __call__(self, *texts: str) -> bool:
        if self._automaton is None:
            return False
        return any(self._automaton.find_matches_as_indexes(t.lower()) for t in texts)


NO_PHRASES = PhraseFilter(())


def _phrases(options: Mapping[str, Any]) -> PhraseFilter:
    """Option ``phrase_filter``: a row whose question or answer contains one of these
    phrases (case-insensitive substring) is dropped and counted as ``phrase_filter``.
    Unset (``None``): upstream's :data:`REFUSAL_PHRASES`, which made the card's counts; an
    empty list turns the filter off."""
    phrases = options.get("phrase_filter")
    if phrases is None:
        phrases = REFUSAL_PHRASES
    elif isinstance(phrases, str):
        phrases = (phrases,)
    if not isinstance(phrases, (list, tuple)) or not all(isinstance(p, str) for p in phrases):
        raise DataError(f"phrase_filter must be a list of strings, got {phrases!r}")
    return PhraseFilter(phrases)


def _drop_blank(options: Mapping[str, Any], name: str) -> bool:
    """Option ``drop_blank_turns`` (orca-chat, dolly15k_multilingual), default ``False``:
    upstream keeps empty turns (see the loaders); ``True`` drops a row with a blank
    (whitespace-only) turn instead and keeps no blank system or context turn."""
    value = options.get("drop_blank_turns")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise DataError(f"{name}.drop_blank_turns must be true or false, got {value!r}")
    return value


def _columns(name: str, options: Mapping[str, Any]) -> dict[str, str]:
    """Default upstream columns, overridden per role by the ``columns`` option."""
    columns = dict(INSTRUCTION_COLUMNS[name])
    override = options.get("columns") or {}
    for role in override.keys():
        if role not in columns:
            raise DataError(f"{name}.columns: unknown role {role!r}; expected user/assistant")
        columns[role] = str(override[role])
    return columns


def input_files(name: str, options: Mapping[str, Any]) -> list[Path]:
    """The dataset's local input, in reading order.  Its root (:func:`input_root`) when
    that is a file; a directory (a hub snapshot, or a local copy of one) gives the files
    ``data_files`` names (a path in it, a glob, or a list of them), in that order;
    dolly15k_multilingual reads its splits from the directory itself."""
    root, where = input_root(name, options)
    if name == "dolly15k_multilingual" or not root.is_dir():
        return [root]
    data_files = options.get("data_files")
    if not data_files:
        raise DataError(f"{name}.data_files: which files under {root} to read is not set")
    return hub.match_files(root, data_files, where=where)


def input_root(name: str, options: Mapping[str, Any]) -> tuple[Path, str]:
    """``(root, the option naming it)``: option ``path`` when set, else the snapshot of the
    hub dataset ``repo_id`` (at ``revision``, default its main branch) holding
    ``data_files``, fetched into the Hugging Face cache (:func:`oasst_jax.hub.fetch`)."""
    if options.get("path"):
        return require_path(options["path"], f"{name}.path"), f"{name}.path"
    repo_id, data_files = options.get("repo_id"), options.get("data_files")
    if not repo_id:
        raise DataError(f"{name}.path: no input path configured (set path, or repo_id)")
    if not data_files:
        raise DataError(f"{name}.data_files: which files of {repo_id} to read is not set")
    where = f"{name}.repo_id"
    root, _ = hub.fetch(str(repo_id), data_files, what=where, revision=options.get("revision"))
    return root, where


def _records(files: list[Path], skipped: collections.Counter, max_bytes: int) -> Iterator[dict]:
    """The records of ``files``, one file after the other (as ``load_dataset`` concatenates
    a dataset's data files)."""
    for file in files:
        yield from read_records(file, skipped, max_bytes)


Turns = tuple[tuple[Turn, ...] | None, str | None]  # the turns, or the reason to skip


def collect(
    display: str,
    keyed_records: Iterable[tuple[str, Any]],
    to_turns: Callable[[Any], Turns],
    skipped: collections.Counter,
) -> LoadResult:
    """Samples from ``(group key, record)`` pairs, their turns spilled to disk
    (:class:`StoredSample`); a record ``to_turns`` rejects is counted under its reason
    (``skipped`` may already hold the reader's counts)."""
    store = SpillStore()
    samples = []
    for key, record in keyed_records:
        turns, reason = to_turns(record)
        if reason is not None:
            skipped[reason] += 1
            continue
        samples.append(StoredSample(store, store.add(turns), key))
    return LoadResult(display, samples, skipped)


def instruction_turns(
    record: Mapping[str, Any], columns: Mapping[str, str], refused: PhraseFilter
) -> Turns:
    """One user/assistant pair from the configured columns (upstream ``InstructionDataset``:
    both sides non-empty after strip, neither containing a refusal phrase)."""
    user, reason = _text(record, columns["user"])
    if reason is None:
        answer, reason = _text(record, columns["assistant"])
    if reason is None and refused(user, answer):
        reason = "phrase_filter"
    if reason is not None:
        return None, reason
    return (Turn("user", user), Turn("assistant", answer)), None


def instruction_loader(name: str, display: str) -> Callable[[Mapping[str, Any]], LoadResult]:
    """Loader for a one-pair-per-row instruction dataset (megacode2, oa_leet10k).

    Upstream's ``InstructionDataset`` shuffles the row order with a seeded RNG (seed 42,
    option ``shuffle_seed``); ours is ``np.random.default_rng(seed).permutation`` over the
    rows read (deterministic, not upstream's exact order).  The rows are read once in file
    order, accepted ones spilled to disk, then ordered by the permutation."""

    def load(options: Mapping[str, Any]) -> LoadResult:
        files = input_files(name, options)
        columns = _columns(name, options)
        refused = _phrases(options)
        seed = int(options.get("shuffle_seed", 42))
        skipped: collections.Counter = collections.Counter()
        store = SpillStore()
        rows: list[StoredSample | None] = []  # per row read: its sample, None if dropped
        for i, record in enumerate(_records(files, skipped, record_limit(options))):
            turns, reason = instruction_turns(record, columns, refused)
            if reason is not None:
                skipped[reason] += 1
                rows.append(None)
            else:
                rows.append(StoredSample(store, store.add(turns), f"{name}:{i}"))
        order = np.random.default_rng(seed).permutation(len(rows))
        samples = [s for s in (rows[i] for i in order) if s is not None]
        return LoadResult(display, samples, skipped)

    return load


def _string(record: Mapping[str, Any], column: str, drop_blank: bool) -> tuple[Any, Any]:
    """``(text, None)`` for a string column (blank allowed unless ``drop_blank``), else
    ``(None, reason)``; upstream would crash on a missing or non-string value."""
    if drop_blank:
        return _text(record, column)
    value = record.get(column)
    if value is None:
        return None, "missing_field"
    if not isinstance(value, str):
        return None, "bad_field"
    return value, None


def orca_turns(record: Mapping[str, Any], drop_blank: bool = False) -> Turns:
    """``OrcaChat``: ``instruction`` -> system turn when it has length > 0 (a lone space
    counts), each ``{input, output}`` of ``conversation`` -> a user and an assistant turn.

    Upstream checks nothing, so empty inputs/outputs stay as empty turns (and an empty
    ``conversation`` is a sample without turns, which ``min_assistant_tokens`` skips).
    ``drop_blank``: a blank input/output or an empty conversation drops the row
    (``empty_text``) and a blank instruction gives no system turn."""
    conversation = record.get("conversation")
    if conversation is None:
        return None, "missing_field"
    if not isinstance(conversation, list):
        return None, "bad_field"
    if drop_blank and not conversation:
        return None, "empty_text"
    system = record.get("instruction")
    if system is not None and not isinstance(system, str):
        return None, "bad_field"
    keep_system = bool(system) and not (drop_blank and not system.strip())
    turns = [Turn("system", system)] if keep_system else []
    for exchange in conversation:
        if not isinstance(exchange, Mapping):
            return None, "bad_field"
        for column, role in (("input", "user"), ("output", "assistant")):
            text, reason = _string(exchange, column, drop_blank)
            if reason is not None:
                return None, reason
            turns.append(Turn(role, text))
    return tuple(turns), None


def load_orca_chat(options: Mapping[str, Any]) -> LoadResult:
    """``OrcaChat (orca-chat)`` from ``orca-chat-gpt4.json`` (options ``path`` or
    ``repo_id``/``data_files``, ``drop_blank_turns``)."""
    files = input_files("orca-chat", options)
    drop_blank = _drop_blank(options, "orca-chat")
    skipped: collections.Counter = collections.Counter()
    records = _records(files, skipped, record_limit(options))
    keyed = ((f"orca-chat:{i}", r) for i, r in enumerate(records))
    to_turns = functools.partial(orca_turns, drop_blank=drop_blank)
    return collect("OrcaChat (orca-chat)", keyed, to_turns, skipped)


def clean_context(context: str) -> str:
    """Upstream's three cleaning steps, in order: ``[1]``/``[1, 2]`` references, the literal
    ``[citation needed]``, ``[a]``/``[A]`` letter citations.  Not stripped."""
    context = REFERENCE_RE.sub("", context)
    context = context.replace(CITATION_NEEDED, "")
    return LETTER_CITATION_RE.sub("", context)


def dolly_turns(
    record: Mapping[str, Any], refused: PhraseFilter = NO_PHRASES, drop_blank: bool = False
) -> Turns:
    """``instruction`` -> user, cleaned ``context`` -> its own ``context`` turn when it is a
    non-empty string (whitespace only included), ``response`` -> assistant (upstream
    ``create_dataset_entry_qa(context=...)``).

    Upstream keeps a row when ``_filter_by_words(instruction) and
    _filter_by_words(response)``: the filter returns the text itself, so an *empty*
    instruction or response drops the row (``empty_text``; a whitespace-only one does not),
    and so does a refusal phrase in either (``phrase_filter``).  ``drop_blank``: a blank
    instruction or response drops the row and a blank context gives no turn."""
    user, reason = _string(record, "instruction", drop_blank)
    if reason is None:
        answer, reason = _string(record, "response", drop_blank)
    context = record.get("context") or ""
    if reason is None and not isinstance(context, str):
        reason = "bad_field"
    if reason is None and not (user and answer):
        reason = "empty_text"
    if reason is None and refused(user, answer):
        reason = "phrase_filter"
    if reason is not None:
        return None, reason
    context = clean_context(context)
    has_context = bool(context) and not (drop_blank and not context.strip())
    middle = (Turn("context", context),) if has_context else ()
    return (Turn("user", user), *middle, Turn("assistant", answer)), None


def dolly_split_files(root: Path, split: str) -> list[Path]:
    """The files of one split under ``root``: the first layout pattern that matches."""
    for pattern in DOLLY_SPLIT_PATTERNS:
        files = sorted(root.glob(pattern.format(split=split)))
        if files:
            return files
    raise DataError(f"dolly15k_multilingual.path: no file for split {split!r} under {root}")


def _iter_dolly(
    root: Path, skipped: collections.Counter, max_bytes: int
) -> Iterator[tuple[str, int, Any]]:
    """``(split, index within split, record)`` over the splits in upstream order."""
    for split in DOLLY_SPLITS:
        records = (
            r
            for file in dolly_split_files(root, split)
            for r in read_records(file, skipped, max_bytes)
        )
        for index, record in enumerate(records):
            yield split, index, record


def load_dolly15k_multilingual(options: Mapping[str, Any]) -> LoadResult:
    """``Dolly15kMultilingual``: splits en, de, es, fr of a directory (options ``path`` or
    ``repo_id``/``data_files``, ``phrase_filter``, ``drop_blank_turns``)."""
    roots = input_files("dolly15k_multilingual", options)
    if len(roots) != 1:
        raise DataError(f"dolly15k_multilingual.path: one directory, got {len(roots)} paths")
    root = roots[0]
    if not root.is_dir():
        raise DataError(f"dolly15k_multilingual.path: not a directory: {root}")
    for split in DOLLY_SPLITS:  # fail at start, before reading anything
        dolly_split_files(root, split)
    refused = _phrases(options)
    drop_blank = _drop_blank(options, "dolly15k_multilingual")
    skipped: collections.Counter = collections.Counter()
    rows = _iter_dolly(root, skipped, record_limit(options))
    keyed = ((f"dolly15k_multilingual:{split}:{i}", r) for split, i, r in rows)
    to_turns = functools.partial(dolly_turns, refused=refused, drop_blank=drop_blank)
    return collect("Dolly15kMultilingual", keyed, to_turns, skipped)


# The datasets that can come from the hub (the oasst export is a local file).
HUB_DATASETS = ("megacode2", "orca-chat", "dolly15k_multilingual", "oa_leet10k")
LOADERS: dict[str, Callable[[Mapping[str, Any]], LoadResult]] = {
    "megacode2": instruction_loader("megacode2", "InstructionDataset (megacode2)"),
    "orca-chat": load_orca_chat,
    "dolly15k_multilingual": load_dolly15k_multilingual,
    "oa_leet10k": instruction_loader("oa_leet10k", "InstructionDataset (oa_leet10k)"),
    "oasst_export": load_oasst_export,
}

# Each loader's own options (the splitter's are pretokenize.SPLIT_OPTIONS); a config
# naming any other key is refused, so a misspelt option cannot be silently ignored.
_RECORD_OPTIONS = ("max_record_bytes",)
_SOURCE = ("path", "repo_id", "data_files", "revision")  # input_files
OPTIONS: dict[str, tuple[str, ...]] = {
    "megacode2": (*_SOURCE, "columns", "phrase_filter", "shuffle_seed", *_RECORD_OPTIONS),
    "orca-chat": (*_SOURCE, "drop_blank_turns", *_RECORD_OPTIONS),
    "dolly15k_multilingual": (*_SOURCE, "phrase_filter", "drop_blank_turns", *_RECORD_OPTIONS),
    "oa_leet10k": (*_SOURCE, "columns", "phrase_filter", "shuffle_seed", *_RECORD_OPTIONS),
    "oasst_export": ("input_file_path", "lang", "top_k", *_RECORD_OPTIONS),
}


def load_dataset(name: str, options: Mapping[str, Any]) -> LoadResult:
    """Load dataset ``name`` of the card's mixes with its options."""
    loader = LOADERS.get(name)
    if loader is None:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(LOADERS)}")
    return loader(options)
