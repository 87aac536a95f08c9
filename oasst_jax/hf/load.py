"""A Hugging Face directory as our fp32 param tree.

:func:`load_hf` reads a HF directory's tensors into our layout (optionally growing the
vocabulary by the chatml rows), for the import (``hf.convert``) and for
:mod:`oasst_jax.weights`, the one loader of train, sample and evaluate.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from oasst_jax.hf.config import CONFIG_FILE, hf_config_to_llama, read_hf_config
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
