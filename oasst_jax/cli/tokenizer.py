"""``python -m oasst_jax.tokenizer train``: a small BPE SentencePiece model from text,
json(l)(.gz), tar.gz and parquet files (:func:`oasst_jax.tokenizer.train_sentencepiece`).

    python -m oasst_jax.tokenizer train --input tests/data --out tok.model --vocab-size 1000
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Sequence

from oasst_jax import cli
from oasst_jax.readers import MAX_RECORD_BYTES
from oasst_jax.tokenizer import Tokenizer, train_sentencepiece

_SKIP_TEXT = {
    "oversize_record": f"line(s) longer than {MAX_RECORD_BYTES} bytes",
    "parquet_without_pyarrow": "parquet file(s): pyarrow is not installed",
}


def main(argv: Sequence[str] | None = None) -> None:
    """``train``: bad input ends with one ``error:`` line (:func:`oasst_jax.cli.run_main`)."""
    parser = cli.ArgumentParser(
        prog="python -m oasst_jax.tokenizer", description="Train a small BPE SentencePiece model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a small BPE SentencePiece model")
    train.add_argument("--input", nargs="+", required=True, help="files or directories")
    train.add_argument("--out", required=True, help="output path, e.g. tokenizer.model")
    train.add_argument("--vocab-size", type=int, default=1000)
    cli.run_main(_train, parser.parse_args(argv))


def _train(args: argparse.Namespace) -> None:
    out = args.out[: -len(".model")] if args.out.endswith(".model") else args.out
    skipped: collections.Counter = collections.Counter()
    try:
        path = train_sentencepiece(list(args.input), out, args.vocab_size, skipped)
    except RuntimeError as e:  # SentencePiece refusing its input (e.g. too few pieces)
        raise ValueError(str(e)) from e
    for reason, count in sorted(skipped.items()):
        print(f"warning: skipped {count} {_SKIP_TEXT.get(reason, reason)}", file=sys.stderr)
    tok = Tokenizer(path)
    print(f"wrote {path} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]})")


if __name__ == "__main__":
    main()
