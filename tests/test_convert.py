"""Hugging Face interop: logits parity with transformers, bit-exact round trip, CLI, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_hf_llama
from safetensors.numpy import load_file, save_file

from oasst_jax import checkpoint, convert, sample, train
from oasst_jax.model import Llama

VOCAB = 300  # pads to 384: padding is added on import and dropped on export
SEQ = 24
BF16_TOL = 0.1  # bf16 logits of order 1 carry ~1e-2 rounding per op; see test_bf16_parity


def _make_hf(path, *, rope_factor: float = 1.0, dtype=torch.float32, max_shard_size=None) -> str:
    """The suite's tiny random HF Llama (vocab ``VOCAB``), saved as safetensors."""
    return tiny_hf_llama(
        path, rope_factor=rope_factor, dtype=dtype, max_shard_size=max_shard_size, vocab_size=VOCAB
    )


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "fp32": _make_hf(root / "fp32"),
        "fp32_rope2": _make_hf(root / "fp32_rope2", rope_factor=2.0),
        "bf16_sharded": _make_hf(root / "bf16", dtype=torch.bfloat16, max_shard_size="40KB"),
    }


def _tokens() -> np.ndarray:
    return np.random.RandomState(0).randint(0, VOCAB, (2, SEQ)).astype(np.int32)


def _hf_logits(hf_dir: str, dtype=torch.float32) -> np.ndarray:
    model = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, dtype=dtype, attn_implementation="eager"
    )
    with torch.no_grad():
        return model(torch.from_numpy(_tokens()).long()).logits.float().numpy()


def _our_logits(hf_dir: str, dtype: str) -> np.ndarray:
    params, cfg, _ = convert.load_hf(hf_dir, dtype=dtype)
    logits = jax.jit(Llama(cfg).apply)({"params": params}, _tokens())
    return np.asarray(logits)[..., : cfg.vocab_size]


def _tensors(hf_dir: str) -> dict[str, np.ndarray]:
    reader = convert.SafetensorsReader(hf_dir)
    return {name: reader.get(name) for name in reader.names}


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["fp32", "fp32_rope2"])
def test_fp32_logits_match_transformers(hf_dirs, name):
    err = float(np.abs(_our_logits(hf_dirs[name], "float32") - _hf_logits(hf_dirs[name])).max())
    print(f"{name}: max abs logit error vs transformers {err:.2e}")
    assert err <= 1e-4


def test_rope_scaling_changes_logits(hf_dirs):
    """Guards the parity test: factor 2 must matter at these positions."""
    cfg = convert.hf_config_to_llama(convert.read_hf_config(hf_dirs["fp32_rope2"]))
    assert cfg.rope_scaling_factor == 2.0
    params, _, _ = convert.load_hf(hf_dirs["fp32_rope2"], dtype="float32")
    apply = jax.jit(lambda p, c: Llama(c).apply({"params": p}, _tokens()), static_argnums=1)
    unscaled = dataclasses.replace(cfg, rope_scaling_factor=1.0, dtype="float32")
    scaled = dataclasses.replace(cfg, dtype="float32")
    assert float(np.abs(apply(params, unscaled) - apply(params, scaled)).max()) > 1e-2


def test_bf16_logits_match_transformers(hf_dirs):
    """bf16 weights, bf16 compute on both sides; rounding points differ (HF
    rounds norm outputs before the scale and the LM head output to bf16,
    we keep fp32 there), so agreement is to bf16 precision, not bitwise."""
    ours = _our_logits(hf_dirs["bf16_sharded"], "bfloat16")
    theirs = _hf_logits(hf_dirs["bf16_sharded"], torch.bfloat16)
    err = float(np.abs(ours - theirs).max())
    scale = float(np.abs(theirs).max())
    print(f"bf16: max abs logit error vs transformers {err:.2e} (max |logit| {scale:.2f})")
    assert err <= BF16_TOL


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", ["fp32", "bf16_sharded"])
def test_hf_orbax_hf_is_bit_exact(hf_dirs, tmp_path, name):
    src = hf_dirs[name]
    convert.hf_to_orbax(src, str(tmp_path / "ckpt"))
    stored = checkpoint.load_weights(str(tmp_path / "ckpt"))
    assert stored["embedding"].dtype == np.float32  # master weights in fp32
    convert.orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    want, got = _tensors(src), _tensors(str(tmp_path / "out"))
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        assert got[key].dtype == w.dtype and np.array_equal(got[key], w), key
    out_cfg = convert.read_hf_config(str(tmp_path / "out"))
    src_cfg = convert.read_hf_config(src)
    assert convert.hf_config_to_llama(out_cfg) == convert.hf_config_to_llama(src_cfg)
    assert out_cfg["torch_dtype"] == out_cfg["dtype"] == src_cfg["dtype"]


