"""Weights from a path, for training or for inference: the one door to a model's weights.

A path is an orbax checkpoint root (its newest step, or ``step``), a Hugging Face directory
(``config.json`` + safetensors) or a Hugging Face hub id (``meta-llama/Llama-2-7b-hf``:
fetched into the standard HF cache by :mod:`oasst_jax.hub`; a path on disk always wins).

- :func:`source_config`: the model config a path's weights were saved with;
- :func:`load`: ``model_cfg``'s weights placed where an abstract tree says, checked
  against the model they are loaded for (the trainer's ``load=``: full weights or a LoRA
  run's frozen base);
- :func:`load_for_inference`: params on a mesh in the compute dtype and the inference
  config (``sample --ckpt``, ``evaluate --ckpt``, optionally with a LoRA run's adapters
  merged in, :func:`with_adapter`).

CLIs import this module and never one another, so "where do weights come from" has one
answer whichever command asks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import linen as nn

from oasst_jax import checkpoint, decode, hub, lora, sharding
from oasst_jax.hf.config import CONFIG_FILE, hf_config_to_llama, hf_dtype, is_hf_dir, read_hf_config
from oasst_jax.hf.load import load_hf
from oasst_jax.model import Llama, LlamaConfig, abstract_params
from oasst_jax.tokenizer import extra_tokens

# What is read of a hub model (never its .bin pickles): config.json, the weights, and where
# they are sharded, their index.
HF_MODEL_FILES = (CONFIG_FILE, "*.safetensors")
HF_MODEL_OPTIONAL = ("*.safetensors.index.json",)


def resolve(path: str, what: str) -> str:
    """``path`` itself when it exists on disk or is not spelt as a hub id, else the cached
    snapshot directory of that hub model (fetched once; ``what`` names the setting in
    error lines)."""
    return hub.local_or_hub_dir(path, HF_MODEL_FILES, optional=HF_MODEL_OPTIONAL, what=what)


def source_config(
    path: str, step: int | None = None, dtype: str | None = None, *, where: str | None = None
) -> LlamaConfig:
    """The model config the weights at ``path`` were saved with: a HF directory's
    config.json (compute dtype: its weights' dtype) or an orbax checkpoint's (newest
    step, or ``step``).  ``dtype`` replaces the compute dtype; ``where`` names the
    setting in error lines (default ``path``)."""
    path = resolve(path, where or path)
    if is_hf_dir(path):
        hf = read_hf_config(path)
        where = os.path.join(path, CONFIG_FILE)
        return hf_config_to_llama(hf, where=where, dtype=dtype or hf_dtype(hf, where))
    cfg = checkpoint.load_model_config(path, step)
    return dataclasses.replace(cfg, dtype=dtype or cfg.dtype)


def load(
    path: str,
    model_cfg: LlamaConfig,
    abstract: Any,
    *,
    step: int | None = None,
    where: str | None = None,
) -> Any:
    """``model_cfg``'s weights from ``path`` (an orbax checkpoint root, newest step or
    ``step``; a Hugging Face directory; a hub id).

    ``abstract`` (``jax.ShapeDtypeStruct`` leaves with shardings) says where each leaf
    goes and in which dtype.  A source of another model shape is a one-line
    ``ValueError`` naming ``where`` (default ``path``); a HF directory with the base
    vocabulary where the model has the chatml rows says how to import it.
    """
    where = where or path
    path = resolve(path, where)
    if is_hf_dir(path):
        params, hf_cfg, _ = load_hf(path)
        for megatron in (False, True):
            if hf_cfg.vocab_size + len(extra_tokens(megatron)) == model_cfg.vocab_size:
                raise ValueError(
                    f"{where} has the base vocabulary ({hf_cfg.vocab_size}); import it with "
                    "`python -m oasst_jax.convert hf-to-orbax --add-chatml-tokens"
                    + (" --megatron-new-tokens` first" if megatron else "` first")
                )
        checkpoint.check_same_shape(hf_cfg, model_cfg, where)
        checkpoint.check_shapes(abstract, params, where)
        return jax.tree.map(
            lambda x, a: jax.device_put(x.astype(a.dtype, copy=False), a.sharding),
            params,
            abstract,
        )
    checkpoint.check_same_shape(checkpoint.load_model_config(path, step), model_cfg, where)
    return checkpoint.load_weights(path, abstract, step)


def load_for_inference(
    path: str,
    mesh: jax.sharding.Mesh,
    *,
    step: int | None = None,
    dtype: str | None = None,
    adapter: str | None = None,
    where: str | None = None,
) -> tuple[Any, LlamaConfig]:
    """``(params on mesh, inference LlamaConfig)`` from ``path``, with a LoRA run's
    adapters (``adapter``: its checkpoint root) merged in.

    Params are cast to the compute dtype (``dtype``, default the checkpoint's):
    fp32 master weights are a training concern and would double inference memory.
    ``where`` names the setting in error lines (default ``path``).
    """
    local = resolve(path, where or path)
    cfg = decode.inference_config(source_config(local, step, dtype))
    boxed = abstract_params(Llama(cfg))
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(boxed),
        sharding.param_shardings(mesh, boxed),
    )
    params = load(local, cfg, target, step=step, where=where or path)
    if adapter is not None:
        params = with_adapter(path, params, adapter, cfg.vocab_size)
    return params, cfg


def with_adapter(base_path: str, params: Any, adapter: str, vocab_size: int) -> Any:
    """``params`` (the base at ``base_path``) with ``adapter``'s LoRA weights merged in:
    refused in one line unless the adapter was trained on this very base (the
    fingerprint it records, which is the same for the orbax base and its HF export)."""
    meta = checkpoint.load_json_item(adapter, "meta") or {}
    record = lora.base_record(base_path, params, vocab_size)
    lora.check_base(meta, record, f"adapter {adapter}", "give that base as --ckpt")
    return lora.merged_params(params, adapter)
