"""``oasst_jax.hf.config``: both transformers config.json layouts, and back."""

from __future__ import annotations

import dataclasses

import pytest
import transformers

from oasst_jax.hf import config

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
    v5 = config.hf_config_to_llama(V5)
    assert (v5.rope_theta, v5.rope_scaling_factor) == (500.0, 2.0)
    assert config.hf_config_to_llama(_v4({"type": "linear", "factor": 2.0})) == v5
    assert config.hf_config_to_llama(_v4({"rope_type": "linear", "factor": 2.0})) == v5
    assert config.hf_dtype(V5) == config.hf_dtype(_v4(None)) == "bfloat16"
    assert config.hf_config_to_llama(_v4(None)).rope_scaling_factor == 1.0


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_exported_config_reads_back_in_both_layouts(factor):
    cfg = dataclasses.replace(config.hf_config_to_llama(V5), rope_scaling_factor=factor)
    out = config.llama_to_hf_config(cfg, "float32")
    assert config.hf_config_to_llama(out) == cfg
    v4_view = {k: v for k, v in out.items() if k != "rope_parameters"}
    v5_view = {k: v for k, v in out.items() if k not in ("rope_theta", "rope_scaling")}
    assert config.hf_config_to_llama(v4_view) == config.hf_config_to_llama(v5_view) == cfg
    hf = transformers.LlamaConfig(**out)
    assert hf.rope_parameters["rope_theta"] == 500.0
    assert hf.rope_parameters.get("factor", 1.0) == factor


@pytest.mark.parametrize("kind", ["llama3", "dynamic", "yarn"])
def test_unsupported_rope_types_are_rejected(kind):
    bad = {**V5, "rope_parameters": {"rope_type": kind, "rope_theta": 1e4, "factor": 8.0}}
    with pytest.raises(ValueError, match=f"rope type '{kind}' is not supported"):
        config.hf_config_to_llama(bad)
