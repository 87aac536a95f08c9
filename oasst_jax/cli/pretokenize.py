"""Pretokenizer: the card's data mixes -> chatml token + role shards, splits, stats report.

``python -m oasst_jax.pretokenize --config=configs/data/oasst_pre10_min25.py
[--config.datasets.megacode2.path=...] [--config.tokenizer_path=/path/llama2/tokenizer.model]``

Per dataset, in the config's order (upstream ``custom_datasets/__init__.py``):

1. load with the dataset's loader (``sources.load_dataset``), malformed records counted;
   the next datasets load in a background thread while this one encodes (:func:`load_ahead`);
2. split: ``val_split`` (default 0.2) by group, the ``max_val_set`` cap, the train
   ``fraction``, seeded per dataset (:mod:`oasst_jax.data.splits`);
3. chatml encoding (:mod:`oasst_jax.chatml`) in a process pool
   (:mod:`oasst_jax.encode_pool`); samples whose assistant turns have fewer than
   ``min_assistant_tokens`` tokens (header, text, ``<|im_end|>``, newline) are skipped, and
   so are samples failing upstream's joined-text tokenisation check.

Samples keep their (loader) order inside a split and datasets are concatenated in config
order; the trainer's sampler shuffles (upstream permuted the file).  The output is
byte-identical for any ``num_workers``.

Outputs (:mod:`oasst_jax.data.outputs`), by ``output_format``: ``oasst_jax`` our shard
directories ``{prefix}-train``, ``{prefix}-val``; ``megatron`` upstream's files
(``{prefix}-{split}-text/-role`` ``.bin/.idx`` indexed datasets, ``special_tokens.json``,
``{prefix}-{split}_stats.txt`` byte for byte as upstream's); ``both``.  ``write_json`` adds
``{prefix}-{split}.jsonl``, ``compress`` ``{output_dir}.tar.gz``.  Always: ``stats.md`` (the
card's report per split plus skip counts by reason) and ``metadata.json``, written last: an
output directory without it is incomplete.

Better than upstream, on purpose: a sample failing the joined-text tokenisation check is
skipped and counted (``tokenization_mismatch``; upstream's assert stops the run), and a
dataset or split with 0 accepted samples reports 0 instead of dividing by zero.

``--config.datasets.oasst_export.mode=rm`` (``configs/data/oasst_rm.py``) pretokenizes the
export's ranked prefixes instead (upstream's rm mode, :mod:`oasst_jax.data.oasst_export`):
each example is its chatml prefix and two or more replies, each encoded as an assistant
turn, best first, written as a *ranked* shard split (:mod:`oasst_jax.data.shards`); the
stats blocks count prompts and add a ``Replies per prompt`` line.  Such a run holds only rm
datasets and writes only our shards (no Megatron files, no jsonl: upstream's tool has no
format for them); ``min_assistant_tokens`` does not apply.  A prompt whose prefix or a
reply fails the tokenisation check is skipped (``tokenization_mismatch``).  Prefix and
reply are encoded separately: the prefix ends with ``<|im_end|>\n`` and the reply starts
with ``<|im_start|>``, so their concatenation is the joined text's tokenisation (the
argument of :func:`oasst_jax.chatml.encode_batch`).

Nothing is replaced when the run fails: an unknown config key or dataset option, an
``output_dir`` that is a file, shards of another tokenizer already in ``output_dir``
(unless ``overwrite=True``), or a split left without a single sample (a dataset that gives
a split nothing is only a ``warning:`` line on stderr naming it).  JSON lines longer than
``max_record_bytes`` are skipped and reported as ``oversize_record``.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from oasst_jax import atomic_files, hub
from oasst_jax.cli import cli_main
from oasst_jax.data import megatron, outputs, shards
from oasst_jax.data.config import (
    DEFAULT_VAL_SPLIT,
    dataset_options,
    is_ranked,
    setting,
    validate_config,
)
from oasst_jax.data.conversation import LoadResult
from oasst_jax.data.sources import load_dataset
from oasst_jax.data.splits import dataset_rng, split_parts
from oasst_jax.data.stats import Stats, dataset_title, format_report, format_upstream
from oasst_jax.data.stats import reasons_text as _reasons
from oasst_jax.encode_pool import Encoder, write_ranked, write_samples
from oasst_jax.tokenizer import Tokenizer
from oasst_jax.turns import DataError

SPLITS = ("train", "val")


def check_output_dir(out_dir: Path, tokenizer: Tokenizer, *, overwrite: bool) -> None:
    """Refuse to write into ``out_dir`` when it holds splits of another tokenizer (our
    shards or Megatron files, or upstream's ``special_tokens.json`` of another id layout),
    unless ``overwrite``: the output directory's ``metadata.json``, ``stats.md`` and
    ``special_tokens.json`` describe the last run only, so mixing tokenizers in one
    directory invites training on the wrong one.  (The trainer checks each split's own
    metadata, so it would still refuse.)"""
    if overwrite or not out_dir.is_dir():
        return
    special = out_dir / megatron.SPECIAL_TOKENS_FILE
    try:
        made_special = json.loads(special.read_text())
    except (OSError, ValueError):
        made_special = None
    if made_special is not None and made_special != tokenizer.special_tokens():
        raise DataError(
            f"{special} names other special-token ids ({made_special}) than "
            f"{tokenizer.model_path} gives ({tokenizer.special_tokens()}); use another "
            "output_dir or set overwrite=True"
        )
    files = [out_dir / shards.METADATA_FILE]
    files += sorted(p / shards.METADATA_FILE for p in out_dir.iterdir() if p.is_dir())
    files += sorted(out_dir.glob("*-metadata.json"))  # Megatron splits' (megatron.py)
    for file in files:
        try:
            made = json.loads(file.read_text())["tokenizer"]
            sha, vocab = str(made["sha256"]), made["vocab_size"]
        except (OSError, ValueError, KeyError, TypeError):  # absent, or not our metadata
            continue
        if sha != tokenizer.sha256:
            where = file.parent if file.name == shards.METADATA_FILE else file
            raise DataError(
                f"{where} holds shards made with another tokenizer (sha256 {sha[:12]}, "
                f"vocab {vocab}) than {tokenizer.model_path} (sha256 {tokenizer.sha256[:12]}, "
                f"vocab {tokenizer.vocab_size}); use another output_dir or set overwrite=True"
            )


def _config_json(config: Any) -> dict[str, Any]:
    """The config as JSON data, in its field order (``to_dict`` would sort the datasets)."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


# ----------------------------------------------------------------------------- run


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _split_expected(split: str, opts: Mapping[str, Any]) -> bool:
    """Whether a dataset should put samples into ``split`` (val only with val_split > 0)."""
    return split == "train" or float(opts.get("val_split", DEFAULT_VAL_SPLIT)) > 0


def run(config: Any) -> dict[str, list[Stats]]:
    """Pretokenize the mix described by ``config``; returns the stats blocks per split.

    A dataset that contributes no sample to a split it should feed is a warning on
    stderr naming it; a split left with no sample at all is an error, and then nothing
    in ``output_dir`` is replaced.  A full disk (ENOSPC, EDQUOT, EROFS) is one line naming
    ``output_dir`` and what it holds; every writer's temporaries are removed first."""
    try:
        return _run(config)
    except OSError as e:
        full = atomic_files.out_of_space(e)
        if full is None or isinstance(e, atomic_files.SpaceError):  # not a full disk / said already
            raise
        out_dir = Path(config.output_dir)
        if (out_dir / shards.METADATA_FILE).is_file():
            kept = f"the previous output in {out_dir} is unchanged"
        else:
            kept = f"{out_dir} holds no finished output (no {shards.METADATA_FILE})"
        raise atomic_files.space_error(out_dir, full, f"{kept}; temporaries removed") from e


def _run(config: Any) -> dict[str, list[Stats]]:
    names = validate_config(config)
    tokenizer = Tokenizer(
        hub.local_or_hub_file(config.tokenizer_path, "tokenizer.model", what="tokenizer_path"),
        megatron_new_tokens=bool(setting(config, "megatron_new_tokens")),
    )
    out_dir, prefix = Path(config.output_dir), config.filename_prefix
    check_output_dir(out_dir, tokenizer, overwrite=bool(setting(config, "overwrite")))
    limit = {"max_record_bytes": setting(config, "max_record_bytes")}
    loaded = load_ahead(names, lambda n: load_dataset(n, {**limit, **dataset_options(config, n)}))
    output_format, write_json = setting(config, "output_format"), setting(config, "write_json")
    seed = int(setting(config, "seed"))
    min_tokens = config.get("min_assistant_tokens")
    stats: dict[str, list[Stats]] = {s: [] for s in SPLITS}
    upstream_blocks: dict[str, list[Stats]] = {s: [] for s in SPLITS}  # _stats.txt's
    expected = {s: False for s in SPLITS}
    load_skips: dict[str, Counter] = {}
    common = {"tokenizer": shards.tokenizer_identity(tokenizer), "config": _config_json(config)}
    ranked = is_ranked(config)

    def split_writer(split: str) -> Any:
        if ranked:
            path = shards.split_path(out_dir, prefix, split)
            return shards.RankedShardWriter(path, vocab_size=tokenizer.vocab_size)
        return outputs.SplitWriter(
            out_dir, prefix, split, vocab_size=tokenizer.vocab_size,
            output_format=output_format, write_json=write_json,
        )  # fmt: skip

    with contextlib.ExitStack() as stack:
        stack.enter_context(_removed_if_failed(out_dir))
        writers = {split: stack.enter_context(split_writer(split)) for split in SPLITS}
        encoder = stack.enter_context(
            Encoder(
                tokenizer,
                num_workers=int(setting(config, "num_workers")),
                check=bool(setting(config, "check_tokenization")),
            )
        )
        for name in names:
            opts = dataset_options(config, name)
            result = next(loaded)
            load_skips[name] = result.skipped
            fraction = float(opts.get("fraction", 1.0))
            val_split = float(opts.get("val_split", DEFAULT_VAL_SPLIT))
            parts = split_parts(
                result.samples,
                val_split=val_split,
                max_val_set=opts.get("max_val_set"),
                fraction=fraction,
                rng=dataset_rng(seed, name),
                groups=result.groups,
                rounding="floor" if result.upstream_split == "random_split" else "ceil",
            )
            # fraction is reported on train only: val is never subsampled by it.
            for split, samples, frac, drawn in (
                ("train", parts.train, fraction, parts.train_subsampled),
                ("val", parts.val, 1.0, parts.val_capped),
            ):
                title = dataset_title(result, split, val_split=val_split, subsampled=drawn)
                block = Stats(result.name, len(samples), frac, key=name, title=title)
                if ranked:
                    block.ranked = True
                    write_ranked(samples, encoder, writers[split], block, desc=f"{name} {split}")
                else:
                    write_samples(
                        samples, encoder, writers[split], block,
                        min_assistant_tokens=min_tokens, desc=f"{name} {split}",
                    )  # fmt: skip
                stats[split].append(block)
                if _in_upstream_split(split, val_split, result):
                    upstream_blocks[split].append(block)
                if _split_expected(split, opts):
                    expected[split] = True
                    if block.accepted == 0:
                        _warn(_empty_part(name, split, len(result.samples), block, result))
            del result, parts, samples  # the dataset's spill file goes with its samples
        for split, writer in writers.items():
            if writer.num_samples == 0 and expected[split]:
                raise DataError(
                    f"split {split!r} is empty: no dataset gave it a sample (warnings above); "
                    f"nothing in {out_dir} was replaced"
                )
        for split, w in writers.items():  # all written before the first rename
            w.prepare({"split": split, **common})
        _begin_commit(out_dir)
        metas = {split: w.commit() for split, w in writers.items()}
    outputs.remove_stale(out_dir, prefix, SPLITS, output_format, write_json)
    report = format_report(str(out_dir), prefix, stats, load_skips)
    outputs.write_text(out_dir / "stats.md", report)
    print(report)
    if "megatron" in outputs.formats(output_format):
        megatron.write_special_tokens(out_dir, tokenizer)
        for split, blocks in upstream_blocks.items():
            text = format_upstream(outputs.full_prefix(config.output_dir, prefix, split), blocks)
            outputs.write_text(outputs.stats_path(out_dir, prefix, split), text)
    meta = _output_metadata(common, metas, stats)
    atomic_files.write_json(out_dir / shards.METADATA_FILE, meta, indent=2)
    if setting(config, "compress"):
        outputs.compress(config.output_dir)
    return stats


def load_ahead(names: Sequence[str], load: Callable[[str], LoadResult]) -> Iterator[LoadResult]:
    """``load(name)`` of each name, in order, computed by a background thread that runs
    ahead of the consumer.

    Why: loading (parsing, the phrase filter, spilling) runs on one core, and encoding can
    only start on a dataset once all of it is read (its split needs every row).  Loading
    the next datasets while the encoder workers encode this one keeps both cores busy: at
    the card's size the later three datasets' ~15 s of loading no longer wait.  A load's
    error is raised here when its dataset's turn comes, so datasets before it are encoded
    into the writers' temporaries, which a failed run removes (:func:`_removed_if_failed`
    then takes an output directory this run created).  The thread is a daemon: a failed run
    does not wait for the loads still under way."""
    results: queue.Queue = queue.Queue()

    def work() -> None:
        for name in names:
            try:
                results.put((load(name), None))
            except BaseException as e:  # re-raised in the consumer, with its traceback
                results.put((None, e))
                return

    threading.Thread(target=work, name="pretokenize-load", daemon=True).start()
    for _ in names:
        result, error = results.get()
        if error is not None:
            raise error
        yield result


@contextlib.contextmanager
def _removed_if_failed(out_dir: Path) -> Iterator[None]:
    """Leave no trace of a failed run: the directories it made for ``out_dir`` go again
    when they are empty (the writers remove their temporaries first)."""
    made = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    try:
        yield
    except BaseException:
        for d in made:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _in_upstream_split(split: str, val_split: float, result: LoadResult) -> bool:
    """Whether upstream's ``split`` holds a part of this dataset: its val has none when
    ``train_val_dataset`` got ``val_split`` 0 (oasst's ``random_split`` always gives one)."""
    return split == "train" or val_split > 0 or result.upstream_split == "random_split"


def _empty_part(name: str, split: str, loaded: int, block: Stats, result: Any) -> str:
    return (
        f"dataset {name!r} contributes no {split} samples: {loaded} loaded, "
        f"{block.total} went to {split}, skipped: {_reasons(block.reasons)}; "
        f"load skips: {_reasons(result.skipped)}"
    )


def _begin_commit(out_dir: Path) -> None:
    """Remove the old completion marker first, so a crash mid-commit reads as incomplete."""
    (out_dir / shards.METADATA_FILE).unlink(missing_ok=True)


def _output_metadata(common: dict, metas: dict, stats: dict[str, list[Stats]]) -> dict[str, Any]:
    keys = ("num_samples", "num_tokens", "token_dtype", "max_token_id", "layout", "num_examples")
    splits = {split: {k: meta[k] for k in keys if k in meta} for split, meta in metas.items()}
    counts = {
        split: {b.key: {"accepted": b.accepted, "skipped": dict(b.reasons)} for b in blocks}
        for split, blocks in stats.items()
    }
    return {"format_version": shards.FORMAT_VERSION, **common, "splits": splits, "counts": counts}


# ----------------------------------------------------------------------------- CLI


def main() -> None:
    cli_main(run, "data config (configs/data/*.py)")


if __name__ == "__main__":
    main()
