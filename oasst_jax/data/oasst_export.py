"""Open-Assistant export loader: message trees -> root-to-leaf conversation threads.

Reproduces ``load_oasst_export`` of Open-Assistant ``model_training/custom_datasets/
oasst_dataset.py`` (mode ``sft``) with ``visit_threads_depth_first`` of
``oasst-data/oasst_data/traversal.py``:

* tree filter: ``tree_state == "ready_for_export"``, the **root** has a truthy
  ``review_result`` and the **root's** ``lang`` is in the ``lang`` list (no other message's
  review or language is checked);
* threads are root-to-leaf paths of length > 1, visited depth first in ``replies`` order;
  a path ending on an assistant leaf is kept, one ending on a prompter leaf only if that
  prompter is its parent's first reply, and that prompter leaf is then removed;
* thread filter: drop a thread if any message on it (removed prompter leaf included) is
  ``deleted`` or ``synthetic``; with ``top_k``, drop it if an assistant on it has
  ``rank is None`` while its parent has more than one reply, or ``rank >= top_k``.

Deviations, where upstream would crash or emit unusable samples: a malformed line (bad
JSON, missing or mistyped field, roles that do not alternate starting with the prompter) skips that
tree, and a thread with an empty (whitespace-only) message is dropped as ``empty_text``.

``mode="rm"`` (upstream's ``mode == "rm"`` branch of the same function, for reward models
and DPO): ``visit_threads_depth_first`` visits *every* root-to-node path (pre-order: a
node's path before its children's, children in ``replies`` order) and keeps a path as a
prefix when

* it ends on a **prompter** message that has **more than one ranked reply** (``rank`` not
  null), and
* it passes the same ``thread_filter`` as sft (no ``deleted`` or ``synthetic`` message on
  the prefix; with ``top_k``, the rank rule above applied to the prefix's assistants).

The example is that prefix plus the ranked replies (``rank`` not null) **sorted by rank,
best first** (:class:`RankedSample`).  As upstream, the replies themselves are not checked
for ``deleted`` or ``synthetic`` (the ``*_oasst_ready`` exports hold no deleted messages).
recipe.md ("oasst_export rules") supports the tree filter, the ``thread_filter`` and the
split by tree; it says nothing of rm mode, whose rule here is the one the trainer issue
(#19) quotes from upstream.  Our one deviation is the sft one: a prefix with an empty
(whitespace-only) message is skipped as ``empty_text``; an empty reply is left out
(``empty_reply``), and the prefix is skipped as ``empty_text`` when fewer than two replies
remain.  Prompter messages with replies but fewer than two ranked ones are counted as
``too_few_ranked``.

Upstream splits the accepted *trees* (those without a single thread included) with torch
``random_split(trees, [1 - val_split, val_split])``, so :class:`LoadResult` carries every
accepted tree id (``groups``, ``upstream_split="random_split"``); the pretokenizer splits.

``skipped`` counts trees for the tree-level reasons (``bad_json``, ``missing_field``,
``bad_field``, ``role_order``, ``tree_state``, ``review_result``, ``language``) and threads for the
thread-level ones (``prompter_leaf``: a prompter leaf that is not its parent's first reply,
``deleted``, ``synthetic``, ``top_k``, ``empty_text``).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from oasst_jax.data.conversation import LoadResult, Sample
from oasst_jax.readers import iter_jsonl_input, record_limit, require_path
from oasst_jax.turns import DataError, Turn

NAME = "oasst_export"
ROLE_MAP = {"prompter": "user", "assistant": "assistant"}
MODES = ("sft", "rm")  # upstream's modes we implement (not "rl")


class MalformedTree(Exception):
    """A tree line that cannot be used; ``reason`` is its skip-counter key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Message:
    """The fields of an export message node that the SFT conversion reads."""

    role: str
    text: str
    lang: str | None
    review_result: bool | None
    deleted: bool
    synthetic: bool
    rank: int | None
    replies: tuple[Message, ...]


def parse_lang(lang: str | Sequence[str] | None) -> frozenset[str]:
    """Language codes from the card's comma string (``"bg,ca,..."``) or a list.
    Upstream's default is ``"en"``."""
    if lang is None:
        lang = "en"
    codes = lang.split(",") if isinstance(lang, str) else list(lang)
    parsed = frozenset(str(c).strip() for c in codes if str(c).strip())
    if not parsed:
        raise DataError(f"{NAME}: option 'lang' is empty")
    return parsed


