"""Hugging Face ``LlamaForCausalLM`` <-> orbax weights, without torch and without pickle.

    python -m oasst_jax.convert hf-to-orbax --hf-dir DIR --out CKPT [--add-chatml-tokens]
    python -m oasst_jax.convert orbax-to-hf --ckpt CKPT --out DIR [--max-shard-size 5GB]
        [--tokenizer tokenizer.model]

Import reads ``config.json`` and ``model.safetensors`` or the shards listed in
``model.safetensors.index.json``; ``.bin``/``.pt`` files are refused because
loading them means unpickling.  Tensors are read one at a time and written
into stacked ``[layers, ...]`` fp32 arrays memory-mapped from a temporary
folder beside the output, which orbax then writes from; export reads one
layer's slice of a leaf at a time and holds one shard.  Neither needs RAM for
the whole fp32 model (276 GB for Llama-2-70B).

Layouts: HF stores a linear layer as ``[out, in]``; ours are ``[in, out]`` with
the head axes split out (``q [D, H, Dh]``, ``o [H, Dh, D]``).  Both use RoPE's
rotate-half layout, so no row permutation is needed.  The vocab axis is padded
to ``vocab_pad_multiple`` on import and cut back on export; the source dtype
(read from the tensors) is kept in the checkpoint's ``hf_config`` item and
restored on export, so HF -> orbax -> HF gives the same tensors bit for bit
(fp32 / bf16 / fp16 sources are exact in the fp32 checkpoint).

Failures: a damaged input (a config.json field missing or mistyped, a
truncated safetensors file, an index entry naming a file outside the model
directory) is one ``ValueError`` line naming the file and the field or tensor,
and the CLI exits 1 with it.  Export builds the output directory under a hidden
name beside ``--out`` and renames it into place when complete, so a failed
export leaves an existing ``--out`` as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from oasst_jax import checkpoint, files
from oasst_jax.hf_tokenizer import TOKENIZER_FILES, write_hf_tokenizer
from oasst_jax.model import Llama, LlamaConfig, abstract_params
from oasst_jax.tokenizer import tokenizer_for_vocab

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Names an export writes; an existing --out holding anything else is not replaced.
EXPORT_FILE = re.compile(
    "|".join(
        [re.escape(n) for n in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE, *TOKENIZER_FILES)]
        + [r"model-\d{5}-of-\d{5}\.safetensors"]
    )
)
HF_ITEM = "hf_config"  # orbax item holding the source config.json
DTYPES = ("float32", "bfloat16", "float16")
# config.json fields with no default: a config without one is refused by name.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
CHATML_TOKENS = 2  # <|im_start|>, <|im_end|>
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
MIN_LAYER_CHUNKED_BYTES = 64 << 20  # smaller stacked leaves are read whole cheaply


# ----------------------------------------------------------------------------- config


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


# ----------------------------------------------------------------------------- layouts


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


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# ----------------------------------------------------------------------------- safetensors io


class SafetensorsReader:
    """Lazy tensor access over ``model.safetensors`` or an index of shards.

    ``safetensors.numpy`` cannot hand out bf16 tensors (numpy has no bf16),
    so tensors are read with the ``flax`` framework onto the host CPU and
    viewed as numpy (ml_dtypes' bfloat16); nothing is unpickled.
    """

    def __init__(self, hf_dir: str):
        self.files = _tensor_files(hf_dir)
        self._handles: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> np.ndarray:
        path = self.files[name]
        with _safetensors_errors(path, name):
            if path not in self._handles:
                self._handles[path] = safe_open(path, framework="flax")
            with jax.default_device(jax.devices("cpu")[0]):
                return np.asarray(self._handles[path].get_tensor(name))

    def shape(self, name: str) -> tuple[int, ...]:
        path = self.files[name]
        with _safetensors_errors(path, name), safe_open(path, framework="numpy") as f:
            return tuple(f.get_slice(name).get_shape())


@contextlib.contextmanager
def _safetensors_errors(path: str, name: str | None = None) -> Iterator[None]:
    """A damaged or missing safetensors file as one ``ValueError`` naming it (and the tensor)."""
    try:
        yield
    except SafetensorError as e:
        what = f"{path} (tensor {name!r})" if name else path
        raise ValueError(f"{what}: unreadable safetensors, truncated or damaged ({e})") from None
    except FileNotFoundError:
        what = f" (it holds tensor {name!r})" if name else ""
        raise FileNotFoundError(f"{path}: no such file{what}") from None


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _shard_path(hf_dir: str, index: str, name: Any, file: Any) -> str:
    """``hf_dir/file`` for one weight_map entry; the file must be a plain name in
    ``hf_dir`` (an absolute or ``../`` entry would read outside the model directory)."""
    if not isinstance(name, str) or not isinstance(file, str):
        raise ValueError(
            f"{index}: weight_map maps {name!r} to {file!r}; expected a tensor name and a file name"
        )
    if file in ("", ".", "..") or os.path.basename(file) != file or "\\" in file:
        raise ValueError(
            f"{index}: weight_map entry {name!r} points at {file!r}, not a file in the model "
            "directory; refusing to read outside it"
        )
    return os.path.join(hf_dir, file)


def _tensor_files(hf_dir: str) -> dict[str, str]:
    """Tensor name -> file, from the index when there is one."""
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index):
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        return {name: _shard_path(hf_dir, index, name, f) for name, f in weight_map.items()}
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.exists(single):
        with _safetensors_errors(single), safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    pickled = sorted(n for n in os.listdir(hf_dir) if n.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise ValueError(
            f"{hf_dir}: only pickle checkpoints ({pickled[0]}) found; loading them can run "
            "arbitrary code, so convert them to safetensors first (save_pretrained(..., "
            "safe_serialization=True))"
        )
    raise FileNotFoundError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def parse_size(text: str) -> int:
    """Bytes in ``'5GB'``, ``'500MB'``, ``'64KiB'`` or a plain integer (HF's units: GB = 1e9)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 1048576")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def plan_shards(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy split of tensors (in order) into files of at most ``max_bytes``.

    A tensor larger than the limit gets a file of its own, as transformers does.
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_safetensors(
    out_dir: str,
    tensors: Sequence[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]],
    dtype: str,
    max_shard_bytes: int,
) -> list[str]:
    """Write ``(name, shape, make)`` tensors; only one shard is in memory at a time.

    One file is ``model.safetensors``; several are ``model-0000k-of-0000n``
    plus ``model.safetensors.index.json``, the layout ``from_pretrained`` reads.
    """
    itemsize = jnp.dtype(dtype).itemsize
    sizes = [(name, int(np.prod(shape)) * itemsize) for name, shape, _ in tensors]
    shards = plan_shards(sizes, max_shard_bytes)
    makers = {name: make for name, _, make in tensors}
    file_names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    for file, names in zip(file_names, shards, strict=True):
        save_file(
            {name: makers[name]() for name in names},
            os.path.join(out_dir, file),
            metadata={"format": "pt"},
        )
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(n for _, n in sizes)},
            "weight_map": {
                name: file for file, names in zip(file_names, shards, strict=True) for name in names
            },
        }
        _write_json(os.path.join(out_dir, INDEX_FILE), index)
    return file_names


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ----------------------------------------------------------------------------- conversion


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


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, np.float32)


