"""``oasst_jax.hf.safetensors_io``: shard planning, sizes, and a sharded export
transformers reads back."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import tiny_hf_llama
from safetensors.numpy import load_file

from oasst_jax.hf import convert
from oasst_jax.hf.safetensors_io import INDEX_FILE, parse_size, plan_shards


@pytest.fixture(scope="module")
def bf16_sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return tiny_hf_llama(root / "bf16", dtype=torch.bfloat16, max_shard_size="40KB")


def test_sharded_write_and_read(bf16_sharded, tmp_path):
    convert.hf_to_orbax(bf16_sharded, str(tmp_path / "ckpt"))
    files = convert.orbax_to_hf(
        str(tmp_path / "ckpt"), str(tmp_path / "out"), max_shard_size="30KB", dtype="float32"
    )
    assert len(files) > 3
    with open(tmp_path / "out" / INDEX_FILE) as f:
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


def test_plan_shards_and_sizes():
    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 1)]
    assert plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards(sizes, 100) == [["a", "b", "c", "d"]]
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("64KiB") == 65536
    assert parse_size("1234") == 1234
