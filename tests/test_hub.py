"""oasst_jax.hub: a local path or a hub id -> local files, offline against a cache laid out
as huggingface_hub lays it out, and a localhost stand-in for the hub's errors."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import hf_cache
import pytest
from conftest import REPO
from hf_cache import cache_repo, fake_hub, use_cache

from oasst_jax import hub
from oasst_jax.cli import pretokenize
from oasst_jax.config import load_config
from oasst_jax.turns import DataError

LLAMA = "meta-llama/Llama-2-7b-hf"
CARD_CONFIG = Path(REPO) / "configs" / "data" / "oasst_pre10_min25.py"
LOCAL_FILES = {
    "megacode2": "megacode2.json",
    "orca-chat": "orca-chat-gpt4.json",
    "dolly15k_multilingual": "dolly15k",
    "oa_leet10k": "oa_leet10k.parquet",
}


@pytest.mark.parametrize(
    "value, repo",
    [
        ("meta-llama/Llama-2-7b-hf", True),
        ("ehartford/oa_leet10k", True),
        ("tokenizer.model", False),
        ("/models/llama2/tokenizer.model", False),
        ("models/llama2/tokenizer.model", False),
        ("./tok/x", False),
        ("~/tok", False),
        ("a/../b", False),
    ],
)
def test_is_repo_id(value, repo):
    assert hub.is_repo_id(value) is repo


def test_fetch_reads_the_offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    snapshot = cache_repo(
        cache,
        "org/data",
        {"data/b.parquet": b"B", "data/a.parquet": b"A", "rows.json": b"[]", "x.png": b"P"},
    )
    use_cache(monkeypatch, cache)
    root, files = hub.fetch("org/data", ["rows.json", "data/*.parquet"], what="d.repo_id")
    assert root == snapshot
    assert [f.relative_to(root).as_posix() for f in files] == [
        "rows.json",
        "data/a.parquet",
        "data/b.parquet",
    ]  # pattern order, each pattern's matches sorted
    assert [f.read_bytes() for f in files] == [b"[]", b"A", b"B"]


def test_offline_cache_lacking_the_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache_repo(cache, "org/data", {"other.json": b"[]"})
    use_cache(monkeypatch, cache)
    with pytest.raises(DataError) as e:
        hub.fetch("org/data", "rows.json", what="megacode2.repo_id")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("megacode2.repo_id: org/data: HF_HUB_OFFLINE")
    assert "rows.json" in msg and str(cache) in msg


def test_offline_cache_without_the_repository(tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(DataError, match=r"^tokenizer_path \(no such local file\): "):
        hub.local_or_hub_file(LLAMA, "tokenizer.model", what="tokenizer_path")
    with pytest.raises(DataError) as e:
        hub.fetch("org/data", "rows.json", what="orca-chat.repo_id")
    assert "HF_HUB_OFFLINE is set" in str(e.value) and "\n" not in str(e.value)


def test_nonexistent_repository(tmp_path, monkeypatch):
    with fake_hub(monkeypatch, tmp_path / "cache"):
        with pytest.raises(DataError) as e:
            hub.fetch("nobody/no-such-dataset", "rows.json", what="megacode2.repo_id")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("megacode2.repo_id: nobody/no-such-dataset: no dataset repository")


def test_gated_repository_without_a_token_names_hf_token(tmp_path, monkeypatch):
    with fake_hub(monkeypatch, tmp_path / "cache"):
        with pytest.raises(DataError) as e:
            hub.local_or_hub_file("meta-llama/gated-Llama-2-7b-hf", "tokenizer.model", what="t")
        msg = str(e.value)
        assert "\n" not in msg and "gated" in msg and "no token is set" in msg
        assert "HF_TOKEN" in msg and "https://huggingface.co/meta-llama/gated-Llama-2-7b-hf" in msg
        monkeypatch.setenv("HF_TOKEN", "hf_not_approved")
        with pytest.raises(DataError, match="the token in use .* has no access"):
            hub.local_or_hub_dir("org/gated-model", ["config.json"], what="--hf-dir")
    assert not any((tmp_path / "cache").glob("models--*/snapshots/*/*"))  # nothing cached


def test_local_path_wins_and_non_ids_pass_through(tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "empty")  # a hub lookup would fail
    local = tmp_path / "meta-llama" / "Llama-2-7b-hf"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.local_or_hub_dir(LLAMA, ["config.json"], what="--hf-dir") == LLAMA
    (local / "tokenizer.model").write_bytes(b"x")
    assert hub.local_or_hub_file(LLAMA, "tokenizer.model", what="t") == LLAMA  # a directory
    for value in ("missing.model", "/abs/missing.model", "a/b/missing.model", ""):
        assert hub.local_or_hub_file(value, "tokenizer.model", what="t") == value


def test_hub_tokenizer_and_model_directory_from_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    files = {
        "config.json": b"{}",
        "model-00001-of-00002.safetensors": b"1",
        "model-00002-of-00002.safetensors": b"2",
        "model.safetensors.index.json": b"{}",
        "tokenizer.model": b"sp",
    }
    snapshot = cache_repo(cache, LLAMA, files, repo_type="model")
    use_cache(monkeypatch, cache)
    path = hub.local_or_hub_file(LLAMA, "tokenizer.model", what="tokenizer_path")
    assert path == str(snapshot / "tokenizer.model")
    model = hub.local_or_hub_dir(
        LLAMA, ["config.json", "*.safetensors"], optional=["*.index.json"], what="--hf-dir"
    )
    assert model == str(snapshot)
    with pytest.raises(DataError, match="holds no \\*.bin of it"):
        hub.local_or_hub_dir(LLAMA, ["*.bin"], what="--hf-dir")


def test_data_files_must_be_named(tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "cache")
    for bad in ((), ("",), [None]):
        with pytest.raises(DataError, match="data_files must name files"):
            hub.fetch("org/data", bad, what="x")


# ------------------------------------------------- stage 1 by hub ids (the card config as is)


def _stage1_config(out, tokenizer_path, **paths):
    """The card's stage-1 config as a user runs it: hub ids, plus what the fixtures need."""
    cfg = load_config(str(CARD_CONFIG))
    cfg.output_dir = str(out)
    cfg.tokenizer_path = str(tokenizer_path)
    cfg.num_workers = 1
    for name, options in cfg.datasets.items():
        options.val_split = 0.2  # ~20 rows a fixture: the card's 1% would leave val empty
        if name in paths:
            options.path = str(paths[name])
    return cfg