def _memmap_allocator(directory: str) -> Callable[[tuple[int, ...]], np.ndarray]:
    """Allocate zero-filled fp32 leaves as ``.npy`` memmaps under ``directory``.

    The files start sparse (all zeros, so vocab padding needs no writes) and
    the kernel pages them out as they fill, so the fp32 tree lives on disk:
    import then needs RAM for a few tensors rather than the whole model.
    """
    count = itertools.count()

    def allocate(shape: tuple[int, ...]) -> np.ndarray:
        path = os.path.join(directory, f"leaf{next(count)}.npy")
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)

    return allocate


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{hf_dir}: no {CONFIG_FILE}")
    hf = _read_json(path)
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: not a JSON object")
    return hf


def load_hf(
    hf_dir: str,
    *,
    add_chatml_tokens: bool = False,
    allocate: Callable[[tuple[int, ...]], np.ndarray] = _zeros,
    **overrides: Any,
) -> tuple[Any, LlamaConfig, dict[str, Any]]:
    """``(fp32 params, LlamaConfig, hf config)`` from a Hugging Face directory.

    With ``add_chatml_tokens`` the vocabulary grows by 2 rows initialised to
    the mean row (embedding and LM head); the returned hf config records the
    new size and the source tensors' dtype (what export writes back).
    ``allocate`` makes each zero-filled fp32 leaf; :func:`hf_to_orbax` passes
    one that returns file-backed memmaps so the tree never sits in RAM.
    """
    hf = read_hf_config(hf_dir)
    src_cfg = hf_config_to_llama(hf, where=os.path.join(hf_dir, CONFIG_FILE), **overrides)
    reader = SafetensorsReader(hf_dir)
    check_tensor_names({name: reader.shape(name) for name in reader.names}, src_cfg, hf_dir)
    extra = CHATML_TOKENS if add_chatml_tokens else 0
    cfg = dataclasses.replace(src_cfg, vocab_size=src_cfg.vocab_size + extra)
    params = jax.tree_util.tree_map(lambda a: allocate(tuple(a.shape)), param_shapes(cfg))
    dtype = None
    for name, path, layer, kind in hf_tensor_specs(src_cfg):
        w = reader.get(name)
        dtype = dtype or w.dtype.name
        if kind in ("embedding", "lm_head") and extra:
            w = append_mean_rows(w, extra)
        target = _get(params, path)
        target[... if layer is None else layer] = to_jax_layout(w, kind, cfg)
    hf = {**hf, "vocab_size": cfg.vocab_size, "torch_dtype": dtype, "dtype": dtype}
    return params, cfg, hf


