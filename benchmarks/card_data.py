"""Synthetic stand-ins for the card's stage-1 datasets, at their real sizes and layouts.

    .venv/bin/python benchmarks/card_data.py OUT_DIR [--scale 1.0] [--seed 0]

Writes under ``OUT_DIR`` what the hub holds, in the same formats and file names (the
pretokenizer reads them through ``path`` exactly as it reads the hub's files):

- ``megacode2/DeDuped_LosslessMegaCodeTrainingV2_942k_Evol_Uncensored.json``: one JSON array
  of 942k ``{"USER", "ASSISTANT"}`` rows, 1.75 GB, raw UTF-8 (some rows hold Latin-1, CJK
  and astral characters, as the real file does);
- ``orca-chat/orca-chat-gpt4.json``: a JSON array of ~329k ``{"instruction",
  "conversation": [{"input", "output"}, ...]}`` rows, ~0.74 GB;
- ``dolly15k/data/{en,de,es,fr}-00000-of-00001.parquet``: 15015 rows each (``instruction``,
  ``context``, ``response``, ``category``);
- ``oa_leet10k/data/oa_leet10k.parquet`` and ``oa_leet10k_contests_merged.parquet``:
  23406 rows together (``INSTRUCTION``, ``RESPONSE``, ``SOURCE``).

Row counts and text lengths follow the card's statistics (accepted samples x average
tokens, ~4.5 bytes a Llama-2 token on this text of common English words and code);
``--scale`` multiplies the row counts.  About 1 % of the
instruction rows carry a refusal phrase and a few are empty, so the filters have work.
Deterministic for a seed.  Writes ~2.6 GB at scale 1 in about a minute.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MEGACODE_FILE = "DeDuped_LosslessMegaCodeTrainingV2_942k_Evol_Uncensored.json"
ORCA_FILE = "orca-chat-gpt4.json"
LEET_FILES = ("oa_leet10k.parquet", "oa_leet10k_contests_merged.parquet")
# (rows, average characters per row) at scale 1
MEGACODE = (942_000, 1_840)
ORCA = (328_906, 2_230)
DOLLY_ROWS, DOLLY_CHARS = 15_015, 1_150
LEET = (23_406, 2_800)
NON_ASCII = ("é", "ü", "→", "中文", "日本語", "🙂", "∑", "ß")
REFUSAL = "As an AI language model, I cannot do that."
# Common English words: Llama-2's tokenizer gives ~0.22 tokens a byte on text made of them,
# so a row of the card's average size has about the card's average token count.
WORDS = """the of and to in is that for it as was with be by on not he this are or his from at
which but have an they you were her she there been one all we their has would when if so no
what up out can more about who will some other into them these its than then only could two
may like time new any my now over such our also first most after made did many well because
way even back where just through much before good years down should each very those see how
work know people year being great life while between state own both under last never same
world another used since however public without make long little list value string number
function return error file data code table query index server client request response user
model input output test case type class method object array field record system memory cache
thread process value loop condition result sort search tree graph node edge path weight cost
simple example explain write create update delete check find print read open close start stop
"""


class Text:
    """Random text of a given length from a fixed pool of sentences (prose and code)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        words = np.array(WORDS.split())
        pool = []
        for i, n in enumerate(self._ints(4, 24, 30_000)):
            sentence = " ".join(self.rng.choice(words, n)).capitalize() + "."
            if i % 300 == 0:  # ~0.3 % of sentences: a character beyond ASCII
                sentence = sentence.replace(" ", f" {NON_ASCII[i // 300 % len(NON_ASCII)]} ", 1)
            pool.append(sentence)
        pool += [f'def f{i}(x):\n    return x * {i} + {{\'k\': "v"}}["k"]\n' for i in range(2000)]
        self.pool = pool
        # the same sentences as JSON string bodies: rows are written without json.dumps
        self.escaped = [json.dumps(s, ensure_ascii=False)[1:-1] for s in pool]
        self.mean = float(np.mean([len(s) + 1 for s in pool]))

    def _ints(self, low: int, high: int, count: int) -> list[int]:
        return self.rng.integers(low, high, count).tolist()

    def texts(self, count: int, chars: int, *, escaped: bool = False) -> Iterator[str]:
        """``count`` texts of ~``chars`` characters on average (uniform 0.2x-1.8x); with
        ``escaped``, as JSON string bodies."""
        pool = self.escaped if escaped else self.pool
        for block in range(0, count, 10_000):  # random numbers drawn a block at a time
            size = min(10_000, count - block)
            lengths = (self.rng.uniform(0.2, 1.8, size) * chars / self.mean).astype(int) + 1
            picks = self.rng.integers(0, len(pool), int(lengths.sum())).tolist()
            start = 0
            for n in lengths.tolist():
                yield " ".join([pool[i] for i in picks[start : start + n]])
                start += n