def _outputs(out):
    """Every output file's bytes, the output directory's own path masked out (stats.md
    names it), and of the metadata files (which echo the config and the tokenizer's path,
    the only differences) their sample and token counts."""
    files = {}
    for f in sorted(out.rglob("*")):
        name = str(f.relative_to(out))
        if f.name.endswith("metadata.json"):
            meta = json.loads(f.read_text())
            files[name] = {k: meta.get(k) for k in ("num_samples", "num_tokens", "splits")}
        elif f.is_file():
            files[name] = f.read_bytes().replace(str(out).encode(), b"OUT")
    return files


def test_card_stage1_config_runs_from_the_offline_cache(tmp_path, monkeypatch, sp_model_path):
    """`pretokenize --config=configs/data/oasst_pre10_min25.py` with no path set: the four
    datasets and the tokenizer (`meta-llama/Llama-2-7b-hf`) come from the HF cache, and the
    output equals the run on the same files given by local path."""
    cache = tmp_path / "cache"
    hf_cache.card_cache(cache)
    cache_repo(cache, LLAMA, {"tokenizer.model": Path(sp_model_path)}, repo_type="model")
    use_cache(monkeypatch, cache)
    pretokenize.run(_stage1_config(tmp_path / "hub", LLAMA))
    local = {name: hf_cache.DATA / f for name, f in LOCAL_FILES.items()}
    pretokenize.run(_stage1_config(tmp_path / "local", sp_model_path, **local))
    hub_files, local_files = _outputs(tmp_path / "hub"), _outputs(tmp_path / "local")
    assert hub_files == local_files and len(hub_files) > 10
    meta = json.loads((tmp_path / "hub" / "metadata.json").read_text())
    assert meta["splits"]["train"]["num_samples"] > 50


