"""``python -m oasst_jax.convert``: the CLI round trip, and every failure it reports as one
line (damaged input in every reader, pickle files, index entries outside the model
directory, an export that fails half-way or would replace foreign files)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import COMPILE_FLAGS, tiny_hf_llama

from oasst_jax import weights
from oasst_jax.cli import convert, sample
from oasst_jax.hf import safetensors_io
from oasst_jax.hf.config import CONFIG_FILE, read_hf_config
from oasst_jax.hf.convert import hf_to_orbax, orbax_to_hf
from oasst_jax.hf.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsReader

VOCAB = 300


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The suite's tiny random HF Llama (vocab ``VOCAB``), saved as safetensors."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "fp32": tiny_hf_llama(root / "fp32", vocab_size=VOCAB),
        "bf16_sharded": tiny_hf_llama(
            root / "bf16", dtype=torch.bfloat16, max_shard_size="40KB", vocab_size=VOCAB
        ),
    }


def _tensors(hf_dir: str) -> dict[str, np.ndarray]:
    reader = SafetensorsReader(hf_dir)
    return {name: reader.get(name) for name in reader.names}


# ----------------------------------------------------------------------------- CLI, errors


def test_cli_round_trip_with_chatml(hf_dirs, tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": COMPILE_FLAGS}  # one device
    args = ["hf-to-orbax", "--hf-dir", hf_dirs["fp32"], "--out", ckpt, "--add-chatml-tokens"]
    run = subprocess.run(
        [sys.executable, "-m", "oasst_jax.convert", *args], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert "vocab 302 (padded 384)" in run.stdout
    convert.main(["orbax-to-hf", "--ckpt", ckpt, "--out", out])
    assert read_hf_config(out)["vocab_size"] == VOCAB + 2
    assert _tensors(out)["lm_head.weight"].shape == (VOCAB + 2, 64)
    with pytest.raises(SystemExit, match="already holds a checkpoint"):
        convert.main(["hf-to-orbax", "--hf-dir", hf_dirs["fp32"], "--out", ckpt])


def test_pickle_checkpoint_is_refused(hf_dirs, tmp_path):
    shutil.copy(os.path.join(hf_dirs["fp32"], "config.json"), tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(SystemExit, match=r"pickle checkpoints \(pytorch_model.bin\)"):
        convert.main(["hf-to-orbax", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "c")])


# ----------------------------------------------------------------------------- damaged input


def _damaged_copy(src: str, dst, damage: str) -> str:
    shutil.copytree(src, dst)
    if damage == "config":
        cfg = json.loads((dst / CONFIG_FILE).read_text())
        del cfg["num_attention_heads"]
        (dst / CONFIG_FILE).write_text(json.dumps(cfg))
    else:
        data = (dst / SINGLE_FILE).read_bytes()
        (dst / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    return str(dst)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("config", "config.json: field 'num_attention_heads' is missing"),
        ("truncated", "model.safetensors: unreadable safetensors, truncated or damaged"),
    ],
)
def test_damaged_hf_dir_is_one_line_in_every_reader(hf_dirs, tmp_path, damage, message):
    """convert's CLI, ``weights.load`` (the trainer's ``load=``) and the sampler's
    ``--ckpt`` all name the file and the field in one line (a ValueError the trainer's CLI
    prints); nothing is written."""
    broken = _damaged_copy(hf_dirs["fp32"], tmp_path / "hf", damage)
    expected = re.escape(os.path.join(broken, message))
    with pytest.raises(SystemExit, match="^error: " + expected) as e:
        convert.main(["hf-to-orbax", "--hf-dir", broken, "--out", str(tmp_path / "ckpt")])
    assert "\n" not in e.value.code
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    with pytest.raises(ValueError, match=expected):
        weights.load(broken, None, None)
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
    index = json.loads((hf / INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = entry
    (hf / INDEX_FILE).write_text(json.dumps(index))
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
    hf_to_orbax(hf_dirs["fp32"], ckpt)
    orbax_to_hf(ckpt, str(out), max_shard_size="30KB")

    def snapshot() -> dict[str, bytes]:
        return {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}

    before = snapshot()
    assert len(before) > 4  # config, index, several shards
    save, calls = safetensors_io.save_file, []

    def disk_full_on_third_shard(tensors, path, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        save(tensors, path, **kwargs)

    monkeypatch.setattr(safetensors_io, "save_file", disk_full_on_third_shard)
    export = ["orbax-to-hf", "--ckpt", ckpt, "--out", str(out)]
    with pytest.raises(SystemExit, match=r"^error: \[Errno 28\] No space left on device") as e:
        convert.main([*export, "--max-shard-size", "20KB", "--dtype", "float32"])
    assert f"writing {out}; the previous {out} is unchanged; free space" in e.value.code
    assert snapshot() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "out"]  # the staging dir is gone
    monkeypatch.setattr(safetensors_io, "save_file", save)
    convert.main(export)  # one file now: the old shards and index must not linger
    assert sorted(os.listdir(out)) == [CONFIG_FILE, SINGLE_FILE]
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "out"]
    (out / "README.md").write_text("mine")
    after = snapshot()
    with pytest.raises(SystemExit, match="holds 'README.md', which an export does not write"):
        convert.main(export)
    assert snapshot() == after


def test_reexport_keeps_the_tokenizer_files_and_every_file_reads_0644(
    hf_dirs, tmp_path, sp_model_path, capsys
):
    """orbax-to-hf again onto an export, without --tokenizer, keeps the tokenizer files
    the first export wrote (it replaces the weights, not the tokenizer); every exported
    file, safetensors included (safetensors creates them 0600), is 0644 under umask 022."""
    from oasst_jax.hf.tokenizer import TOKENIZER_FILES

    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "out"
    hf_to_orbax(hf_dirs["fp32"], ckpt, add_chatml_tokens=True)
    old = os.umask(0o022)
    try:
        convert.main(["orbax-to-hf", "--ckpt", ckpt, "--out", str(out), "--tokenizer",
                      str(sp_model_path)])  # fmt: skip
        tokenizer = {n: (out / n).read_bytes() for n in TOKENIZER_FILES if (out / n).is_file()}
        assert "tokenizer.model" in tokenizer
        capsys.readouterr()
        convert.main(["orbax-to-hf", "--ckpt", ckpt, "--out", str(out), "--dtype", "bfloat16"])
    finally:
        os.umask(old)
    assert "no --tokenizer: kept the tokenizer files already there" in capsys.readouterr().out
    assert {n: (out / n).read_bytes() for n in tokenizer} == tokenizer
    assert read_hf_config(str(out))["torch_dtype"] == "bfloat16"
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