def _write_array(path: Path, rows: Iterator[str]) -> int:
    """A JSON array of the JSON ``rows``, one element per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i, row in enumerate(rows):
            f.write((",\n" if i else "") + row)
        f.write("\n]\n")
    return path.stat().st_size


def _instruction_rows(
    text: Text, rows: int, chars: int, user: str, answer: str, *, escaped: bool = False
) -> Iterator[tuple[str, str]]:
    """``(question, answer)`` pairs: every 97th answer opens with a refusal phrase, every
    5003rd question is empty."""
    questions = text.texts(rows, chars // 4, escaped=escaped)
    answers = text.texts(rows, chars - chars // 4, escaped=escaped)
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        if i % 97 == 5:
            a = f"{REFUSAL} {a}"
        elif i % 5003 == 7:
            q = ""
        yield q, a


def megacode2(root: Path, text: Text, scale: float) -> int:
    rows = int(MEGACODE[0] * scale)
    pairs = _instruction_rows(text, rows, MEGACODE[1], "USER", "ASSISTANT", escaped=True)
    data = (f'{{"USER": "{q}", "ASSISTANT": "{a}"}}' for q, a in pairs)
    return _write_array(root / "megacode2" / MEGACODE_FILE, data)


def orca_chat(root: Path, text: Text, scale: float) -> int:
    """Rows of 1-3 exchanges; every 4th has an empty instruction (no system turn)."""
    rows, chars = int(ORCA[0] * scale), ORCA[1]
    turns = text.rng.integers(1, 4, rows).tolist()
    pieces = text.texts(rows * 7, chars // 5, escaped=True)

    def records() -> Iterator[str]:
        for i, n in enumerate(turns):
            system, *parts = (next(pieces) for _ in range(1 + 2 * n))
            exchanges = ", ".join(
                f'{{"input": "{parts[2 * k]}", "output": "{parts[2 * k + 1]}"}}' for k in range(n)
            )
            yield f'{{"instruction": "{system if i % 4 else ""}", "conversation": [{exchanges}]}}'

    return _write_array(root / "orca-chat" / ORCA_FILE, records())


def _parquet(path: Path, columns: dict[str, list[str]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path.stat().st_size


def dolly15k(root: Path, text: Text, scale: float) -> int:
    rows, size = int(DOLLY_ROWS * scale), 0
    for split in ("en", "de", "es", "fr"):
        third = DOLLY_CHARS // 3
        columns = {
            "instruction": list(text.texts(rows, third)),
            "context": [c if i % 2 else "" for i, c in enumerate(text.texts(rows, third))],
            "response": list(text.texts(rows, third)),
            "category": ["open_qa"] * rows,
        }
        columns["context"][3] = "See [1], [2, 3] and [citation needed] [a]."
        size += _parquet(root / "dolly15k" / "data" / f"{split}-00000-of-00001.parquet", columns)
    return size


def oa_leet10k(root: Path, text: Text, scale: float) -> int:
    rows = int(LEET[0] * scale)
    data = list(_instruction_rows(text, rows, LEET[1], "INSTRUCTION", "RESPONSE"))
    size, half = 0, rows * 2 // 5
    for name, part in zip(LEET_FILES, (data[:half], data[half:]), strict=True):
        columns = {
            "INSTRUCTION": [q for q, _ in part],
            "RESPONSE": [a for _, a in part],
            "SOURCE": ["leetcode"] * len(part),
        }
        size += _parquet(root / "oa_leet10k" / "data" / name, columns)
    return size


def write_card_data(root: str | Path, scale: float = 1.0, seed: int = 0) -> dict[str, str]:
    """Write the four datasets under ``root``; returns each one's ``path`` setting (a file,
    or a directory whose ``data_files`` the card config names)."""
    root = Path(root)
    text = Text(seed)
    megacode2(root, text, scale)
    orca_chat(root, text, scale)
    dolly15k(root, text, scale)
    oa_leet10k(root, text, scale)
    return dataset_paths(root)


def dataset_paths(root: str | Path) -> dict[str, str]:
    """Each dataset's ``path`` setting for the files :func:`write_card_data` wrote."""
    root = Path(root)
    return {
        "megacode2": str(root / "megacode2" / MEGACODE_FILE),
        "orca-chat": str(root / "orca-chat" / ORCA_FILE),
        "dolly15k_multilingual": str(root / "dolly15k"),
        "oa_leet10k": str(root / "oa_leet10k"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="directory to write the datasets into")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every row count")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    paths = write_card_data(args.out, args.scale, args.seed)
    total = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    seconds = round(time.perf_counter() - start, 1)
    print(json.dumps({"paths": paths, "bytes": total, "seconds": seconds}))


if __name__ == "__main__":
    main()