def test_sharded_write_and_read(hf_dirs, tmp_path):
    convert.hf_to_orbax(hf_dirs["bf16_sharded"], str(tmp_path / "ckpt"))
    files = convert.orbax_to_hf(
        str(tmp_path / "ckpt"), str(tmp_path / "out"), max_shard_size="30KB", dtype="float32"
    )
    assert len(files) > 3
    with open(tmp_path / "out" / convert.INDEX_FILE) as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == sorted(files)
    total = 0
    for file in files:
        tensors = load_file(str(tmp_path / "out" / file))
        size = sum(t.nbytes for t in tensors.values())
        assert size <= 30_000 or len(tensors) == 1, file
        total += size
    assert index["metadata"]["total_size"] == total
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.dtype == torch.float32  # transformers reads our index + config


def test_import_builds_the_tree_in_memmaps_and_removes_them(hf_dirs, tmp_path, monkeypatch):
    """The fp32 tree handed to orbax lives in files beside --out, gone afterwards
    (also when the save fails), so import never holds the whole model in RAM."""
    seen = []
    save = convert.checkpoint.save_weights

    def spy(directory, params, *args, **kwargs):
        leaves = jax.tree_util.tree_leaves(params)
        seen.append({os.path.dirname(leaf.filename) for leaf in leaves})
        assert all(isinstance(leaf, np.memmap) for leaf in leaves)
        return save(directory, params, *args, **kwargs)

    monkeypatch.setattr(convert.checkpoint, "save_weights", spy)
    convert.hf_to_orbax(hf_dirs["fp32"], str(tmp_path / "ckpt"))
    (tmp,) = seen[0]
    assert os.path.dirname(tmp) == str(tmp_path) and not os.path.exists(tmp)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert.checkpoint, "save_weights", fail)
    with pytest.raises(OSError, match="disk full"):
        convert.hf_to_orbax(hf_dirs["fp32"], str(tmp_path / "ckpt2"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_export_reads_layer_slices_of_per_layer_chunks(hf_dirs, tmp_path, monkeypatch):
    """Large stacked leaves are stored one chunk per layer and export reads each
    layer on its own (here every stacked leaf counts as large); still bit exact."""
    monkeypatch.setattr(convert, "MIN_LAYER_CHUNKED_BYTES", 0)
    convert.hf_to_orbax(hf_dirs["fp32"], str(tmp_path / "ckpt"))
    reads = []
    read = checkpoint.ParamReader.read

    def spy(self, path, index=None):
        reads.append((path, index))
        return read(self, path, index)

    monkeypatch.setattr(checkpoint.ParamReader, "read", spy)
    convert.orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    layered = [(path, i) for path, i in reads if path[:2] == convert.LAYERS_PATH]
    assert len(layered) == 2 * len(convert.LAYER_TENSORS) and all(i is not None for _, i in layered)
    reader = checkpoint.ParamReader(str(tmp_path / "ckpt"))
    q = reader._store((*convert.LAYERS_PATH, "attn", "q"))
    assert q.chunk_layout.read_chunk.shape == (1, *q.shape[1:])
    want, got = _tensors(hf_dirs["fp32"]), _tensors(str(tmp_path / "out"))
    assert all(np.array_equal(got[k], w) for k, w in want.items())


def test_plan_shards_and_sizes():
    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 1)]
    assert convert.plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d"]]
    assert convert.plan_shards(sizes, 100) == [["a", "b", "c", "d"]]
    assert convert.parse_size("5GB") == 5 * 10**9
    assert convert.parse_size("64KiB") == 65536
    assert convert.parse_size("1234") == 1234


# ----------------------------------------------------------------------------- chatml


def test_add_chatml_tokens_appends_mean_rows(hf_dirs, tmp_path):
    src = _tensors(hf_dirs["fp32"])
    params, cfg, hf = convert.load_hf(hf_dirs["fp32"], add_chatml_tokens=True)
    assert cfg.vocab_size == hf["vocab_size"] == VOCAB + 2
    emb, head = params["embedding"], params["lm_head"]
    np.testing.assert_array_equal(emb[:VOCAB], src["model.embed_tokens.weight"])
    np.testing.assert_array_equal(head[:, :VOCAB], src["lm_head.weight"].T)
    for row in (VOCAB, VOCAB + 1):
        np.testing.assert_allclose(emb[row], src["model.embed_tokens.weight"].mean(0), atol=1e-7)
        np.testing.assert_allclose(head[:, row], src["lm_head.weight"].mean(0), atol=1e-7)
    assert not emb[VOCAB + 2 :].any() and not head[:, VOCAB + 2 :].any()  # padding stays zero
    plain, plain_cfg, _ = convert.load_hf(hf_dirs["fp32"])
    assert plain_cfg.vocab_size == VOCAB and not plain["embedding"][VOCAB:].any()


