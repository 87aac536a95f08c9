"""Pretokenizer: fraction/val caps in a run, min_assistant_tokens, report, determinism, CLI."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import types
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import sp_corpus
from ml_collections import ConfigDict

from oasst_jax import encode_pool
from oasst_jax.chatml import assistant_token_count, encode_turns
from oasst_jax.cli import pretokenize as pt
from oasst_jax.data import config as data_config
from oasst_jax.data import megatron, shards
from oasst_jax.data.sources import load_dataset
from oasst_jax.data.splits import dataset_rng, split_dataset
from oasst_jax.encode_pool import Encoder
from oasst_jax.tokenizer import Tokenizer, train_sentencepiece
from oasst_jax.turns import DataError

SAMPLE_CONFIG = "configs/data/sample.py"


# ----------------------------------------------------------------------------- run


def _megacode_file(tmp_path, n=30):
    """Rows with answers of growing length, so min_assistant_tokens drops the short ones."""
    rows = [
        {"USER": f"question {i} about python", "ASSISTANT": " ".join(["the fox"] * (i + 1))}
        for i in range(n)
    ]
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(rows))
    return path


def _config(tmp_path, sp_model_path, **datasets):
    c = ConfigDict()
    c.output_dir = str(tmp_path / "out")
    c.filename_prefix = "p"
    c.min_assistant_tokens = 25
    c.tokenizer_path = str(sp_model_path)
    c.seed = 42
    c.num_workers = 1
    c.datasets = ConfigDict(sort_keys=False)
    for name, opts in datasets.items():
        c.datasets[name] = ConfigDict(opts)
    return c


def test_run_filters_and_reports(tmp_path, sp_model_path, capsys):
    path = _megacode_file(tmp_path)
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": str(path), "val_split": 0.1})
    stats = pt.run(cfg)
    tok = Tokenizer(sp_model_path)
    samples = load_dataset("megacode2", {"path": str(path)}).samples
    train, val = split_dataset(
        samples, val_split=0.1, max_val_set=None, fraction=1.0,
        rng=dataset_rng(42, "megacode2"),  # the rng run() uses for this dataset
    )  # fmt: skip
    for split, part in (("train", train), ("val", val)):
        encoded = [encode_turns(tok, s.turns) for s in part]
        kept = [t for t, r in encoded if assistant_token_count(r) >= 25]
        block = stats[split][0]
        assert (block.total, block.accepted) == (len(part), len(kept))
        assert block.skipped == block.reasons["min_assistant_tokens"] == len(part) - len(kept)
        assert block.tokens == sum(len(t) for t in kept)
        src = shards.ShardDataSource(tmp_path / "out" / f"p-{split}")
        assert [src[i]["tokens"].tolist() for i in range(len(src))] == [t.tolist() for t in kept]
    assert 0 < stats["train"][0].skipped < stats["train"][0].total
    report = (tmp_path / "out" / "stats.md").read_text()
    assert report in capsys.readouterr().out
    assert f"Accepted: {stats['train'][0].accepted}/{len(train)}" in report
    assert "## Stats for 'total'" in report and "min_assistant_tokens" in report
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["splits"]["train"]["num_samples"] == stats["train"][0].accepted
    assert meta["config"]["datasets"]["megacode2"]["val_split"] == 0.1
    shards.check_tokenizer(tmp_path / "out", tok)
    shards.check_tokenizer(tmp_path / "out" / "p-train", tok)


def test_default_val_split_is_point_two(tmp_path, sp_model_path):
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": str(_megacode_file(tmp_path))})
    cfg.min_assistant_tokens = None
    stats = pt.run(cfg)
    assert (stats["train"][0].total, stats["val"][0].total) == (24, 6)


def test_one_and_two_workers_give_identical_bytes(tmp_path, sp_model_path, monkeypatch):
    monkeypatch.setattr(encode_pool, "CHUNK_SIZE", 4)  # several chunks a dataset: order at risk
    outs = []
    for workers in (1, 2):
        cfg = _sample_config(tmp_path / f"w{workers}", sp_model_path)
        cfg.num_workers = workers
        pt.run(cfg)
        outs.append(tmp_path / f"w{workers}")
    for split in ("sample-train", "sample-val"):
        for name in (shards.TOKENS_FILE, shards.ROLES_FILE, shards.OFFSETS_FILE):
            a, b = (o / split / name for o in outs)
            assert a.read_bytes() == b.read_bytes(), (split, name)
    # the reports differ only in the output directory they name
    assert (outs[0] / "stats.md").read_text().replace(str(outs[0]), str(outs[1])) == (
        outs[1] / "stats.md"
    ).read_text()


def _sample_config(out_dir, sp_model_path):
    """configs/data/sample.py with its output and tokenizer redirected."""
    spec = importlib.util.spec_from_file_location("sample_cfg", SAMPLE_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.output_dir = str(out_dir)
    cfg.tokenizer_path = str(sp_model_path)
    return cfg


def _data_config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join("configs", "data", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_data_configs_build_on_the_base_config():
    """Every field has one default, in ``data_config.base_config()``; a data config sets only
    what it changes, the card's leave ``tokenizer_path`` to the command line and write the card's
    32007-token layout (``megatron_new_tokens``), the demo's the compact one."""
    base = data_config.base_config()
    assert data_config.DEFAULTS == {k: base[k] for k in base if k not in data_config.REQUIRED}
    assert set(base) == set(data_config.FIELDS)
    for name in ("sample.py", "oasst_pre10_min25.py", "oasst_top1.py"):
        cfg = _data_config(name)
        assert list(cfg) == list(base), name
        changed = {k for k in base if cfg[k] != base[k]}
        card = {"output_dir", "filename_prefix", "datasets", "num_workers", "output_format"}
        if name != "sample.py":  # the card's 32007-token layout; the demo's is compact
            card.add("megatron_new_tokens")
        assert card <= changed <= card | {"min_assistant_tokens", "tokenizer_path"}, name
        if name != "sample.py":
            with pytest.raises(DataError, match="config: 'tokenizer_path' is required"):
                data_config.validate_config(cfg)
    assert data_config.validate_config(_data_config("sample.py")) == list(
        _data_config("sample.py").datasets
    )