@pytest.mark.parametrize("case", ["no_such_dataset", "gated_tokenizer", "offline_lacks", "cut"])
def test_stage1_bad_input_is_one_error_and_writes_nothing(
    case, tmp_path, monkeypatch, sp_model_path
):
    cache, out = tmp_path / "cache", tmp_path / "out"
    hf_cache.card_cache(cache, without=(hf_cache.ORCA_REPO,) if case == "offline_lacks" else ())
    cache_repo(cache, "org/tok", {"tokenizer.model": Path(sp_model_path)}, repo_type="model")
    cfg = _stage1_config(out, "org/tok")
    expected = {
        "no_such_dataset": "megacode2.repo_id: nobody/no-such-dataset: no dataset repository",
        "gated_tokenizer": "tokenizer_path (no such local file): meta-llama/gated-7b is a gated",
        "offline_lacks": f"orca-chat.repo_id: {hf_cache.ORCA_REPO}: HF_HUB_OFFLINE is set",
        "cut": f"{tmp_path / 'cut.json'}: invalid or truncated JSON in array element 2",
    }[case]
    context = contextlib.nullcontext()
    if case in ("no_such_dataset", "gated_tokenizer"):  # an online hub that refuses
        context = fake_hub(monkeypatch, tmp_path / "online-cache")
        cfg.datasets.megacode2.repo_id = "nobody/no-such-dataset"
        gated = case == "gated_tokenizer"
        cfg.tokenizer_path = "meta-llama/gated-7b" if gated else str(sp_model_path)
    else:
        use_cache(monkeypatch, cache)
    if case == "cut":  # a local megacode2 whose third element is cut short
        rows = json.loads((hf_cache.DATA / "megacode2.json").read_text())
        cut = tmp_path / "cut.json"
        cut.write_text("[" + ", ".join(map(json.dumps, rows[:2])) + ', {"USER": "cut sh')
        cfg.datasets.megacode2.path = str(cut)
    with context, pytest.raises(DataError) as e:
        pretokenize.run(cfg)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)
    assert not out.exists()


def test_stage1_cli_offline_cache_lacking_a_file(tmp_path, sp_model_path):
    """The CLI as a user meets it: one `error:` line, exit 1, no output directory."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    hf_cache.card_cache(cache, without=(hf_cache.DOLLY_REPO,))
    cmd = [
        sys.executable, "-m", "oasst_jax.pretokenize", f"--config={CARD_CONFIG}",
        f"--config.tokenizer_path={sp_model_path}", f"--config.output_dir={out}",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=hf_cache.env(cache), timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "HF_HUB_OFFLINE is set" in errors[0], res.stderr
    assert f"dolly15k_multilingual.repo_id: {hf_cache.DOLLY_REPO}" in errors[0]
    assert not out.exists()


# ------------------------------------------------- convert hf-to-orbax --hf-dir HUB_ID


def _tiny_llama_files(hidden: int = 64, inter: int = 128, layers: int = 2, vocab: int = 300):
    """A random fp32 ``LlamaForCausalLM`` as a hub repository holds it: config.json and
    model.safetensors (written with numpy: no torch needed for this)."""
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    shapes["model.norm.weight"] = (hidden,)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"}
        shapes |= {p + f"mlp.{n}_proj.weight": (inter, hidden) for n in ("gate", "up")}
        shapes |= {p + "mlp.down_proj.weight": (hidden, inter)}
        shapes |= {
            p + f"{n}.weight": (hidden,) for n in ("input_layernorm", "post_attention_layernorm")
        }
    tensors = {k: rng.standard_normal(v, dtype=np.float32) for k, v in shapes.items()}
    config = {
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "torch_dtype": "float32",
    }  # fmt: skip
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": save(tensors, metadata={"format": "pt"}),
    }


def test_convert_hf_dir_by_hub_id(tmp_path, monkeypatch, capsys):
    """A tiny HF Llama, cached as `org/tiny-llama` with a pickle beside its safetensors,
    imports by its id (the pickle is neither fetched nor read)."""
    from oasst_jax.cli import convert

    files = {**_tiny_llama_files(), "pytorch_model.bin": b"pickle"}
    cache_repo(tmp_path / "cache", "org/tiny-llama", files, repo_type="model")
    use_cache(monkeypatch, tmp_path / "cache")
    convert.main(["hf-to-orbax", "--hf-dir", "org/tiny-llama", "--out", str(tmp_path / "a")])
    assert f"wrote {tmp_path / 'a'}: 2 layers, vocab 300" in capsys.readouterr().out
    assert (tmp_path / "a").is_dir()
    with pytest.raises(SystemExit) as e:  # the cache has no such model
        convert.main(["hf-to-orbax", "--hf-dir", "org/other", "--out", str(tmp_path / "c")])
    assert str(e.value).startswith("error: --hf-dir (no such local directory): org/other: ")
    assert "HF_HUB_OFFLINE is set" in str(e.value) and not (tmp_path / "c").exists()


def test_convert_gated_base_model_without_token(tmp_path, monkeypatch):
    from oasst_jax.cli import convert

    out = tmp_path / "ckpt"
    with fake_hub(monkeypatch, tmp_path / "cache"), pytest.raises(SystemExit) as e:
        convert.main(["hf-to-orbax", "--hf-dir", "meta-llama/gated-70b", "--out", str(out)])
    line = str(e.value)
    assert line.startswith("error: --hf-dir (no such local directory): meta-llama/gated-70b is")
    assert "HF_TOKEN" in line and "\n" not in line and not out.exists()