# ----------------------------------------------------------------------------- config layouts

V5 = {
    "model_type": "llama",
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "dtype": "bfloat16",
    "rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
}


def _v4(rope_scaling) -> dict:
    base = {k: v for k, v in V5.items() if k not in ("dtype", "rope_parameters")}
    return {**base, "torch_dtype": "bfloat16", "rope_theta": 500.0, "rope_scaling": rope_scaling}


def test_v4_and_v5_config_layouts_agree():
    v5 = convert.hf_config_to_llama(V5)
    assert (v5.rope_theta, v5.rope_scaling_factor) == (500.0, 2.0)
    assert convert.hf_config_to_llama(_v4({"type": "linear", "factor": 2.0})) == v5
    assert convert.hf_config_to_llama(_v4({"rope_type": "linear", "factor": 2.0})) == v5
    assert convert.hf_dtype(V5) == convert.hf_dtype(_v4(None)) == "bfloat16"
    assert convert.hf_config_to_llama(_v4(None)).rope_scaling_factor == 1.0


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_exported_config_reads_back_in_both_layouts(factor):
    cfg = dataclasses.replace(convert.hf_config_to_llama(V5), rope_scaling_factor=factor)
    out = convert.llama_to_hf_config(cfg, "float32")
    assert convert.hf_config_to_llama(out) == cfg
    v4_view = {k: v for k, v in out.items() if k != "rope_parameters"}
    v5_view = {k: v for k, v in out.items() if k not in ("rope_theta", "rope_scaling")}
    assert convert.hf_config_to_llama(v4_view) == convert.hf_config_to_llama(v5_view) == cfg
    hf = transformers.LlamaConfig(**out)
    assert hf.rope_parameters["rope_theta"] == 500.0
    assert hf.rope_parameters.get("factor", 1.0) == factor


@pytest.mark.parametrize("kind", ["llama3", "dynamic", "yarn"])
def test_unsupported_rope_types_are_rejected(kind):
    bad = {**V5, "rope_parameters": {"rope_type": kind, "rope_theta": 1e4, "factor": 8.0}}
    with pytest.raises(ValueError, match=f"rope type '{kind}' is not supported"):
        convert.hf_config_to_llama(bad)


# ----------------------------------------------------------------------------- CLI, errors


def test_cli_round_trip_with_chatml(hf_dirs, tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    args = ["hf-to-orbax", "--hf-dir", hf_dirs["fp32"], "--out", ckpt, "--add-chatml-tokens"]
    run = subprocess.run(
        [sys.executable, "-m", "oasst_jax.convert", *args], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert "vocab 302 (padded 384)" in run.stdout
    convert.main(["orbax-to-hf", "--ckpt", ckpt, "--out", out])
    assert convert.read_hf_config(out)["vocab_size"] == VOCAB + 2
    assert _tensors(out)["lm_head.weight"].shape == (VOCAB + 2, 64)
    with pytest.raises(SystemExit, match="already holds a checkpoint"):
        convert.main(["hf-to-orbax", "--hf-dir", hf_dirs["fp32"], "--out", ckpt])


def test_pickle_checkpoint_is_refused(hf_dirs, tmp_path):
    shutil.copy(os.path.join(hf_dirs["fp32"], "config.json"), tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(SystemExit, match=r"pickle checkpoints \(pytorch_model.bin\)"):
        convert.main(["hf-to-orbax", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "c")])


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            "'model.layers.1.mlp.up_proj.weight' is missing",
        ),
        (lambda t: t.update(extra=np.zeros(2, np.float32)), "unexpected tensor 'extra'"),
        (
            lambda t: t.update({"model.norm.weight": np.ones(3, np.float32)}),
            "'model.norm.weight' has shape",
        ),
    ],
)
def test_tensor_name_errors(hf_dirs, tmp_path, edit, message):
    shutil.copy(os.path.join(hf_dirs["fp32"], "config.json"), tmp_path)
    tensors = load_file(os.path.join(hf_dirs["fp32"], convert.SINGLE_FILE))
    edit(tensors)
    save_file(tensors, str(tmp_path / convert.SINGLE_FILE))
    with pytest.raises(ValueError, match=message):
        convert.load_hf(str(tmp_path))


