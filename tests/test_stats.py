"""The pretokenizer's statistics blocks (``oasst_jax.data.stats``), as upstream prints them."""

import numpy as np

from oasst_jax.data.stats import Stats, total_stats


def test_stats_block_format():
    s = Stats("megacode2", 4, 0.5)
    s.add(np.array([30, 50, 40]), {"min_assistant_tokens": 1})
    assert s.format() == (
        "## Stats for 'megacode2' (4 samples (50.0%))\n"
        "-----------------\n"
        "  Accepted: 3/4 (75.0%)\n"
        "  Accepted tokens: 120\n"
        "  Skipped: 1 (25.0%)\n"
        "  Min tokens per sample: 30\n"
        "  Max tokens per sample: 50\n"
        "  Avg tokens per sample: 40.0\n"
        "-----------------\n"
    )


def test_stats_with_nothing_accepted_does_not_crash():
    s = Stats("empty", 2)
    s.add(np.array([], dtype=np.int64), {"min_assistant_tokens": 2})
    empty = Stats("none", 0)
    total = total_stats([s, empty])
    assert "Accepted: 0/2 (0.0%)" in total.format()
    assert "Avg tokens per sample: 0.0" in total.format()
    assert "Accepted: 0/0 (0.0%)" in empty.format()