def hf_to_orbax(hf_dir: str, out: str, *, add_chatml_tokens: bool = False) -> LlamaConfig:
    """Convert and write a weights-only checkpoint (step 0) with the hf config beside it.

    The fp32 tree is assembled in memmaps in a temporary folder beside
    ``out`` (same disk, removed afterwards, also on error) and orbax writes
    the checkpoint from them, so peak RAM stays far below the model's size.
    """
    if checkpoint.latest_step(out) is not None:
        raise ValueError(f"{out} already holds a checkpoint; choose a new --out")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hf-to-orbax-", dir=parent) as tmp:
        params, cfg, hf = load_hf(
            hf_dir, add_chatml_tokens=add_chatml_tokens, allocate=_memmap_allocator(tmp)
        )
        checkpoint.save_weights(
            out, params, cfg, extra_json={HF_ITEM: hf}, save_args=layer_chunked_save_args(params)
        )
    return cfg


def layer_chunked_save_args(params: Any) -> Any:
    """``SaveArgs`` that store each layer of a large stacked leaf as its own chunk.

    Export reads one layer at a time; with orbax's default chunking (up to
    2 GiB, split along the largest axes) every such read would decompress
    chunks spanning all layers.  Small leaves keep one chunk.
    """

    def args(path: Sequence[Any], leaf: np.ndarray) -> ocp.SaveArgs | None:
        stacked = _key_path(path)[: len(LAYERS_PATH)] == LAYERS_PATH
        if not stacked or leaf.nbytes < MIN_LAYER_CHUNKED_BYTES:
            return None
        return ocp.SaveArgs(chunk_byte_size=leaf.nbytes // leaf.shape[0], shard_axes=(0,))

    return jax.tree_util.tree_map_with_path(args, params)


def hf_tensors(
    reader: checkpoint.ParamReader, cfg: LlamaConfig, dtype: str
) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """``(name, shape, make)`` for every HF tensor; ``make`` reads and converts on demand.

    A layer's tensor reads only that layer's slice of the stacked leaf.
    """
    np_dtype = jnp.dtype(dtype)
    shapes = expected_hf_shapes(cfg)

    def maker(path: tuple[str, ...], layer: int | None, kind: str) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            return to_hf_layout(reader.read(path, layer), kind, cfg).astype(np_dtype)

        return make

    return [
        (name, shapes[name], maker(path, layer, kind))
        for name, path, layer, kind in hf_tensor_specs(cfg)
    ]


def open_orbax(ckpt: str) -> tuple[checkpoint.ParamReader, LlamaConfig, dict[str, Any] | None]:
    """``(lazy param reader, LlamaConfig, stored hf config or None)`` for a checkpoint.

    Every saved leaf's shape is checked against the config up front, so a
    mismatch is one clear error before any file is written.
    """
    cfg = checkpoint.load_model_config(ckpt)
    reader = checkpoint.ParamReader(ckpt)
    expected = param_shapes(cfg)
    found = jax.tree_util.tree_map_with_path(
        lambda p, a: jax.ShapeDtypeStruct(reader.shape(_key_path(p)), a.dtype), expected
    )
    checkpoint.check_shapes(expected, found, f"checkpoint {ckpt}")
    return reader, cfg, checkpoint.load_json_item(ckpt, HF_ITEM)


def _key_path(path: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path)


def orbax_to_hf(
    ckpt: str,
    out: str,
    *,
    max_shard_size: str = "5GB",
    dtype: str | None = None,
    tokenizer: str | None = None,
) -> list[str]:
    """Write config.json + safetensors (+ tokenizer files); returns the weight files written.

    The dtype is ``dtype``, else the imported source's, else bfloat16 (a
    training run saved without the hf item).  ``tokenizer`` (a SentencePiece
    model) adds the tokenizer files with the chatml chat template
    (``oasst_jax.hf_tokenizer``).

    The directory is built beside ``out`` under a hidden name and renamed into
    place when complete (``files.atomic_dir``), so a failure leaves ``out`` as
    it was.  An existing ``out`` is replaced whole, and only when it holds
    nothing but files an export writes (a previous export); re-exporting in
    place needs disk for both copies until the swap.
    """
    reader, cfg, base = open_orbax(ckpt)
    dtype = dtype or (hf_dtype(base) if base else "bfloat16")
    max_bytes = parse_size(max_shard_size)
    hf_config = llama_to_hf_config(cfg, dtype, base)
    tok = tokenizer_for_vocab(tokenizer, cfg.vocab_size) if tokenizer else None
    check_replaceable(out)
    with files.atomic_dir(out) as tmp:
        if tok is not None:
            write_hf_tokenizer(tok, tmp, cfg.max_position_embeddings)
        written = write_safetensors(tmp, hf_tensors(reader, cfg, dtype), dtype, max_bytes)
        _write_json(os.path.join(tmp, CONFIG_FILE), hf_config)
    return written


def check_replaceable(out: str) -> None:
    """One-line error unless ``out`` is new, or a directory holding only export files."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise ValueError(f"{out} exists and is not a directory; choose a new --out")
    foreign = sorted(n for n in os.listdir(out) if not EXPORT_FILE.fullmatch(n))
    if foreign:
        raise ValueError(
            f"{out} holds {foreign[0]!r}, which an export does not write; an existing "
            "export is replaced whole, so choose a new --out or move it away"
        )


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m oasst_jax.convert", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("hf-to-orbax", help="Hugging Face safetensors -> orbax checkpoint")
    imp.add_argument("--hf-dir", required=True, help="directory with config.json + safetensors")
    imp.add_argument("--out", required=True, help="new orbax checkpoint directory")
    imp.add_argument(
        "--add-chatml-tokens",
        action="store_true",
        help="append <|im_start|>, <|im_end|> rows (mean-initialised) to embedding and LM head",
    )
    exp = sub.add_parser("orbax-to-hf", help="orbax checkpoint -> Hugging Face safetensors")
    exp.add_argument("--ckpt", required=True, help="orbax checkpoint directory (latest step)")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (5GB)")
    exp.add_argument("--dtype", choices=DTYPES, help="default: the imported model's dtype")
    exp.add_argument(
        "--tokenizer", help="SentencePiece model: also write tokenizer files + chat template"
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Bad input (a damaged HF directory or checkpoint, an occupied --out) ends with one
    line on stderr and exit status 1, never a traceback; nothing at --out is changed."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "hf-to-orbax":
            cfg = hf_to_orbax(args.hf_dir, args.out, add_chatml_tokens=args.add_chatml_tokens)
            print(
                f"wrote {args.out}: {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size} "
                f"(padded {cfg.padded_vocab_size}), {cfg.num_params():,} params"
            )
        else:
            written = orbax_to_hf(
                args.ckpt,
                args.out,
                max_shard_size=args.max_shard_size,
                dtype=args.dtype,
                tokenizer=args.tokenizer,
            )
            extra = (
                " + tokenizer files" if args.tokenizer else " (no --tokenizer: no tokenizer files)"
            )
            print(f"wrote {args.out}: {CONFIG_FILE} + {len(written)} safetensors file(s){extra}")
    except (ValueError, OSError) as e:
        if os.environ.get("OASST_TRACEBACK"):  # developers: see where it came from
            raise
        sys.exit(f"error: {e} (OASST_TRACEBACK=1 shows the traceback)")


if __name__ == "__main__":
    main()
