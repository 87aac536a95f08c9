"""The pretokenizer's statistics: upstream's per-split ``_stats.txt`` and our ``stats.md``.

Upstream (``model/pretokenizer/pretokenize.py``, ``tokenize_dataset``) prints one block per
dataset of a split and one for ``total``, and writes them to ``{prefix}-{split}_stats.txt``::

    \\n# Stats for {output_dir}/{prefix}-{split}*\\n\\n
    ## Stats for '{title}' ({n} samples ({fraction:.1%}))
    -----------------
      Accepted: {accepted}/{processed} ({accepted/processed:.1%})
      Accepted tokens: {tokens}
      Skipped: {skipped} ({skipped/processed:.1%})
      Min tokens per sample: {min}
      Max tokens per sample: {max}
      Avg tokens per sample: {tokens/accepted}
    -----------------\\n\\n

``title`` is the dataset's torch repr (``Subset of InstructionDataset (megacode2)``,
``ListDataset``: :func:`dataset_title`), ``n`` its size after ``fraction``.  Upstream divides
by zero on a block with 0 processed or 0 accepted samples; ours prints 0.0% and a min, max
and average of 0.  Our skips (``min_assistant_tokens``, ``tokenization_mismatch``, where
upstream crashes) are counted in ``Skipped``; ``stats.md`` adds the counts by reason.

An rm-mode block (``ranked``; upstream's pretokenizer has none) counts prompts as samples,
their tokens as the prefix's plus every reply's, and adds one line after the average::

      Replies per prompt: {replies/accepted} (min {min}, max {max})
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from oasst_jax.data.conversation import LoadResult

RULE = "-----------------"


@dataclass
class Stats:
    """One block of the card's statistics report."""

    name: str  # the loader's display name (stats.md)
    total: int
    fraction: float = 1.0
    key: str = ""  # the config's dataset name
    title: str = ""  # upstream's name for the dataset (_stats.txt); default: ``name``
    accepted: int = 0
    skipped: int = 0
    tokens: int = 0
    min_tokens: int | None = None
    max_tokens: int = 0
    reasons: Counter = field(default_factory=Counter)
    ranked: bool = False  # an rm-mode block: prompts with ranked replies
    replies: int = 0
    min_replies: int | None = None
    max_replies: int = 0

    def add_replies(self, counts: np.ndarray) -> None:
        """Record the reply counts of accepted rm prompts (alongside :meth:`add`)."""
        if counts.size:
            self.replies += int(counts.sum())
            lo, hi = int(counts.min()), int(counts.max())
            self.min_replies = lo if self.min_replies is None else min(self.min_replies, lo)
            self.max_replies = max(self.max_replies, hi)

    def add(self, lengths: np.ndarray, reasons: Mapping[str, int]) -> None:
        """Record accepted sample lengths and skips by reason."""
        self.accepted += int(lengths.size)
        self.tokens += int(lengths.sum())
        if lengths.size:
            lo, hi = int(lengths.min()), int(lengths.max())
            self.min_tokens = lo if self.min_tokens is None else min(self.min_tokens, lo)
            self.max_tokens = max(self.max_tokens, hi)
        for reason, count in reasons.items():
            if count:
                self.reasons[reason] += int(count)
                self.skipped += int(count)

    def format(self, upstream: bool = False) -> str:
        """The card's block (titled as upstream's file when ``upstream``); 0 accepted
        prints 0 for min/max/avg instead of crashing."""
        processed = self.accepted + self.skipped
        name = (self.title or self.name) if upstream else self.name
        return "\n".join(
            [
                f"## Stats for '{name}' ({self.total} samples ({self.fraction:.1%}))",
                RULE,
                f"  Accepted: {self.accepted}/{processed} ({_ratio(self.accepted, processed):.1%})",
                f"  Accepted tokens: {self.tokens}",
                f"  Skipped: {self.skipped} ({_ratio(self.skipped, processed):.1%})",
                f"  Min tokens per sample: {self.min_tokens or 0}",
                f"  Max tokens per sample: {self.max_tokens}",
                f"  Avg tokens per sample: {_ratio(self.tokens, self.accepted)}",
                *self._replies_line(),
                RULE,
                "",
            ]
        )

    def _replies_line(self) -> list[str]:
        if not self.ranked:
            return []
        avg = _ratio(self.replies, self.accepted)
        return [
            f"  Replies per prompt: {avg} (min {self.min_replies or 0}, max {self.max_replies})"
        ]


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def total_stats(blocks: Sequence[Stats]) -> Stats:
    """The ``total`` block of a split."""
    total = Stats("total", sum(b.total for b in blocks), ranked=any(b.ranked for b in blocks))
    for b in blocks:
        total.replies += b.replies
        total.max_replies = max(total.max_replies, b.max_replies)
        if b.min_replies is not None:
            total.min_replies = min(b.min_replies, total.min_replies or b.min_replies)
        total.accepted += b.accepted
        total.skipped += b.skipped
        total.tokens += b.tokens
        total.max_tokens = max(total.max_tokens, b.max_tokens)
        if b.min_tokens is not None:
            lows = [b.min_tokens] + ([total.min_tokens] if total.min_tokens is not None else [])
            total.min_tokens = min(lows)
        total.reasons.update(b.reasons)
    return total


def dataset_title(result: LoadResult, split: str, *, val_split: float, subsampled: bool) -> str:
    """How upstream's stats name a dataset's part of ``split``: the part's torch repr.

    ``train_val_dataset`` parts are ``Subset``s of the dataset class; a ``random_split``
    part (oasst) is a ``ListDataset``, a ``Subset`` of it once ``fraction`` (train) or
    ``max_val_set`` (val) has drawn from it (``subsampled``)."""
    if result.upstream_split == "random_split":
        base, wrapped = "ListDataset", subsampled
    else:
        base, wrapped = result.name, subsampled or val_split > 0
    return f"Subset of {base}" if wrapped else base


def format_upstream(full_prefix: str, blocks: Sequence[Stats]) -> str:
    """``{prefix}-{split}_stats.txt`` byte for byte as upstream writes it (module doc)."""
    parts = [f"\n# Stats for {full_prefix}*\n\n"]
    parts.extend(b.format(upstream=True) + "\n" for b in (*blocks, total_stats(blocks)))
    return "".join(parts)


def format_report(
    output_dir: str, prefix: str, stats: Mapping[str, Sequence[Stats]], load_skips: Mapping
) -> str:
    """``stats.md``: the card's report for each split, then skip counts by reason."""
    parts = []
    for split, blocks in stats.items():
        parts.append(f"# Stats for {output_dir}/{prefix}-{split}\n")
        parts.extend(b.format() for b in (*blocks, total_stats(blocks)))
    parts.append("# Skipped records by reason\n")
    for name, reasons in load_skips.items():
        parts.append(f"- {name} (load): {reasons_text(reasons)}")
    for split, blocks in stats.items():
        parts.extend(f"- {b.key} ({split}): {reasons_text(b.reasons)}" for b in blocks if b.skipped)
    return "\n".join(parts) + "\n"


def reasons_text(reasons: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()) if v) or "none"
