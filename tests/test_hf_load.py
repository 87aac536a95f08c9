"""``oasst_jax.hf.load``: the one start-params loader of ``train`` (``load=``) and
``sample`` (``--ckpt``), from a HF directory or an orbax checkpoint."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest
from conftest import tiny_hf_llama
from flax import linen as nn

from oasst_jax.hf.config import is_hf_dir
from oasst_jax.hf.convert import hf_to_orbax
from oasst_jax.hf.load import load_start_params, source_config
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
    cfgs = [source_config(path, dtype=dtype) for path in sources]
    assert cfgs[0] == cfgs[1] and cfgs[0].dtype == dtype
    cfg = dataclasses.replace(cfgs[0], param_dtype=dtype)
    hf, orbax = (load_start_params(path, cfg, _abstract(cfg)) for path in (hf_dir, ckpt))
    for a, b in zip(jax.tree.leaves(hf), jax.tree.leaves(orbax), strict=True):
        assert a.dtype == b.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_base_vocabulary_for_a_chatml_model_says_how_to_import(sources):
    hf_dir, _ = sources
    cfg = source_config(hf_dir)
    chatml = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + len(CHATML_TOKENS))
    with pytest.raises(ValueError, match="^load=X has the base vocabulary .*--add-chatml-tokens"):
        load_start_params(hf_dir, chatml, _abstract(chatml), where="load=X")


@pytest.mark.parametrize("source", [0, 1])
def test_another_model_shape_is_one_line_naming_the_source(sources, source):
    path = sources[source]
    cfg = source_config(path)
    other = dataclasses.replace(cfg, num_hidden_layers=cfg.num_hidden_layers + 1)
    expected = re.escape(f"{path}: checkpoint has model.num_hidden_layers=2")
    with pytest.raises(ValueError, match="^" + expected):
        load_start_params(path, other, _abstract(other))
