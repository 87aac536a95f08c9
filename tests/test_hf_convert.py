"""``oasst_jax.hf.convert``: bit-exact HF -> orbax -> HF, import through memmaps,
export reading one layer at a time."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
from conftest import tiny_hf_llama

from oasst_jax import checkpoint
from oasst_jax.hf import convert
from oasst_jax.hf.config import hf_config_to_llama, read_hf_config
from oasst_jax.hf.layout import LAYER_TENSORS, LAYERS_PATH
from oasst_jax.hf.safetensors_io import SafetensorsReader


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The suite's tiny random HF Llama, saved as safetensors."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "fp32": tiny_hf_llama(root / "fp32"),
        "bf16_sharded": tiny_hf_llama(root / "bf16", dtype=torch.bfloat16, max_shard_size="40KB"),
    }


def _tensors(hf_dir: str) -> dict[str, np.ndarray]:
    reader = SafetensorsReader(hf_dir)
    return {name: reader.get(name) for name in reader.names}


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
    out_cfg = read_hf_config(str(tmp_path / "out"))
    src_cfg = read_hf_config(src)
    assert hf_config_to_llama(out_cfg) == hf_config_to_llama(src_cfg)
    assert out_cfg["torch_dtype"] == out_cfg["dtype"] == src_cfg["dtype"]


def test_import_builds_the_tree_in_memmaps_and_removes_them(hf_dirs, tmp_path, monkeypatch):
    """The fp32 tree handed to orbax lives in files beside --out, gone afterwards
    (also when the save fails), so import never holds the whole model in RAM."""
    seen = []
    save = checkpoint.save_weights

    def spy(directory, params, *args, **kwargs):
        leaves = jax.tree_util.tree_leaves(params)
        seen.append({os.path.dirname(leaf.filename) for leaf in leaves})
        assert all(isinstance(leaf, np.memmap) for leaf in leaves)
        return save(directory, params, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_weights", spy)
    convert.hf_to_orbax(hf_dirs["fp32"], str(tmp_path / "ckpt"))
    (tmp,) = seen[0]
    assert os.path.dirname(tmp) == str(tmp_path) and not os.path.exists(tmp)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_weights", fail)
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
    layered = [(path, i) for path, i in reads if path[:2] == LAYERS_PATH]
    assert len(layered) == 2 * len(LAYER_TENSORS) and all(i is not None for _, i in layered)
    reader = checkpoint.ParamReader(str(tmp_path / "ckpt"))
    q = reader._store((*LAYERS_PATH, "attn", "q"))
    assert q.chunk_layout.read_chunk.shape == (1, *q.shape[1:])
    want, got = _tensors(hf_dirs["fp32"]), _tensors(str(tmp_path / "out"))
    assert all(np.array_equal(got[k], w) for k, w in want.items())
