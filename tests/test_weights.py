"""``oasst_jax.weights``: the one weights loader of ``train`` (``load=``), ``sample`` and
``evaluate`` (``--ckpt``), from a HF directory, an orbax checkpoint or a hub id."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_hf_llama
from flax import linen as nn
from hf_cache import cache_repo, use_cache

from oasst_jax import sharding, weights
from oasst_jax.hf.config import is_hf_dir
from oasst_jax.hf.convert import hf_to_orbax
from oasst_jax.model import Llama, abstract_params
from oasst_jax.tokenizer import CHATML_TOKENS


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny HF directory and its orbax import."""
    root = tmp_path_factory.mktemp("sources")
    hf_dir = tiny_hf_llama(root / "hf")
    hf_to_orbax(hf_dir, str(root / "ckpt"))
    return hf_dir, str(root / "ckpt")


def _abstract(cfg):
    """Every leaf on the one CPU device, in ``cfg.param_dtype`` (as the sampler asks)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        nn.meta.unbox(abstract_params(Llama(cfg))),
    )


def test_is_hf_dir(sources):
    hf_dir, ckpt = sources
    assert is_hf_dir(hf_dir) and not is_hf_dir(ckpt)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_dir_and_its_orbax_import_load_the_same(sources, dtype):
    """Same config (compute dtype as asked) and bit-identical leaves from either source,
    each cast to the leaf dtype the caller's abstract tree names."""
    hf_dir, ckpt = sources
    cfgs = [weights.source_config(path, dtype=dtype) for path in sources]
    assert cfgs[0] == cfgs[1] and cfgs[0].dtype == dtype
    cfg = dataclasses.replace(cfgs[0], param_dtype=dtype)
    hf, orbax = (weights.load(path, cfg, _abstract(cfg)) for path in (hf_dir, ckpt))
    for a, b in zip(jax.tree.leaves(hf), jax.tree.leaves(orbax), strict=True):
        assert a.dtype == b.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_base_vocabulary_for_a_chatml_model_says_how_to_import(sources):
    hf_dir, _ = sources
    cfg = weights.source_config(hf_dir)
    chatml = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + len(CHATML_TOKENS))
    with pytest.raises(ValueError, match="^load=X has the base vocabulary .*--add-chatml-tokens"):
        weights.load(hf_dir, chatml, _abstract(chatml), where="load=X")


@pytest.mark.parametrize("source", [0, 1])
def test_another_model_shape_is_one_line_naming_the_source(sources, source):
    path = sources[source]
    cfg = weights.source_config(path)
    other = dataclasses.replace(cfg, num_hidden_layers=cfg.num_hidden_layers + 1)
    expected = re.escape(f"{path}: checkpoint has model.num_hidden_layers=2")
    with pytest.raises(ValueError, match="^" + expected):
        weights.load(path, other, _abstract(other))


def test_a_hub_id_loads_what_its_directory_holds(sources, tmp_path, monkeypatch):
    """``load=`` / ``--ckpt`` spelt as a hub id: the cached snapshot, the same leaves as
    the directory it mirrors (for training and for inference)."""
    hf_dir, _ = sources
    repo = "org/tiny-llama"
    files = {p.name: p for p in Path(hf_dir).iterdir() if p.is_file()}
    cache_repo(tmp_path / "cache", repo, files, repo_type="model")
    use_cache(monkeypatch, tmp_path / "cache")
    cfg = weights.source_config(repo)
    assert cfg == weights.source_config(hf_dir)
    cfg = dataclasses.replace(cfg, param_dtype="float32")
    ours, theirs = (weights.load(p, cfg, _abstract(cfg)) for p in (repo, hf_dir))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    params, inference_cfg = weights.load_for_inference(repo, mesh, dtype="float32")
    assert inference_cfg.remat_policy == "none"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
