"""Hugging Face ``config.json`` <-> :class:`~oasst_jax.model.LlamaConfig`.

Reads both transformers layouts (v4: top-level ``rope_theta`` / ``rope_scaling``,
``torch_dtype``; v5: ``rope_parameters``, ``dtype``) and writes one both read the same
way.  Architecture variants Llama-2 does not have (biases, tied head, other activations
or RoPE types) are refused rather than silently mis-loaded; a missing or mistyped field
is one ``ValueError`` line naming the file and the field.

:func:`is_hf_dir` is the one test for "this path is a Hugging Face directory" (it holds
a ``config.json``; an orbax checkpoint root does not).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from oasst_jax.model import LlamaConfig

CONFIG_FILE = "config.json"
DTYPES = ("float32", "bfloat16", "float16")
# config.json fields with no default: a config without one is refused by name.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def is_hf_dir(path: str) -> bool:
    """Whether ``path`` is a Hugging Face model directory (has a ``config.json``)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_json(path: str) -> Any:
    """A JSON file; invalid JSON is one ``ValueError`` line naming the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON (the layout ``save_pretrained`` writes)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    """``hf_dir/config.json`` as a dict."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{hf_dir}: no {CONFIG_FILE}")
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: not a JSON object")
    return hf


def _rope_from_hf(hf: Mapping[str, Any], where: str = CONFIG_FILE) -> tuple[float, float]:
    """``(theta, linear factor)`` from either transformers layout.

    v4 writes top-level ``rope_theta`` and ``rope_scaling: {type|rope_type,
    factor}``; v5 writes ``rope_parameters: {rope_theta, rope_type, factor}``.
    When both are present, v5 lets ``rope_scaling`` win; so do we.
    """
    params = _mapping(hf, "rope_parameters", where)
    spec = _mapping(hf, "rope_scaling", where) or params
    theta = _number(params.get("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta", where)
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return theta, 1.0
    if kind == "linear":
        if "factor" not in spec:
            raise ValueError(f"{where}: linear rope scaling without a 'factor'")
        return theta, _number(spec["factor"], "rope factor", where)
    raise ValueError(
        f"{where}: rope type {kind!r} is not supported (only default and linear, as Llama-2)"
    )


def _mapping(hf: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = hf.get(key) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: field {key!r} is {value!r}, not an object")
    return value


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: field {name!r} is {value!r}, not a number")
    return float(value)


def _count(hf: Mapping[str, Any], key: str, where: str) -> int:
    """A required positive integer field, by name when missing or mistyped."""
    if key not in hf:
        raise ValueError(f"{where}: field {key!r} is missing")
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: field {key!r} is {value!r}, not a positive integer")
    return value


def hf_dtype(hf: Mapping[str, Any], where: str = CONFIG_FILE) -> str:
    """The weights' dtype named by the config (v5 ``dtype``, v4 ``torch_dtype``)."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"{where}: dtype {name!r} is not supported; expected one of {DTYPES}")
    return name


def hf_config_to_llama(
    hf: Mapping[str, Any], *, where: str = CONFIG_FILE, **overrides: Any
) -> LlamaConfig:
    """``LlamaConfig`` for a ``LlamaForCausalLM`` config.json (v4 or v5 layout).

    Architecture variants Llama-2 does not have (biases, tied head, other
    activations or RoPE types) are rejected rather than silently mis-loaded;
    a missing or mistyped field is a one-line ``ValueError`` naming ``where``
    (the file) and the field.  ``overrides`` set the non-architecture fields
    (compute dtype, remat ...).
    """
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{where}: model_type {hf['model_type']!r} is not 'llama'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not 'silu'")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if hf.get(flag, False):
            raise ValueError(f"{where}: {flag}=true is not supported (Llama-2 has none)")
    theta, factor = _rope_from_hf(hf, where)
    sizes = {key: _count(hf, key, where) for key in REQUIRED_FIELDS}
    heads = sizes["num_attention_heads"]
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        if hf.get(key) is not None:
            _count(hf, key, where)
    head_dim = hf.get("head_dim") or 0
    derived = sizes["hidden_size"] // heads
    fields = dict(
        **sizes,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=0 if head_dim == derived else head_dim,  # 0 = derived, as configs/model
        max_position_embeddings=hf.get("max_position_embeddings") or 4096,
        rope_theta=theta,
        rope_scaling_factor=factor,
        rms_norm_eps=_number(hf.get("rms_norm_eps", 1e-5), "rms_norm_eps", where),
        attention_dropout=_number(hf.get("attention_dropout", 0.0), "attention_dropout", where),
        initializer_range=_number(hf.get("initializer_range", 0.02), "initializer_range", where),
    )
    try:
        return LlamaConfig(**{**fields, **overrides})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def llama_to_hf_config(
    cfg: LlamaConfig, dtype: str, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A config.json both transformers v4 and v5 read the same way.

    ``base`` (the imported config) keeps the keys we do not model (token ids,
    ``use_cache`` ...); every architecture key is rewritten from ``cfg``.  RoPE
    is written in both layouts (top-level ``rope_theta``/``rope_scaling`` for
    v4, ``rope_parameters`` for v5), and the dtype as ``torch_dtype`` and ``dtype``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {DTYPES}")
    if cfg.rope_scaling_factor == 1.0:
        rope_scaling = None
        rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        f = cfg.rope_scaling_factor
        rope_scaling = {"type": "linear", "rope_type": "linear", "factor": f}
        rope_parameters = {"rope_type": "linear", "rope_theta": cfg.rope_theta, "factor": f}
    defaults = {"bos_token_id": 1, "eos_token_id": 2, "pretraining_tp": 1, "use_cache": True}
    return {
        **(defaults if base is None else dict(base)),
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": cfg.attention_dropout,
        "mlp_bias": False,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": False,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
