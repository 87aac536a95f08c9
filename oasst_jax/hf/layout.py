"""Tensor names and layouts: HF ``LlamaForCausalLM`` tensors <-> our param tree.

HF stores a linear layer as ``[out, in]``; ours are ``[in, out]`` with the head axes
split out (``q [D, H, Dh]``, ``o [H, Dh, D]``) and the layers stacked (``[layers,
...]`` under ``decoder/layers``).  Both use RoPE's rotate-half layout, so no row
permutation is needed.  The vocab axis is padded to ``vocab_pad_multiple`` on import
and cut back on export; rows added for the chatml tokens start at the mean row.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from flax import linen as nn

from oasst_jax.model import Llama, LlamaConfig, abstract_params

# Buffers some older conversions saved; they are derived from the config, not weights.
DERIVED_TENSOR = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# (path in our param tree, HF name, layout kind).  ``{i}`` is the layer index.
LAYER_TENSORS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("attn", "q"), "model.layers.{i}.self_attn.q_proj.weight", "heads_in"),
    (("attn", "k"), "model.layers.{i}.self_attn.k_proj.weight", "kv_heads_in"),
    (("attn", "v"), "model.layers.{i}.self_attn.v_proj.weight", "kv_heads_in"),
    (("attn", "o"), "model.layers.{i}.self_attn.o_proj.weight", "heads_out"),
    (("attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight", "vector"),
    (("mlp", "gate"), "model.layers.{i}.mlp.gate_proj.weight", "mlp_in"),
    (("mlp", "up"), "model.layers.{i}.mlp.up_proj.weight", "mlp_in"),
    (("mlp", "down"), "model.layers.{i}.mlp.down_proj.weight", "mlp_out"),
    (("mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight", "vector"),
)
EMBED_TENSOR = (("embedding",), "model.embed_tokens.weight", "embedding")
NORM_TENSOR = (("final_norm", "scale"), "model.norm.weight", "vector")
HEAD_TENSOR = (("lm_head",), "lm_head.weight", "lm_head")
LAYERS_PATH = ("decoder", "layers")


def hf_tensor_specs(cfg: LlamaConfig) -> Iterator[tuple[str, tuple[str, ...], int | None, str]]:
    """``(hf name, our path, layer index or None, kind)`` in HF file order."""
    path, name, kind = EMBED_TENSOR
    yield name, path, None, kind
    for i in range(cfg.num_hidden_layers):
        for path, name, kind in LAYER_TENSORS:
            yield name.format(i=i), LAYERS_PATH + path, i, kind
    for path, name, kind in (NORM_TENSOR, HEAD_TENSOR):
        yield name, path, None, kind


def hf_shape(cfg: LlamaConfig, kind: str) -> tuple[int, ...]:
    """The HF (``[out, in]``) shape of a tensor of layout ``kind``."""
    d, dh, f = cfg.hidden_size, cfg.head_size, cfg.intermediate_size
    return {
        "heads_in": (cfg.num_attention_heads * dh, d),
        "kv_heads_in": (cfg.num_key_value_heads * dh, d),
        "heads_out": (d, cfg.num_attention_heads * dh),
        "mlp_in": (f, d),
        "mlp_out": (d, f),
        "vector": (d,),
        "embedding": (cfg.vocab_size, d),
        "lm_head": (cfg.vocab_size, d),
    }[kind]


def expected_hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a ``LlamaForCausalLM`` of this config has, with its shape."""
    return {name: hf_shape(cfg, kind) for name, _, _, kind in hf_tensor_specs(cfg)}


def check_tensor_names(
    found: Mapping[str, tuple[int, ...]], cfg: LlamaConfig, where: str = "checkpoint"
) -> None:
    """One-line error naming the first missing, unexpected or mis-shaped tensor."""
    expected = expected_hf_shapes(cfg)
    for name in expected:
        if name not in found:
            raise ValueError(f"{where}: tensor {name!r} is missing")
    for name, shape in found.items():
        if name not in expected and not DERIVED_TENSOR.fullmatch(name):
            raise ValueError(f"{where}: unexpected tensor {name!r} (not in LlamaForCausalLM)")
        if name in expected and tuple(shape) != expected[name]:
            raise ValueError(
                f"{where}: tensor {name!r} has shape {tuple(shape)}, "
                f"config.json implies {expected[name]}"
            )


def to_jax_layout(w: np.ndarray, kind: str, cfg: LlamaConfig) -> np.ndarray:
    """One HF tensor in our layout (vocab rows padded with zeros)."""
    d, dh = cfg.hidden_size, cfg.head_size
    if kind in ("heads_in", "kv_heads_in"):
        return w.T.reshape(d, -1, dh)
    if kind == "heads_out":
        return w.T.reshape(-1, dh, d)
    if kind in ("mlp_in", "mlp_out"):
        return w.T
    if kind == "vector":
        return w
    padded = np.pad(w, ((0, cfg.padded_vocab_size - w.shape[0]), (0, 0)))
    return padded if kind == "embedding" else padded.T


def to_hf_layout(x: np.ndarray, kind: str, cfg: LlamaConfig) -> np.ndarray:
    """Inverse of :func:`to_jax_layout` (vocab padding dropped), C-contiguous."""
    d, v = cfg.hidden_size, cfg.vocab_size
    if kind in ("heads_in", "kv_heads_in"):
        w = x.reshape(d, -1).T
    elif kind == "heads_out":
        w = x.reshape(-1, d).T
    elif kind in ("mlp_in", "mlp_out"):
        w = x.T
    elif kind == "vector":
        w = x
    elif kind == "embedding":
        w = x[:v]
    else:
        w = x[:, :v].T
    return np.ascontiguousarray(w)


def append_mean_rows(w: np.ndarray, n: int) -> np.ndarray:
    """``w [V, D]`` with ``n`` rows equal to the mean row appended.

    New tokens start at the average embedding / output direction, so their
    logits begin near the typical token's instead of at a random extreme.
    """
    mean = w.astype(np.float64).mean(axis=0, keepdims=True).astype(w.dtype)
    return np.concatenate([w, np.repeat(mean, n, axis=0)], axis=0)


def param_shapes(cfg: LlamaConfig) -> Any:
    """The param tree's shapes/dtypes (``model.abstract_params`` unboxed)."""
    return nn.meta.unbox(abstract_params(Llama(cfg)))


def get_path(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    """The subtree (or leaf) of ``tree`` at ``path``."""
    for key in path:
        tree = tree[key]
    return tree


def key_path(path: Sequence[Any]) -> tuple[str, ...]:
    """A ``jax.tree_util`` key path as our tuple of names."""
    return tuple(str(k.key) for k in path)