def parse_top_k(top_k: Any) -> int | None:
    """``top_k`` is a positive int or ``None`` (keep every rank)."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise DataError(f"{NAME}: option 'top_k' must be a positive int or None, got {top_k!r}")
    return top_k


def parse_mode(mode: Any) -> str:
    """``mode`` is ``"sft"`` (default) or ``"rm"``."""
    if mode is None:
        return "sft"
    if mode not in MODES:
        raise DataError(f"{NAME}: option 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class RankedSample:
    """One rm-mode example: a conversation prefix ending on a user turn and its ranked
    assistant replies, best (rank 0) first.  ``group`` is the tree id (the split unit)."""

    prefix: tuple[Turn, ...]
    replies: tuple[Turn, ...]
    group: str


def _field(node: Mapping[str, Any], key: str, kind: type) -> Any:
    """An optional field of ``kind`` (absent or null -> ``None``); a wrong type, a bool
    where a number is expected included, makes the tree ``bad_field``."""
    value = node.get(key)
    if value is None:
        return None
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise MalformedTree("bad_field")
    return value


def parse_message(node: Any, expected_role: str) -> Message:
    """Build a :class:`Message` tree from an export node, checking that roles alternate
    (prompter at the root).  Optional flags default as in the export's pydantic model."""
    if not isinstance(node, Mapping):
        raise MalformedTree("missing_field")
    if not isinstance(node.get("text"), str) or "role" not in node:
        raise MalformedTree("missing_field")
    if node["role"] != expected_role:
        raise MalformedTree("role_order")
    child_role = "assistant" if expected_role == "prompter" else "prompter"
    replies = _field(node, "replies", list) or []
    return Message(
        role=expected_role,
        text=node["text"],
        lang=_field(node, "lang", str),
        review_result=_field(node, "review_result", bool),
        deleted=bool(_field(node, "deleted", bool)),
        synthetic=bool(_field(node, "synthetic", bool)),
        rank=_field(node, "rank", int),
        replies=tuple(parse_message(r, child_role) for r in replies),
    )


def tree_skip_reason(tree_state: Any, root: Message, langs: frozenset[str]) -> str | None:
    """Upstream's tree filter, in its order; ``None`` keeps the tree."""
    if tree_state != "ready_for_export":
        return "tree_state"
    if not root.review_result:
        return "review_result"
    if root.lang not in langs:
        return "language"
    return None


def iter_leaf_paths(root: Message) -> Iterable[list[Message]]:
    """Root-to-leaf paths in upstream's depth-first order (``replies`` order)."""
    stack: list[list[Message]] = [[root]]
    while stack:
        path = stack.pop()
        node = path[-1]
        if not node.replies:
            yield path
        stack.extend(path + [child] for child in reversed(node.replies))


def thread_skip_reason(thread: Sequence[Message], top_k: int | None) -> str | None:
    """Upstream's ``leaf_filter``/``thread_filter`` for a root-to-leaf path; ``None`` keeps
    it.  ``thread`` has at least two messages."""
    leaf, parent = thread[-1], thread[-2]
    if leaf.role == "prompter" and parent.replies[0] is not leaf:
        return "prompter_leaf"
    if any(m.deleted for m in thread):
        return "deleted"
    if any(m.synthetic for m in thread):
        return "synthetic"
    if top_k is not None and _violates_top_k(thread, top_k):
        return "top_k"
    if any(not m.text.strip() for m in thread):
        return "empty_text"
    return None


def _violates_top_k(thread: Sequence[Message], top_k: int) -> bool:
    for i, m in enumerate(thread):
        if m.role != "assistant":
            continue
        if m.rank is None:
            if i > 0 and len(thread[i - 1].replies) > 1:
                return True
        elif m.rank >= top_k:
            return True
    return False