def test_failed_run_leaves_previous_output_intact(tmp_path, sp_model_path):
    good = _megacode_file(tmp_path)
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": str(good)})
    pt.run(cfg)
    out = tmp_path / "out"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.json"
    bad.write_text("[{not json")
    cfg = _config(
        tmp_path, sp_model_path, megacode2={"path": str(good)}, oa_leet10k={"path": str(bad)}
    )
    with pytest.raises(DataError):
        pt.run(cfg)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # no temp dirs, nothing half-replaced


def test_config_errors(tmp_path, sp_model_path):
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        pt.run(_config(tmp_path, sp_model_path, nope={"path": "x"}))
    with pytest.raises(DataError, match="input not found"):
        pt.run(_config(tmp_path, sp_model_path, megacode2={"path": str(tmp_path / "x")}))
    with pytest.raises(DataError, match="fraction"):
        pt.run(_config(tmp_path, sp_model_path, megacode2={"path": ".", "fraction": 0.0}))
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": "."})
    cfg.tokenizer_path = str(tmp_path / "missing.model")
    with pytest.raises(DataError, match="tokenizer model not found"):
        pt.run(cfg)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
    cmd = [sys.executable, "-m", "oasst_jax.pretokenize", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_end_to_end_on_sample_config(tmp_path, sp_model_path):
    out = tmp_path / "sample"
    res = _cli(f"--config={SAMPLE_CONFIG}", f"--config.output_dir={out}",
               f"--config.tokenizer_path={sp_model_path}", "--config.num_workers=2",
               "--config.datasets.oasst_export.top_k=2")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = (out / "stats.md").read_text()
    for name in ("megacode2", "orca-chat", "Dolly15kMultilingual", "oa_leet10k", "oasst_export"):
        assert name in report
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["config"]["datasets"]["oasst_export"]["top_k"] == 2
    assert list(meta["config"]["datasets"]) == [
        "megacode2", "orca-chat", "dolly15k_multilingual", "oa_leet10k", "oasst_export",
    ]  # fmt: skip
    src = shards.ShardDataSource(out / "sample-train")
    assert len(src) == meta["splits"]["train"]["num_samples"] > 0
    item = src[0]
    assert item["tokens"][0] == Tokenizer(sp_model_path).im_start_id
    assert set(np.unique(item["roles"])) <= {0, 1, 2, 3}


def test_cli_errors_are_one_line(tmp_path, sp_model_path):
    missing = _cli(f"--config={SAMPLE_CONFIG}", f"--config.output_dir={tmp_path / 'o'}",
                   f"--config.tokenizer_path={sp_model_path}",
                   f"--config.datasets.oa_leet10k.path={tmp_path / 'nope.parquet'}")  # fmt: skip
    assert missing.returncode != 0
    assert "Traceback" not in missing.stderr
    err = [ln for ln in missing.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "oa_leet10k.path" in err[0] and "nope.parquet" in err[0]

    cfg_file = tmp_path / "bad_cfg.py"
    cfg_file.write_text(
        "from ml_collections import ConfigDict\n"
        "def get_config():\n"
        "    c = ConfigDict(dict(output_dir='o', filename_prefix='p', tokenizer_path='t'))\n"
        "    c.datasets = ConfigDict({'no_such_set': {'path': 'x'}})\n"
        "    return c\n"
    )
    unknown = _cli(f"--config={cfg_file}")
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert "error: unknown dataset 'no_such_set'" in unknown.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- no silent faults


@pytest.fixture(scope="module")
def other_sp_model_path(tmp_path_factory):
    """Another tokenizer with the same vocabulary size (302) as ``sp_model_path``."""
    corpus = [line.upper() for line in sp_corpus()]
    return train_sentencepiece(iter(corpus), tmp_path_factory.mktemp("sp2") / "other", 300)


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _train_cfg(tmp_path, prefix, tokenizer_path="", evaluate=True, loss_on="assistant_turn"):
    return ConfigDict(
        dict(tokenizer_path=str(tokenizer_path), megatron_new_tokens=False,
             data_path=str(tmp_path / "out"), data_prefix=prefix,
             eval_iters=2 if evaluate else 0, eval_interval=10, loss_on=loss_on)
    )  # fmt: skip


def test_trainer_checks_the_tokenizer_of_the_splits_it_reads(
    tmp_path, sp_model_path, other_sp_model_path
):
    """Two runs with different tokenizers into one directory: the output directory's
    metadata.json is the last run's, so the trainer must check each split's own."""
    from oasst_jax.cli.train import load_tokenizer

    path = _megacode_file(tmp_path)
    right, wrong = Tokenizer(sp_model_path), Tokenizer(other_sp_model_path)
    assert right.vocab_size == wrong.vocab_size and right.sha256 != wrong.sha256
    model = types.SimpleNamespace(vocab_size=right.vocab_size)
    pt.run(_config(tmp_path, sp_model_path, megacode2={"path": str(path)}))
    cfg = _config(tmp_path, other_sp_model_path, megacode2={"path": str(path)})
    cfg.filename_prefix = "q"
    before = _snapshot(tmp_path / "out")
    with pytest.raises(DataError, match="another tokenizer.*overwrite=True"):
        pt.run(cfg)  # refused: the directory holds shards of another tokenizer
    assert _snapshot(tmp_path / "out") == before
    cfg.overwrite = True
    pt.run(cfg)
    assert (
        json.loads((tmp_path / "out" / "metadata.json").read_text())["tokenizer"]["sha256"]
        == wrong.sha256
    )  # the directory's metadata now names the other tokenizer
    assert load_tokenizer(_train_cfg(tmp_path, "p", sp_model_path), model).sha256 == right.sha256
    with pytest.raises(DataError, match="p-train was pretokenized with another tokenizer"):
        load_tokenizer(_train_cfg(tmp_path, "p", other_sp_model_path), model)
    with pytest.raises(DataError, match="q-train was pretokenized with another tokenizer"):
        load_tokenizer(_train_cfg(tmp_path, "q", sp_model_path), model)


def test_trainer_checks_token_ids_against_the_model_without_a_tokenizer(
    tmp_path, sp_model_path, capsys
):
    """The tokenizer the split records is gone: the run goes on without one (a warning)."""
    from oasst_jax.cli.train import load_tokenizer
    from oasst_jax.sft_feed import open_split

    gone = tmp_path / "gone.model"
    shutil.copy(sp_model_path, gone)
    cfg = _config(tmp_path, gone, megacode2={"path": str(_megacode_file(tmp_path)),
                                               "val_split": 0.0})  # fmt: skip
    pt.run(cfg)
    gone.unlink()
    capsys.readouterr()
    top = json.loads((tmp_path / "out" / "p-train" / "metadata.json").read_text())["max_token_id"]
    assert top == Tokenizer(sp_model_path).im_end_id  # the tokenizer's largest id
    train_only = _train_cfg(tmp_path, "p", evaluate=False)
    assert load_tokenizer(train_only, types.SimpleNamespace(vocab_size=top + 1)) is None
    assert f"warning: the tokenizer the train split records, {gone}, is not there" in (
        capsys.readouterr().out
    )
    with pytest.raises(DataError, match=f"token id {top} but the model has only {top} ids"):
        load_tokenizer(train_only, types.SimpleNamespace(vocab_size=top))
    # val_split=0: the val split is empty, fine until the run evaluates on it
    with pytest.raises(DataError, match="p-val is an empty split") as err:
        load_tokenizer(_train_cfg(tmp_path, "p"), types.SimpleNamespace(vocab_size=top + 1))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="p-val is an empty split"):
        open_split(_train_cfg(tmp_path, "p"), "val")


@pytest.mark.parametrize("output_format", ["oasst_jax", "megatron"])
def test_trainer_takes_the_tokenizer_the_train_split_records(
    tmp_path, sp_model_path, other_sp_model_path, output_format
):
    """``tokenizer_path`` empty: the train split's metadata names the tokenizer (path and id
    layout, in either output format), used while that file has the recorded sha256; set:
    an override, checked against the split.  No usable tokenizer fails ``assistant_answer``
    only."""
    from oasst_jax.cli.train import load_tokenizer

    model_file = tmp_path / "tok.model"
    shutil.copy(sp_model_path, model_file)
    cfg = _config(tmp_path, model_file, megacode2={"path": str(_megacode_file(tmp_path)),
                                                     "val_split": 0.2})  # fmt: skip
    cfg.megatron_new_tokens, cfg.output_format = True, output_format
    pt.run(cfg)
    made = Tokenizer(model_file, megatron_new_tokens=True)
    model = types.SimpleNamespace(vocab_size=made.vocab_size)
    for loss_on in ("assistant_turn", "assistant_answer"):
        tok = load_tokenizer(_train_cfg(tmp_path, "p", loss_on=loss_on), model)
        assert (tok.model_path, tok.sha256) == (str(model_file), made.sha256)
        assert tok.megatron_new_tokens  # the recorded layout; the train config's is unset
    override = _train_cfg(tmp_path, "p", model_file)
    override.megatron_new_tokens = True
    assert load_tokenizer(override, model).sha256 == made.sha256
    override.tokenizer_path = str(other_sp_model_path)  # same vocabulary size
    with pytest.raises(DataError, match="p-train was pretokenized with another tokenizer"):
        load_tokenizer(override, model)
    shutil.copy(other_sp_model_path, model_file)  # the recorded file, now another model
    assert load_tokenizer(_train_cfg(tmp_path, "p"), model) is None
    with pytest.raises(ValueError, match="needs the tokenizer .* has changed since") as err:
        load_tokenizer(_train_cfg(tmp_path, "p", loss_on="assistant_answer"), model)
    assert "set tokenizer_path" in str(err.value) and "\n" not in str(err.value)


def _bad_rows_file(tmp_path):
    path = tmp_path / "leet.jsonl"
    path.write_text('{"INSTRUCTION": "q"}\n{"RESPONSE": "a"}\nnot json\n')
    return path


def test_dataset_with_no_samples_warns_and_empty_split_fails(tmp_path, sp_model_path, capsys):
    good, bad = _megacode_file(tmp_path), _bad_rows_file(tmp_path)
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": str(good)},
                  oa_leet10k={"path": str(bad)})  # fmt: skip
    pt.run(cfg)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("dataset 'oa_leet10k'" in w for w in warnings)
    assert "no train samples: 0 loaded" in warnings[0] and "bad_json 1" in warnings[0]
    before = _snapshot(tmp_path / "out")
    only_bad = _config(tmp_path, sp_model_path, oa_leet10k={"path": str(bad)})
    with pytest.raises(DataError, match="split 'train' is empty") as exc:
        pt.run(only_bad)
    assert "\n" not in str(exc.value)
    assert _snapshot(tmp_path / "out") == before  # nothing replaced