# ----------------------------------------------------------------------------- damaged input


def _damaged_copy(src: str, dst, damage: str) -> str:
    shutil.copytree(src, dst)
    if damage == "config":
        cfg = json.loads((dst / convert.CONFIG_FILE).read_text())
        del cfg["num_attention_heads"]
        (dst / convert.CONFIG_FILE).write_text(json.dumps(cfg))
    else:
        data = (dst / convert.SINGLE_FILE).read_bytes()
        (dst / convert.SINGLE_FILE).write_bytes(data[: len(data) // 2])
    return str(dst)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("config", "config.json: field 'num_attention_heads' is missing"),
        ("truncated", "model.safetensors: unreadable safetensors, truncated or damaged"),
    ],
)
def test_damaged_hf_dir_is_one_line_in_every_reader(hf_dirs, tmp_path, damage, message):
    """convert's CLI, the trainer's ``load=`` and the sampler's ``--ckpt`` all name the
    file and the field in one line (a ValueError the trainer's CLI prints); nothing is written."""
    broken = _damaged_copy(hf_dirs["fp32"], tmp_path / "hf", damage)
    expected = re.escape(os.path.join(broken, message))
    with pytest.raises(SystemExit, match="^error: " + expected) as e:
        convert.main(["hf-to-orbax", "--hf-dir", broken, "--out", str(tmp_path / "ckpt")])
    assert "\n" not in e.value.code
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    with pytest.raises(ValueError, match=expected):
        train.load_start_params(types.SimpleNamespace(load=broken), None, None)
    with pytest.raises(SystemExit, match="^error: " + expected):
        sample.main(["--ckpt", broken, "--prompt", "hi"])


@pytest.mark.parametrize(
    "entry, message",
    [
        ("../outside.safetensors", "points at '../outside.safetensors', not a file in the model"),
        ("/etc/passwd", "points at '/etc/passwd', not a file in the model directory; refusing"),
        ("sub/model.safetensors", "points at 'sub/model.safetensors', not a file in the model"),
        ("model-00009-of-00009.safetensors", "no such file \\(it holds tensor 'lm_head.weight'\\)"),
    ],
)
def test_index_entries_outside_the_model_dir_are_refused(hf_dirs, tmp_path, entry, message):
    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs["bf16_sharded"], hf)
    index = json.loads((hf / convert.INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = entry
    (hf / convert.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(SystemExit, match=message) as e:
        convert.main(["hf-to-orbax", "--hf-dir", str(hf), "--out", str(tmp_path / "ckpt")])
    assert e.value.code.startswith("error: ") and "\n" not in e.value.code
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_export_replaces_only_a_previous_export_and_only_when_complete(
    hf_dirs, tmp_path, monkeypatch
):
    """orbax-to-hf builds the directory under a hidden name and renames it in at the end:
    a failure mid-write leaves the old export byte for byte; a success replaces it whole
    (no stale shards); a directory holding other files is refused untouched."""
    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "out"
    convert.hf_to_orbax(hf_dirs["fp32"], ckpt)
    convert.orbax_to_hf(ckpt, str(out), max_shard_size="30KB")

    def snapshot() -> dict[str, bytes]:
        return {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}

    before = snapshot()
    assert len(before) > 4  # config, index, several shards
    save, calls = convert.save_file, []

    def disk_full_on_third_shard(tensors, path, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        save(tensors, path, **kwargs)

    monkeypatch.setattr(convert, "save_file", disk_full_on_third_shard)
    export = ["orbax-to-hf", "--ckpt", ckpt, "--out", str(out)]
    with pytest.raises(SystemExit, match=r"^error: \[Errno 28\] No space left on device"):
        convert.main([*export, "--max-shard-size", "20KB", "--dtype", "float32"])
    assert snapshot() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "out"]  # the staging dir is gone
    monkeypatch.setattr(convert, "save_file", save)
    convert.main(export)  # one file now: the old shards and index must not linger
    assert sorted(os.listdir(out)) == [convert.CONFIG_FILE, convert.SINGLE_FILE]
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "out"]
    (out / "README.md").write_text("mine")
    after = snapshot()
    with pytest.raises(SystemExit, match="holds 'README.md', which an export does not write"):
        convert.main(export)
    assert snapshot() == after