def tree_threads(
    root: Message, top_k: int | None, skipped: collections.Counter
) -> list[tuple[Turn, ...]]:
    """The SFT threads of one accepted tree, each ending on an assistant turn."""
    threads = []
    for path in iter_leaf_paths(root):
        if len(path) < 2:  # a root without replies is no conversation
            continue
        reason = thread_skip_reason(path, top_k)
        if reason is not None:
            skipped[reason] += 1
            continue
        if path[-1].role == "prompter":
            path = path[:-1]
        threads.append(tuple(Turn(ROLE_MAP[m.role], m.text) for m in path))
    return threads


def iter_prefix_paths(root: Message) -> Iterable[list[Message]]:
    """Every root-to-node path in upstream's ``visit_threads_depth_first`` order (pre-order,
    ``replies`` order)."""
    stack: list[list[Message]] = [[root]]
    while stack:
        path = stack.pop()
        yield path
        stack.extend(path + [child] for child in reversed(path[-1].replies))


def prefix_skip_reason(prefix: Sequence[Message], top_k: int | None) -> str | None:
    """Upstream's rm-mode ``leaf_filter`` for a prefix ending on a prompter with replies
    (the caller checks the role); ``None`` keeps it."""
    if sum(r.rank is not None for r in prefix[-1].replies) < 2:
        return "too_few_ranked"
    if any(m.deleted for m in prefix):
        return "deleted"
    if any(m.synthetic for m in prefix):
        return "synthetic"
    if top_k is not None and _violates_top_k(prefix, top_k):
        return "top_k"
    if any(not m.text.strip() for m in prefix):
        return "empty_text"
    return None


def tree_ranked(
    root: Message, top_k: int | None, skipped: collections.Counter
) -> list[tuple[tuple[Turn, ...], tuple[Turn, ...]]]:
    """The rm examples ``(prefix turns, replies best first)`` of one accepted tree."""
    examples = []
    for path in iter_prefix_paths(root):
        if path[-1].role != "prompter" or not path[-1].replies:
            continue
        reason = prefix_skip_reason(path, top_k)
        if reason is not None:
            skipped[reason] += 1
            continue
        ranked = sorted((r for r in path[-1].replies if r.rank is not None), key=lambda r: r.rank)
        replies = [r for r in ranked if r.text.strip()]
        if len(replies) < len(ranked):
            skipped["empty_reply"] += len(ranked) - len(replies)
        if len(replies) < 2:
            skipped["empty_text"] += 1
            continue
        prefix = tuple(Turn(ROLE_MAP[m.role], m.text) for m in path)
        examples.append((prefix, tuple(Turn("assistant", r.text) for r in replies)))
    return examples


def load_oasst_export(options: Mapping[str, Any]) -> LoadResult:
    """Load an Open-Assistant export (options ``input_file_path``, ``lang``, ``top_k``,
    ``mode``, ``max_record_bytes``), grouped by ``message_tree_id``: mode ``sft`` gives one
    :class:`Sample` per thread, ``rm`` one :class:`RankedSample` per ranked prefix."""
    path = require_path(options.get("input_file_path"), f"{NAME}.input_file_path")
    langs = parse_lang(options.get("lang"))
    top_k = parse_top_k(options.get("top_k"))
    mode = parse_mode(options.get("mode"))
    skipped: collections.Counter = collections.Counter()
    samples: list[Any] = []
    trees: list[str] = []  # every tree that passed the tree filter: upstream's split units
    for record in iter_jsonl_input(path, skipped, record_limit(options)):
        try:
            tree_id = record.get("message_tree_id")
            if not isinstance(tree_id, str) or not tree_id or "prompt" not in record:
                raise MalformedTree("missing_field")
            root = parse_message(record["prompt"], "prompter")
        except MalformedTree as e:
            skipped[e.reason] += 1
            continue
        except RecursionError:  # absurdly deep nesting cannot come from a real export
            skipped["bad_field"] += 1
            continue
        reason = tree_skip_reason(record.get("tree_state"), root, langs)
        if reason is not None:
            skipped[reason] += 1
            continue
        trees.append(tree_id)
        if mode == "rm":
            examples = tree_ranked(root, top_k, skipped)
            samples.extend(RankedSample(p, r, tree_id) for p, r in examples)
        else:
            samples.extend(Sample(t, tree_id) for t in tree_threads(root, top_k, skipped))
    return LoadResult(NAME, samples, skipped, groups=trees, upstream_split="random_split")