def test_a_later_dataset_failing_leaves_no_trace(tmp_path, sp_model_path):
    """Datasets are loaded ahead in a thread while earlier ones encode (``load_ahead``):
    a truncated file in the second dataset fails the run with its one-line error after the
    first was encoded, and leaves neither the output directory this run made, nor its
    parents, nor a temporary; an existing output directory keeps its files."""
    broken = tmp_path / "orca.json"
    broken.write_text('[{"instruction": "", "conversation": [{"input": "a", "output": "b"}]}, {"in')
    datasets = {
        "megacode2": {"path": str(_megacode_file(tmp_path))},
        "orca-chat": {"path": str(broken)},
    }
    cfg = _config(tmp_path, sp_model_path, **datasets)
    cfg.output_dir = str(tmp_path / "new" / "out")
    cfg.num_workers = 2
    with pytest.raises(DataError, match="orca.json: invalid or truncated JSON in array element 1"):
        pt.run(cfg)
    assert not (tmp_path / "new").exists()
    cfg.output_dir = str(tmp_path / "old")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="truncated"):
        pt.run(cfg)
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]


def test_load_ahead_yields_in_order_and_raises_at_the_failing_turn():
    calls = []

    def load(name):
        calls.append(name)
        if name == "c":
            raise DataError("c is broken")
        return name.upper()

    loaded = pt.load_ahead(["a", "b", "c", "d"], load)
    assert [next(loaded), next(loaded)] == ["A", "B"]
    with pytest.raises(DataError, match="c is broken"):
        next(loaded)
    assert calls == ["a", "b", "c"]  # nothing loaded past the failure


