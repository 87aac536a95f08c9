"""``oasst_jax.hf.layout`` through ``hf.load.load_hf``: every tensor's name, transpose,
head split and vocab padding checked by logits parity with transformers; chatml rows;
tensor-name errors."""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_hf_llama
from safetensors.numpy import load_file, save_file

from oasst_jax.hf.config import hf_config_to_llama, read_hf_config
from oasst_jax.hf.load import load_hf
from oasst_jax.hf.safetensors_io import SINGLE_FILE, SafetensorsReader
from oasst_jax.model import Llama

VOCAB = 300  # pads to 384: padding is added on import and dropped on export
SEQ = 24
BF16_TOL = 0.1  # bf16 logits of order 1 carry ~1e-2 rounding per op; see test_bf16_parity


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The suite's tiny random HF Llama (vocab ``VOCAB``), saved as safetensors."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "fp32": tiny_hf_llama(root / "fp32", vocab_size=VOCAB),
        "fp32_rope2": tiny_hf_llama(root / "fp32_rope2", rope_factor=2.0, vocab_size=VOCAB),
        "bf16_sharded": tiny_hf_llama(
            root / "bf16", dtype=torch.bfloat16, max_shard_size="40KB", vocab_size=VOCAB
        ),
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
    params, cfg, _ = load_hf(hf_dir, dtype=dtype)
    logits = jax.jit(Llama(cfg).apply)({"params": params}, _tokens())
    return np.asarray(logits)[..., : cfg.vocab_size]


def _tensors(hf_dir: str) -> dict[str, np.ndarray]:
    reader = SafetensorsReader(hf_dir)
    return {name: reader.get(name) for name in reader.names}


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["fp32", "fp32_rope2"])
def test_fp32_logits_match_transformers(hf_dirs, name):
    err = float(np.abs(_our_logits(hf_dirs[name], "float32") - _hf_logits(hf_dirs[name])).max())
    print(f"{name}: max abs logit error vs transformers {err:.2e}")
    assert err <= 1e-4


def test_rope_scaling_changes_logits(hf_dirs):
    """Guards the parity test: factor 2 must matter at these positions."""
    cfg = hf_config_to_llama(read_hf_config(hf_dirs["fp32_rope2"]))
    assert cfg.rope_scaling_factor == 2.0
    params, _, _ = load_hf(hf_dirs["fp32_rope2"], dtype="float32")
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


# ----------------------------------------------------------------------------- chatml


def test_add_chatml_tokens_appends_mean_rows(hf_dirs):
    src = _tensors(hf_dirs["fp32"])
    params, cfg, hf = load_hf(hf_dirs["fp32"], add_chatml_tokens=True)
    assert cfg.vocab_size == hf["vocab_size"] == VOCAB + 2
    emb, head = params["embedding"], params["lm_head"]
    np.testing.assert_array_equal(emb[:VOCAB], src["model.embed_tokens.weight"])
    np.testing.assert_array_equal(head[:, :VOCAB], src["lm_head.weight"].T)
    for row in (VOCAB, VOCAB + 1):
        np.testing.assert_allclose(emb[row], src["model.embed_tokens.weight"].mean(0), atol=1e-7)
        np.testing.assert_allclose(head[:, row], src["lm_head.weight"].mean(0), atol=1e-7)
    assert not emb[VOCAB + 2 :].any() and not head[:, VOCAB + 2 :].any()  # padding stays zero
    plain, plain_cfg, _ = load_hf(hf_dirs["fp32"])
    assert plain_cfg.vocab_size == VOCAB and not plain["embedding"][VOCAB:].any()


# ----------------------------------------------------------------------------- names


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
    tensors = load_file(os.path.join(hf_dirs["fp32"], SINGLE_FILE))
    edit(tensors)
    save_file(tensors, str(tmp_path / SINGLE_FILE))
    with pytest.raises(ValueError, match=message):
        load_hf(str(tmp_path))
