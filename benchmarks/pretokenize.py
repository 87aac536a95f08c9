"""Pretokenizer throughput: tokens/s of encode + filter + shard write, 1 vs 2 workers.

    .venv/bin/python benchmarks/pretokenize.py [--mb 50] [--vocab-size 1000]

Generates a synthetic chat corpus (>= ``--mb`` MB of text, deterministic), trains a tiny
BPE model on a slice of it, then times :func:`oasst_jax.pretokenize.write_samples` (the
pool start-up included), best of ``--repeats`` interleaved runs since the machine may be
shared, and prints one JSON line. Goal: >= 1M tokens/s with 2 workers.
The 1-worker run encodes in-process; the 2-worker run uses the spawn pool.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from oasst_jax import pretokenize as pt
from oasst_jax.data import shards
from oasst_jax.data.conversation import Sample
from oasst_jax.text import Turn
from oasst_jax.tokenizer import Tokenizer, train_sentencepiece


def synthetic_corpus(megabytes: float, seed: int = 0) -> list[Sample]:
    """Conversations of 1-3 exchanges built from random pseudo-words and some code."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    words = ["".join(rng.choice(letters, rng.integers(1, 10))) for _ in range(5000)]
    sentences = [
        " ".join(rng.choice(words, rng.integers(4, 20))).capitalize() + "." for _ in range(20000)
    ]
    sentences += [f"def f{i}(x):\n    return x * {i}\n" for i in range(200)]
    samples: list[Sample] = []
    size, target = 0, megabytes * 1e6
    while size < target:  # draw randomness in blocks: per-call numpy overhead dominates
        picks = iter(rng.integers(0, len(sentences), 4096).tolist())
        shape = iter(rng.integers(1, 12, 512).tolist())
        for _ in range(64):
            turns = []
            for _ in range(next(shape) % 3 + 1):
                for role, n in (("user", next(shape) % 3 + 1), ("assistant", next(shape) + 1)):
                    text = " ".join(sentences[next(picks)] for _ in range(n))
                    turns.append(Turn(role, text))
                    size += len(text)
            samples.append(Sample(tuple(turns), str(len(samples))))
    return samples


def measure(samples: list[Sample], tok: Tokenizer, workers: int, out: Path) -> dict:
    stats = pt.Stats("bench", len(samples))
    start = time.perf_counter()
    with (
        shards.ShardWriter(out / f"w{workers}", vocab_size=tok.vocab_size) as writer,
        pt.Encoder(tok, num_workers=workers) as encoder,
    ):
        pt.write_samples(samples, encoder, writer, stats, min_assistant_tokens=25)
        writer.commit({})
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "tokens": stats.tokens, "tok_s": stats.tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2, help="best of N, runs interleaved")
    args = parser.parse_args()
    samples = synthetic_corpus(args.mb)
    corpus_bytes = sum(len(t.text) for s in samples for t in s.turns)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_text = (t.text for s in samples[:200] for t in s.turns)
        tok = Tokenizer(train_sentencepiece(train_text, tmp / "tok", args.vocab_size))
        trials = [(w, measure(samples, tok, w, tmp)) for _ in range(args.repeats) for w in (1, 2)]
        runs = {
            w: min((r for v, r in trials if v == w), key=lambda r: r["seconds"]) for w in (1, 2)
        }
        same = all(
            (tmp / "w1" / f).read_bytes() == (tmp / "w2" / f).read_bytes()
            for f in (shards.TOKENS_FILE, shards.ROLES_FILE, shards.OFFSETS_FILE)
        )
    print(
        json.dumps(
            {
                "corpus_mb": round(corpus_bytes / 1e6, 1),
                "samples": len(samples),
                "vocab_size": tok.vocab_size,
                "tokens_written": runs[1]["tokens"],
                "tokens_per_s_1_worker": round(runs[1]["tok_s"]),
                "tokens_per_s_2_workers": round(runs[2]["tok_s"]),
                "seconds_1_worker": runs[1]["seconds"],
                "seconds_2_workers": runs[2]["seconds"],
                "speedup": round(runs[2]["tok_s"] / runs[1]["tok_s"], 2),
                "identical_output": same,
                # Scaling needs idle cores: report how busy the machine was.
                "cpu_count": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