def test_unknown_config_keys_are_refused(tmp_path, sp_model_path):
    path = str(_megacode_file(tmp_path))
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": path, "valsplit": 0.5})
    with pytest.raises(DataError, match="datasets.megacode2: unknown option 'valsplit'"):
        pt.run(cfg)
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": path})
    cfg.min_assistant_token = 5
    with pytest.raises(DataError, match="unknown field 'min_assistant_token'"):
        pt.run(cfg)
    assert not (tmp_path / "out").exists()


def test_oversize_records_are_counted_in_the_report(tmp_path, sp_model_path):
    rows = [{"USER": f"question {i}", "ASSISTANT": "the fox " * (10 + 300 * (i == 3))}
            for i in range(10)]  # fmt: skip
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": str(path)})
    cfg.min_assistant_tokens = None
    cfg.max_record_bytes = 1000
    stats = pt.run(cfg)
    assert sum(b.total for blocks in stats.values() for b in blocks) == 9
    assert "- megacode2 (load): oversize_record 1" in (tmp_path / "out" / "stats.md").read_text()


def test_cli_config_faults_are_one_line(tmp_path, sp_model_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    common = (f"--config={SAMPLE_CONFIG}", f"--config.tokenizer_path={sp_model_path}")
    cases = {
        "is not a directory": _cli(*common, f"--config.output_dir={a_file}"),
        "config file not found": _cli(f"--config={tmp_path / 'nope.py'}"),
        "unknown field 'nope'": _cli(*common, "--config.nope=1"),
    }
    cfg_file = tmp_path / "typo_cfg.py"
    cfg_file.write_text(
        "from ml_collections import ConfigDict\n"
        "def get_config():\n"
        f"    c = ConfigDict(dict(output_dir={str(tmp_path / 'o')!r}, filename_prefix='p',\n"
        f"                        tokenizer_path={str(sp_model_path)!r}))\n"
        "    c.datasets = ConfigDict({'megacode2': {'path': 'tests/data/megacode2.json',\n"
        "                                           'valsplit': 0.5}})\n"
        "    return c\n"
    )
    cases["unknown option 'valsplit'"] = _cli(f"--config={cfg_file}")
    for expected, res in cases.items():
        assert res.returncode == 1, (expected, res.stderr)
        assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
        assert res.stderr.startswith("error:") and expected in res.stderr
    assert a_file.read_text() == "x" and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- card fidelity

GOLDEN = Path("tests/data/golden")


def _card_sample_config(out_dir, tokenizer_path, **overrides):
    """configs/data/sample.py with absolute inputs (the test may run in another cwd)."""
    cfg = _sample_config(out_dir, tokenizer_path)
    cfg.num_workers = 1
    for entry in cfg.datasets.values():
        for key in ("path", "input_file_path"):
            if key in entry:
                entry[key] = str(Path(entry[key]).resolve())
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_upstream_stats_files_equal_the_golden(tmp_path, monkeypatch):
    """``{prefix}-{split}_stats.txt`` of a fixture run, byte for byte: upstream's header
    (the relative output path as given), block titles (``Subset of ...``, ``ListDataset``),
    the val split's own blocks.  The fixtures hold a row for each upstream rule (refusal
    phrases in question or answer, every citation form, a whitespace context, empty turns,
    ``</s>`` in code, oasst trees without a thread).  Regenerate after a deliberate change:
    ``OASST_UPDATE_GOLDEN=1 pytest tests/test_cli_pretokenize.py -k golden``."""
    tokenizer = (GOLDEN / "tokenizer.model").resolve()
    cfg = _card_sample_config("output/sample/data", tokenizer, min_assistant_tokens=90)
    monkeypatch.chdir(tmp_path)
    pt.run(cfg)
    for split in ("train", "val"):
        got = (tmp_path / f"output/sample/data/sample-{split}_stats.txt").read_bytes()
        golden = Path(__file__).parent / "data" / "golden" / f"sample-{split}_stats.golden"
        if os.environ.get("OASST_UPDATE_GOLDEN"):
            golden.write_bytes(got)
        assert got == golden.read_bytes(), split
    text = (tmp_path / "output/sample/data/sample-train_stats.txt").read_text()
    assert text.startswith("\n# Stats for output/sample/data/sample-train*\n\n## Stats for ")
    assert "'Subset of InstructionDataset (megacode2)' (" in text and "'ListDataset' (" in text


def test_megatron_output_equals_shards_sample_by_sample(tmp_path, sp_model_path):
    """``output_format=both``: the -text/-role indexed datasets hold the shards' samples;
    megatron-core's IndexedDataset (a real reader of the format) reads the same arrays;
    the jsonl has each accepted sample's chatml text; special_tokens.json is upstream's."""
    cfg = _card_sample_config(tmp_path / "out", sp_model_path, write_json=True)
    pt.run(cfg)
    tok = Tokenizer(sp_model_path)
    out = tmp_path / "out"
    core = _megatron_core_reader()
    for split in ("train", "val"):
        ours = shards.ShardDataSource(out / f"sample-{split}")
        mega = megatron.MegatronDataSource(out / f"sample-{split}")
        lines = (out / f"sample-{split}.jsonl").read_text().splitlines()
        assert len(mega) == len(ours) == len(lines) > 0
        texts = [json.loads(line)["text"] for line in lines]
        for i in range(len(ours)):
            np.testing.assert_array_equal(mega[i]["tokens"], ours[i]["tokens"])
            np.testing.assert_array_equal(mega[i]["roles"], ours[i]["roles"])
            assert tok.encode(texts[i]) == ours[i]["tokens"].tolist()
        if core is not None:
            text, role = (core(str(out / f"sample-{split}-{f}")) for f in ("text", "role"))
            assert len(text) == len(role) == len(ours)
            assert text.index.dtype == np.uint16 and role.index.dtype == np.uint16
            for i in range(len(ours)):
                np.testing.assert_array_equal(text[i], ours[i]["tokens"])
                np.testing.assert_array_equal(role[i], ours[i]["roles"])
    assert json.loads((out / "special_tokens.json").read_text()) == {
        "<s>": 1, "</s>": 2, "<|im_start|>": tok.im_start_id, "<|im_end|>": tok.im_end_id,
    }  # fmt: skip
    assert lines[0].startswith('{"text": "<|im_start|>')  # json.dump's layout


def _megatron_core_reader():
    """megatron-core's ``IndexedDataset`` (test extra), or None where it cannot be imported;
    the format is then checked against its spec in test_shards.py only."""
    try:
        with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed"
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset
    except Exception:  # not installed, or its import fails on this platform
        return None
    return IndexedDataset


def test_megatron_only_output_trains_like_the_shards(tmp_path, sp_model_path):
    """A directory with only Megatron files (what upstream's tool writes): the trainer
    opens and checks it, the pipeline yields the batches it yields from our shards, and
    the loss of the first batch at the same initialisation is the same."""
    import functools

    import flax.linen as nn
    from conftest import tiny_llama

    from oasst_jax import chatml, sharding
    from oasst_jax.cli.train import load_tokenizer
    from oasst_jax.loss import loss_sum_and_count, token_cross_entropy
    from oasst_jax.model import Llama
    from oasst_jax.sft_feed import make_iterator, open_split

    pt.run(_card_sample_config(tmp_path / "both", sp_model_path, output_format="both"))
    pt.run(_card_sample_config(tmp_path / "mega", sp_model_path, output_format="megatron"))
    assert not (tmp_path / "mega" / "sample-train").exists()
    tok = Tokenizer(sp_model_path)
    model_cfg = tiny_llama(vocab_size=tok.vocab_size, max_position_embeddings=128)
    batches = []
    for name in ("both", "mega"):
        cfg = _train_cfg(tmp_path, "sample", sp_model_path)
        cfg.data_path = str(tmp_path / name)
        cfg.update(dict(seq_length=64, packing=True, seed=3, num_packing_bins=4, data_threads=1))
        assert load_tokenizer(cfg, model_cfg).sha256 == tok.sha256
        source = open_split(cfg, "train")
        kind = "ShardDataSource" if name == "both" else "MegatronDataSource"
        assert type(source).__name__ == kind
        mask = functools.partial(chatml.loss_mask, tokenizer=tok, mode="assistant_turn")
        it = make_iterator(cfg, source, 4, mask, train=True)
        batches.append([next(it) for _ in range(3)])
    for a, b in zip(*batches, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    model = Llama(model_cfg)

    @jax.jit
    def first_loss(params, batch):  # the train step's loss, at one fixed initialisation
        logits = model.apply(params, batch["inputs"], positions_BL=batch["positions"],
                             segment_ids_BL=batch["segment_ids"])  # fmt: skip
        nll = token_cross_entropy(logits, batch["targets"])
        num, den = loss_sum_and_count(nll, batch["weights"], normalization="global_token_mean",
                                      micro_batch_size=4)  # fmt: skip
        return num / den

    with jax.set_mesh(sharding.make_mesh({}, jax.devices()[:1])):
        shapes = nn.meta.unbox(
            jax.eval_shape(model.init, jax.random.key(0), batches[0][0]["inputs"])
        )
        rng = np.random.default_rng(0)  # (jitting model.init would compile for ~20 s)
        params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype), shapes)
        losses = [float(first_loss(params, b[0])) for b in batches]
    assert losses[0] == losses[1] and np.isfinite(losses[0])


