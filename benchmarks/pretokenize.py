"""Pretokenizer throughput: tokens/s of encode + filter + shard write, 1 vs 2 workers.

    .venv/bin/python benchmarks/pretokenize.py [--mb 50] [--vocab-size 1000]
    .venv/bin/python benchmarks/pretokenize.py --card-scale [--scale 1.0] [--tokenizer T]

Generates a synthetic chat corpus (>= ``--mb`` MB of text, deterministic), trains a tiny
BPE model on a slice of it, then times :func:`oasst_jax.encode_pool.write_samples` (the
pool start-up included), best of ``--repeats`` interleaved runs since the machine may be
shared, and prints one JSON line. Goal: >= 1M tokens/s with 2 workers.
The 1-worker run encodes in-process; the 2-worker run uses the spawn pool.

``--card-scale``: stage 1 as a user runs it.  Writes the card's four datasets at their real
sizes (``benchmarks/card_data.py``, ~2.6 GB under the system temp directory, removed after;
``--data DIR`` reuses a written set and keeps it), trains a ``--vocab-size`` tokenizer on a
slice of them unless ``--tokenizer`` names one, then runs ``python -m oasst_jax.pretokenize
--config=configs/data/oasst_pre10_min25.py`` pointed at them (``--checkout DIR``: another
checkout's package and configs; ``--override KEY=VALUE``: more ``--config.`` overrides) and
prints one JSON line: wall seconds, CPU seconds (the process and its encoder workers: the
work, whatever else loads the machine), the pretokenize process's peak RSS (``ru_maxrss``),
the peak RSS of it and its encoder workers together (sampled every 50 ms), the tokens
written, the machine's load.  Goal: peak RSS <= 2 GiB, <= 3 min on 2 cores.
``--compare-checkout DIR`` also runs another checkout's stage 1 on the same files and
tokenizer (e.g. one before streaming, ``git archive 12389fa^``; both then read oa_leet10k's
``oa_leet10k.parquet`` alone, the file that checkout reads) and lists the output files that
differ in a byte (shards, Megatron files, statistics; none: ``differing_files: []``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from oasst_jax import encode_pool
from oasst_jax.data import shards
from oasst_jax.data.conversation import Sample
from oasst_jax.data.stats import Stats
from oasst_jax.tokenizer import Tokenizer, train_sentencepiece
from oasst_jax.turns import Turn


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
    stats = Stats("bench", len(samples))
    start = time.perf_counter()
    with (
        shards.ShardWriter(out / f"w{workers}", vocab_size=tok.vocab_size) as writer,
        encode_pool.Encoder(tok, num_workers=workers) as encoder,
    ):
        encode_pool.write_samples(samples, encoder, writer, stats, min_assistant_tokens=25)
        writer.commit({})
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "tokens": stats.tokens, "tok_s": stats.tokens / seconds}


GIB = 2**30
REPO = Path(__file__).resolve().parent.parent


def _tree_rss(proc: psutil.Process) -> int:
    """RSS of ``proc`` and its descendants, in bytes (0 once it is gone)."""
    total = 0
    for p in (proc, *proc.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run_stage1(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Run the pretokenize command; wall time, its ru_maxrss and the sampled tree peak."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    proc, peak, done = psutil.Process(child.pid), [0], threading.Event()
    own = [0.0]  # the pretokenize process's own CPU seconds, without its workers

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc))
            with contextlib.suppress(psutil.Error):
                own[0] = sum(proc.cpu_times()[:2])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"pretokenize failed ({child.returncode}): {' '.join(cmd)}")
    return {
        "seconds": round(seconds, 1),
        # CPU seconds of it and its reaped encoder workers: the work, whatever the load
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "main_cpu_seconds": round(own[0], 1),  # reading, filtering, writing (the rest encodes)
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3),
        "peak_tree_rss_gib": round(peak[0] / GIB, 3),
        "stdout_tail": stdout.strip().splitlines()[-12:],
    }


def card_scale(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import card_data

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="card-scale-")))
        data = Path(args.data) if args.data else work / "data"
        start = time.perf_counter()
        scale = None  # unknown: a data set written before
        if args.data and (data / "megacode2").is_dir():
            paths = card_data.dataset_paths(data)
        else:
            paths, scale = card_data.write_card_data(data, args.scale), args.scale
        gen_seconds = round(time.perf_counter() - start, 1)
        tok = args.tokenizer
        if not tok:
            sample = card_data.Text(1).texts(4000, 2000)
            tok = str(train_sentencepiece(sample, work / "tok", args.vocab_size))
        checkout = Path(args.checkout).resolve() if args.checkout else REPO
        if args.compare_checkout:  # a checkout before hub layouts reads oa_leet10k's one file
            paths["oa_leet10k"] = str(Path(paths["oa_leet10k"]) / "data" / card_data.LEET_FILES[0])
        result = stage1(checkout, tok, paths, work / "out", args.override)
        meta = json.loads((work / "out" / shards.METADATA_FILE).read_text())
        input_bytes = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
        if args.compare_checkout:
            other = Path(args.compare_checkout).resolve()
            theirs = stage1(other, tok, paths, work / "compare", args.override)
            result["compare_checkout"] = str(other)
            result["compare_seconds"] = theirs["seconds"]
            result["compare_cpu_seconds"] = theirs["cpu_seconds"]
            result["compare_peak_rss_gib"] = theirs["peak_rss_gib"]
            result["differing_files"] = differing_files(work / "out", work / "compare")
    splits = meta["splits"]
    print(
        json.dumps(
            {
                "card_scale": scale,
                "input_gb": round(input_bytes / 1e9, 3),
                "generate_seconds": gen_seconds,
                "samples": {s: v["num_samples"] for s, v in splits.items()},
                "tokens": {s: v["num_tokens"] for s, v in splits.items()},
                **{k: v for k, v in result.items() if k != "stdout_tail"},
                "checkout": str(checkout),
                "cpu_count": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
        )
    )


def stage1(checkout: Path, tok: str, paths: dict, out: Path, override: list[str]) -> dict:
    """Stage 1 of ``checkout`` (its package and the card config) on ``paths`` into ``out``."""
    cmd = [
        sys.executable, "-m", "oasst_jax.pretokenize",
        "--config=configs/data/oasst_pre10_min25.py",
        f"--config.tokenizer_path={tok}",
        f"--config.output_dir={out}",
        *(f"--config.datasets{_key(n)}.path={p}" for n, p in paths.items()),
        *(f"--config.{o}" for o in override),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(checkout), "TQDM_DISABLE": "1"}
    return run_stage1(cmd, checkout, env)


def differing_files(a: Path, b: Path) -> list[str]:
    """The files of two output directories that are not the same bytes (or not in both);
    ``stats.md`` names its output directory, so that line is left out of its comparison."""
    names = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    names |= {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    out = []
    for name in sorted(names):
        x, y = a / name, b / name
        if not (x.is_file() and y.is_file()):
            out.append(str(name))
        elif x.read_bytes().replace(bytes(a), b"OUT") != y.read_bytes().replace(bytes(b), b"OUT"):
            out.append(str(name))
    return out


def _key(name: str) -> str:
    return f"['{name}']" if "-" in name else f".{name}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2, help="best of N, runs interleaved")
    parser.add_argument("--card-scale", action="store_true", help="stage 1 on card-size data")
    parser.add_argument("--scale", type=float, default=1.0, help="card-scale: row multiplier")
    parser.add_argument("--data", help="card-scale: the datasets' directory (kept)")
    parser.add_argument("--tokenizer", help="card-scale: a tokenizer.model (default: trained)")
    parser.add_argument("--checkout", help="card-scale: run this checkout's pretokenize")
    parser.add_argument("--override", action="append", default=[], help="card-scale: KEY=VALUE")
    parser.add_argument(
        "--compare-checkout", help="card-scale: also run this checkout; name differing outputs"
    )
    args = parser.parse_args()
    if args.card_scale:
        card_scale(args)
        return
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
