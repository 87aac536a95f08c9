"""Start weights from a Hugging Face directory or an orbax checkpoint.

:func:`load_hf` reads a HF directory into our fp32 param tree (optionally growing the
vocabulary by the chatml rows); :func:`load_start_params` is the one loader the
trainer's ``load=`` and the sampler's ``--ckpt`` share: either kind of source, checked
against the model it is loaded for and placed on the devices; :func:`source_config` is
the model config a source was saved with.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from oasst_jax import checkpoint
from oasst_jax.hf.config import (
    CONFIG_FILE,
    hf_config_to_llama,
    hf_dtype,
    is_hf_dir,
    read_hf_config,
)
from oasst_jax.hf.layout import (
    append_mean_rows,
    check_tensor_names,
    get_path,
    hf_tensor_specs,
    param_shapes,
    to_jax_layout,
)
from oasst_jax.hf.safetensors_io import SafetensorsReader
from oasst_jax.model import LlamaConfig
from oasst_jax.tokenizer import extra_tokens


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, np.float32)


def load_hf(
    hf_dir: str,
    *,
    add_chatml_tokens: bool = False,
    megatron_new_tokens: bool = False,
    allocate: Callable[[tuple[int, ...]], np.ndarray] = _zeros,
    **overrides: Any,
) -> tuple[Any, LlamaConfig, dict[str, Any]]:
    """``(fp32 params, LlamaConfig, hf config)`` from a Hugging Face directory.

    With ``add_chatml_tokens`` the vocabulary grows by the chatml rows
    (``tokenizer.CHATML_TOKENS``; with ``megatron_new_tokens`` Megatron-LLM's five new
    tokens before them, the card's 32007 layout) initialised to the mean row (embedding
    and LM head); the returned hf config records the new size and the source tensors'
    dtype (what export writes back).  ``allocate`` makes each zero-filled fp32
    leaf; ``hf.convert.hf_to_orbax`` passes one that returns file-backed memmaps
    so the tree never sits in RAM.
    """
    hf = read_hf_config(hf_dir)
    src_cfg = hf_config_to_llama(hf, where=os.path.join(hf_dir, CONFIG_FILE), **overrides)
    reader = SafetensorsReader(hf_dir)
    check_tensor_names({name: reader.shape(name) for name in reader.names}, src_cfg, hf_dir)
    extra = len(extra_tokens(megatron_new_tokens)) if add_chatml_tokens else 0
    cfg = dataclasses.replace(src_cfg, vocab_size=src_cfg.vocab_size + extra)
    params = jax.tree_util.tree_map(lambda a: allocate(tuple(a.shape)), param_shapes(cfg))
    dtype = None
    for name, path, layer, kind in hf_tensor_specs(src_cfg):
        w = reader.get(name)
        dtype = dtype or w.dtype.name
        if kind in ("embedding", "lm_head") and extra:
            w = append_mean_rows(w, extra)
        target = get_path(params, path)
        target[... if layer is None else layer] = to_jax_layout(w, kind, cfg)
    hf = {**hf, "vocab_size": cfg.vocab_size, "torch_dtype": dtype, "dtype": dtype}
    return params, cfg, hf


def source_config(path: str, step: int | None = None, dtype: str | None = None) -> LlamaConfig:
    """The model config the weights at ``path`` were saved with: a HF directory's
    config.json (compute dtype: its weights' dtype) or an orbax checkpoint's (newest
    step, or ``step``).  ``dtype`` replaces the compute dtype."""
    if is_hf_dir(path):
        hf = read_hf_config(path)
        where = os.path.join(path, CONFIG_FILE)
        return hf_config_to_llama(hf, where=where, dtype=dtype or hf_dtype(hf, where))
    cfg = checkpoint.load_model_config(path, step)
    return dataclasses.replace(cfg, dtype=dtype or cfg.dtype)


def load_start_params(
    path: str,
    model_cfg: LlamaConfig,
    abstract: Any,
    *,
    step: int | None = None,
    where: str | None = None,
) -> Any:
    """``model_cfg``'s weights from ``path``: an orbax checkpoint root (newest step, or
    ``step``) or a Hugging Face directory.

    ``abstract`` (``jax.ShapeDtypeStruct`` leaves with shardings) says where each leaf
    goes and in which dtype.  A source of another model shape is a one-line
    ``ValueError`` naming ``where`` (default ``path``); a HF directory with the base
    vocabulary where the model has the chatml rows says how to import it.
    """
    where = where or path
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