def test_compress_and_stale_outputs(tmp_path, sp_model_path, monkeypatch):
    """``compress``: ``{output_dir}.tar.gz`` beside the directory, members named as
    ``tar -czf out.tar.gz out`` names them.  A rerun in another format removes this
    prefix's files of the format it no longer writes (and a jsonl it no longer writes)."""
    monkeypatch.chdir(tmp_path)
    path = _megacode_file(tmp_path)
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": str(path)})
    cfg.output_dir, cfg.output_format, cfg.write_json, cfg.compress = "out", "both", True, True
    pt.run(cfg)
    with tarfile.open(tmp_path / "out.tar.gz") as tar:
        names = set(tar.getnames())
    want = ("", "/p-train-text.idx", "/p-val.jsonl", "/p-train/tokens.bin", "/metadata.json",
            "/special_tokens.json", "/p-val_stats.txt")  # fmt: skip
    assert {f"out{name}" for name in want} <= names
    cfg.output_format, cfg.write_json, cfg.compress = "oasst_jax", False, False
    pt.run(cfg)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "metadata.json", "p-train", "p-val", "special_tokens.json", "stats.md",
    ]  # fmt: skip
    cfg.output_format = "megatron"
    pt.run(cfg)
    assert not (tmp_path / "out" / "p-train").exists()
    assert megatron.exists(tmp_path / "out" / "p-train")
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["splits"]["val"][
        "num_samples"
    ]


class _MergingTokenizer(Tokenizer):
    """Tokenises joined multi-turn text differently, as a cross-boundary merge would."""

    def encode(self, text):
        ids = super().encode(text)
        return ids[:-1] if text.count("<|im_start|>") > 1 else ids


def test_zero_accepted_and_mismatch_are_reported_not_fatal(tmp_path, sp_model_path, monkeypatch):
    """Better than upstream: a dataset with no accepted sample prints 0s (upstream divides
    by zero), a sample failing the joined-text check is skipped and counted (upstream's
    assert stops the run)."""
    long_rows = _megacode_file(tmp_path)  # answers of 1..30 "the fox"
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"INSTRUCTION": f"q{i}", "RESPONSE": "a"}) + "\n"
                             for i in range(10)))  # fmt: skip
    quoting = tmp_path / "quoting.jsonl"  # "</s>" sends these through the checked path
    quoting.write_text("".join(json.dumps({"USER": "q", "ASSISTANT": "the fox </s> " * 30}) + "\n"
                               for _ in range(5)))  # fmt: skip
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": str(long_rows), "val_split": 0.2},
                  oa_leet10k={"path": str(short), "val_split": 0.0})  # fmt: skip
    cfg.output_format = "megatron"
    stats = pt.run(cfg)  # warns: oa_leet10k gives train nothing
    assert stats["train"][1].accepted == 0 and stats["train"][1].skipped == 10
    text = (tmp_path / "out" / "p-train_stats.txt").read_text()
    block = text.split("## Stats for 'InstructionDataset (oa_leet10k)' (10 samples")[1]
    assert block.split("-----------------\n\n")[0].endswith(
        "  Accepted: 0/10 (0.0%)\n  Accepted tokens: 0\n  Skipped: 10 (100.0%)\n"
        "  Min tokens per sample: 0\n  Max tokens per sample: 0\n  Avg tokens per sample: 0.0\n"
    )  # val_split 0: upstream's train part is the dataset itself, not a Subset
    val = (tmp_path / "out" / "p-val_stats.txt").read_text()
    assert "oa_leet10k" not in val  # ... and its val has no part of it
    assert "'Subset of InstructionDataset (megacode2)' (6 samples" in val

    monkeypatch.setattr(pt, "Tokenizer", _MergingTokenizer)
    columns = {"user": "USER", "assistant": "ASSISTANT"}
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": str(quoting), "val_split": 0.0},
                  oa_leet10k={"path": str(long_rows), "columns": columns})  # fmt: skip
    cfg.overwrite = True
    stats = pt.run(cfg)
    assert dict(stats["train"][0].reasons) == {"tokenization_mismatch": 5}
    assert (
        "- megacode2 (train): tokenization_mismatch 5"
        in (tmp_path / "out" / "stats.md").read_text()
    )


def test_megatron_layout_output_and_config_checks(tmp_path, sp_models):
    """Upstream's own layout (``megatron_new_tokens``): special_tokens.json lists the five
    new tokens, bos/eos and the markers, in upstream's order; literal ``</s>`` and
    ``<EOD>`` in a sample are single ids (tiny tokenizer and Meta's).  A bad output_format
    is one line."""
    sp_model_path = sp_models
    rows = [{"USER": f"q{i}", "ASSISTANT": "end with </s> or <EOD> " + "the fox " * 20}
            for i in range(6)]  # fmt: skip
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": str(path), "val_split": 0.0})
    cfg.megatron_new_tokens, cfg.output_format = True, "megatron"
    pt.run(cfg)
    tok = Tokenizer(sp_model_path, megatron_new_tokens=True)
    base = tok.base_vocab_size
    special = json.loads((tmp_path / "out" / "special_tokens.json").read_text())
    assert list(special.items()) == [
        ("<CLS>", base), ("<SEP>", base + 1), ("<EOD>", base + 2), ("<MASK>", base + 3),
        ("<PAD>", base + 4), ("<s>", 1), ("</s>", 2), ("<|im_start|>", base + 5),
        ("<|im_end|>", base + 6),
    ]  # fmt: skip
    tokens = megatron.MegatronDataSource(tmp_path / "out" / "p-train")[0]["tokens"]
    assert (tokens == 2).sum() == 1 and (tokens == base + 2).sum() == 1
    assert not (tmp_path / "out" / "p-train").exists()  # megatron only
    cfg.megatron_new_tokens = False  # the compact layout into a directory of the other one
    with pytest.raises(DataError, match="special_tokens.json names other special-token ids"):
        pt.run(cfg)
    cfg.megatron_new_tokens = True
    cfg.output_format = "parquet"
    with pytest.raises(DataError, match="output_format must be one of oasst_jax, megatron, both"):
        pt.run(cfg)
    cfg.output_format, cfg.write_json = "both", "yes"
    with pytest.raises(DataError, match="write_json must be true or false"):
        pt.run(cfg)


# ----------------------------------------------------------------------------- upstream's ids


@pytest.mark.parametrize("megatron", [False, True], ids=["compact", "megatron"])
def test_encoded_ids_and_roles_follow_upstreams_rule(sp_models, megatron):
    """What the pretokenizer writes for the card's five datasets (the fixtures: code quoting
    ``</s>``, indented code, whitespace contexts, empty turns, other scripts) and for rm mode
    (each ranked reply an assistant turn of its own) is upstream's rule, with the tiny
    tokenizer and with Meta's: each turn's chatml block through Megatron's tokenizer
    (special tokens split out first, SentencePiece between them), the turn's role id on
    every token, and the joined text tokenising the same."""
    import sentencepiece as spm
    from test_tokenizer import _upstream_tokenize

    from oasst_jax.chatml import ROLE_IDS

    tok = Tokenizer(sp_models, megatron_new_tokens=megatron)
    sp = spm.SentencePieceProcessor(model_file=str(sp_models))
    special = tok.special_tokens()

    def upstream(turns):
        pieces = [_upstream_tokenize(sp, special, f"<|im_start|>{t.role}\n{t.text}<|im_end|>\n")
                  for t in turns]  # fmt: skip
        roles = [ROLE_IDS[t.role] for t, p in zip(turns, pieces, strict=True) for _ in p]
        return [i for p in pieces for i in p], roles

    convs = []
    for name, opts in _data_config("sample.py").datasets.items():
        convs += [s.turns for s in load_dataset(name, opts.to_dict()).samples]
    rm = load_dataset("oasst_export", {"input_file_path": "tests/data/oasst_rm.jsonl",
                                       "lang": "en", "mode": "rm"}).samples  # fmt: skip
    convs += [c for s in rm for c in (s.prefix, *((r,) for r in s.replies))]
    assert any("</s>" in t.text for c in convs for t in c) and len(convs) > 100
    with Encoder(tok, num_workers=1) as encoder:
        batches = list(encoder.encode_conversations(convs))
    got = [
        (b.tokens[end - n : end].tolist(), b.roles[end - n : end].tolist())
        for b in batches
        for end, n in zip(np.cumsum(b.lengths), b.lengths, strict=True)
    ]
    assert not any(b.mismatch.any() for b in batches)
    assert got == [upstream(c) for c in convs]
    joined = [_upstream_tokenize(sp, special, "".join(f"<|im_start|>{t.role}\n{t.text}<|im_end|>\n"
                                                      for t in c)) for c in convs]  # fmt: skip
    assert [ids for ids, _ in got] == joined


def test_a_full_disk_is_one_line_and_leaves_no_temporaries(tmp_path, sp_model_path):
    """Pretokenize into a tmpfs with a few KiB left (the rest taken by a filler file):
    one line naming the output directory and what it holds (the previous output,
    unchanged), no hidden temporary split or file left by any writer (shards, Megatron,
    jsonl); with the space back the same run writes its output."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        cfg = _config(disk, sp_model_path, megacode2={"path": str(_megacode_file(tmp_path))})
        cfg.output_format, cfg.write_json = "both", True
        pt.run(cfg)
        out = disk / "out"
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(disk / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, free - 8192)
        with pytest.raises(OSError) as err:
            pt.run(cfg)
        assert str(err.value).startswith(
            f"[Errno 28] No space left on device writing {out}; the previous output in {out} "
            "is unchanged; temporaries removed; free space"
        ), err.value
        assert "\n" not in str(err.value)
        assert [n for n in os.listdir(out) if n.startswith(".")] == []
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        (disk / "filler").unlink()
        pt.run(cfg)
        assert (out / shards.METADATA_FILE).is_file()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_run_in_another_layout_than_its_data_or_base_is_one_line(tmp_path, sp_model_path):
    """Data in the card's layout (``megatron_new_tokens``): a run set to the compact one is
    refused per split, and a base checkpoint imported in the compact layout (its vocabulary
    5 rows short) by the tokenizer the data records; each a one-line error."""
    from oasst_jax.cli.train import load_tokenizer

    path = _megacode_file(tmp_path)
    cfg = _config(tmp_path, sp_model_path, megacode2={"path": str(path), "val_split": 0.2})
    cfg.megatron_new_tokens = True
    pt.run(cfg)
    compact, card = Tokenizer(sp_model_path), Tokenizer(sp_model_path, megatron_new_tokens=True)
    base = types.SimpleNamespace(vocab_size=compact.vocab_size)
    errors = []
    with pytest.raises(DataError, match="p-train was pretokenized with another tokenizer") as e:
        load_tokenizer(_train_cfg(tmp_path, "p", sp_model_path), base)  # compact run
    errors.append(e)
    want = f"has {card.vocab_size} ids but model.vocab_size={compact.vocab_size}"
    with pytest.raises(ValueError, match=want) as e:
        load_tokenizer(_train_cfg(tmp_path, "p"), base)  # the data's layout, a compact base
    errors.append(e)
    assert all("\n" not in str(e.value) for e in errors)
    assert load_tokenizer(_train_cfg(tmp_path, "p"), card).sha256 == card.sha256
