"""LoRA and QLoRA: the frozen base, the trainable adapters, and merging them.

Why adapters written in the model rather than qwix's ``LoraProvider``: the provider
intercepts ``jnp.einsum`` and stores the adapter's einsum string on the calling module
with ``setattr``, which linen forbids inside our ``nn.scan``-lifted, ``nn.compact``
layers (``SetAttributeFrozenModuleError`` on the first projection); and the pipeline
schedule applies the layer stack outside the wrapped model.  So the adapters are
parameters of :func:`oasst_jax.model.linear` (``{kernel}_lora_a`` ``[*in, r]``,
``{kernel}_lora_b`` ``[r, *out]`` beside the kernel, logical names from the kernel with
a replicated ``lora_rank`` axis), and qwix only quantizes the frozen base
(:func:`freeze`) and dequantizes it layer by layer inside the scan
(:func:`oasst_jax.model.as_weight`).

A LoRA run's state is ``{step, params, frozen, opt_state}``: ``params`` are only the
adapters, plus a reward model's score head (new, randomly initialised: :func:`split`),
with fp32 masters and AdamW on the run's schedule; ``frozen`` the base in
``model.lora_base_dtype`` (bf16, or int8 / nf4 with fp32 block scales), never
differentiated and never saved: checkpoints hold adapters + optimizer state, and the
base is recorded by path and a content fingerprint (:func:`base_record`) so a resume
on another base is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import linen as nn

from oasst_jax import checkpoint
from oasst_jax.model import LORA_TARGETS, Llama, LlamaConfig, abstract_params

ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
LAYERS_PATH = ("decoder", "layers")
# Block size of the quantized base's scales along each kernel's (last) input axis,
# bitsandbytes' NF4 block size; an axis it does not divide gets one scale.
QUANT_BLOCK = 64
# The items a LoRA checkpoint's ``meta`` records its base under.
BASE_META = "lora_base"
# A reward model's score head (``model.score_head``): trained with the adapters.
SCORE_HEAD = ("score", "kernel")


def _name(key: Any) -> str:
    return str(getattr(key, "key", key))


def is_trained(path: tuple[Any, ...]) -> bool:
    """An adapter, or a reward model's score head: new and randomly initialised, it is
    trained beside the adapters (frozen, the rewards would stay random)."""
    names = tuple(_name(k) for k in path)
    return names[-1].endswith(ADAPTER_SUFFIXES) or names == SCORE_HEAD


def _filter(tree: Mapping[str, Any], keep, prefix: tuple[str, ...] = ()) -> dict:
    out = {}
    for k, v in tree.items():
        path = (*prefix, k)
        if isinstance(v, Mapping):
            sub = _filter(v, keep, path)
            if sub:
                out[k] = sub
        elif keep(path):
            out[k] = v
    return out


def split(params: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(trained, base)``: the same nested dicts, each holding only its own leaves
    (trained: the adapters, and a reward model's score head)."""
    return _filter(params, is_trained), _filter(params, lambda p: not is_trained(p))


def merge(adapters: Mapping[str, Any], base: Mapping[str, Any]) -> dict:
    """The model's parameter tree from its two halves (nothing copied)."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = merge(v, base.get(k, {})) if isinstance(v, Mapping) else v
    return out


def _kernel_inputs(path: tuple[str, ...]) -> int | None:
    """How many input axes the decoder kernel at ``path`` has (None: not a kernel)."""
    if path[: len(LAYERS_PATH)] != LAYERS_PATH or len(path) != len(LAYERS_PATH) + 2:
        return None
    for module, kernel, n_in in LORA_TARGETS.values():
        if path[len(LAYERS_PATH) :] == (module, kernel):
            return n_in
    return None


def quantize_kernel(w: jax.Array, qtype: str, n_in: int) -> qwix.QArray:
    """``[layers, *in, *out]`` kernel -> qwix ``QArray``: symmetric absmax, one fp32 scale
    per :data:`QUANT_BLOCK` values of the last input axis and per output channel."""
    axis = n_in
    block = QUANT_BLOCK if w.shape[axis] % QUANT_BLOCK == 0 else w.shape[axis]
    channelwise = tuple(i for i in range(w.ndim) if i != axis)
    return qwix.quantize(
        w,
        "nf4" if qtype == "nf4" else jnp.int8,
        channelwise_axes=channelwise,
        tiled_axes={axis: block},
        scale_dtype=jnp.float32,
    )


def freeze(base: Mapping[str, Any], cfg: LlamaConfig) -> dict:
    """The frozen base in ``cfg.lora_base_dtype``: decoder kernels quantized for
    ``int8``/``nf4`` (embedding, LM head and norm scales stay bf16, as QLoRA keeps them),
    every leaf bf16 for ``bfloat16``, unchanged for ``float32``.  Jit-able."""
    kind = cfg.lora_base_dtype

    def one(path, w):
        if kind == "float32":
            return w.astype(jnp.float32)
        n_in = _kernel_inputs(tuple(_name(k) for k in path))
        if kind in ("int8", "nf4") and n_in is not None:
            return quantize_kernel(w.astype(jnp.float32), kind, n_in)
        return w.astype(jnp.bfloat16)

    return jax.tree_util.tree_map_with_path(one, dict(base))


def _weighted_sum(x: jax.Array, offset: jax.Array) -> jax.Array:
    """A position-weighted uint32 sum of ``x``'s bf16 bit patterns, positions counted from
    ``offset`` (row-major): exact integer arithmetic (mod 2**32), so the same weights give
    the same sum on any mesh, and a leaf's sum is the sum of its rows' at their offsets."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32) + offset
    stride = 1
    for axis in reversed(range(x.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    return jnp.sum(bits * (index * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _leaf_sums(tree: Any) -> list[jax.Array]:
    """:func:`_weighted_sum` of each whole leaf."""
    return [_weighted_sum(x, jnp.uint32(0)) for x in jax.tree.leaves(tree)]


_row_sum = jax.jit(_weighted_sum)


def _real_vocab(base: Mapping[str, Any], vocab_size: int | None) -> Any:
    """``base`` without the embedding's and LM head's padding rows (past ``vocab_size``):
    they are zeros in a HF import but random in a random init, and no token uses them."""
    if vocab_size is None:
        return base
    out = dict(base)
    if "embedding" in out:
        out["embedding"] = out["embedding"][:vocab_size]
    if "lm_head" in out:
        out["lm_head"] = out["lm_head"][:, :vocab_size]
    return out


def fingerprint(base: Any, vocab_size: int | None = None) -> str:
    """A content fingerprint of base weights (their bf16 values; with ``vocab_size``, the
    vocabulary's real rows only), 16 hex digits: the same for the same weights whatever
    the source format (orbax or HF), dtype or sharding."""
    base = _real_vocab(base, vocab_size)
    leaves = jax.tree_util.tree_leaves_with_path(base)
    sums = jax.device_get(_leaf_sums(base))
    return _digest((path, leaf.shape, s) for (path, leaf), s in zip(leaves, sums, strict=True))


def _digest(leaves: Any) -> str:
    h = hashlib.sha256()
    for path, shape, s in leaves:
        h.update(f"{jax.tree_util.keystr(path)}:{tuple(shape)}:{int(s)};".encode())
    return h.hexdigest()[:16]


def reader_fingerprint(reader: Any, cfg: LlamaConfig, vocab_size: int) -> str:
    """:func:`fingerprint` of the base of the LoRA model ``cfg`` as ``reader`` serves it
    (``ParamReader.read(path, layer)``: a checkpoint on disk), one layer of a stacked
    leaf at a time, so a merge that streams the base checks it in the same bounded
    memory; equal to the fingerprint of the same weights held whole."""
    shapes = split(nn.meta.unbox(abstract_params(Llama(cfg))))[1]
    sums = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        names = tuple(map(_name, path))
        if names[: len(LAYERS_PATH)] == LAYERS_PATH:
            row = int(np.prod(leaf.shape[1:]))
            total = sum(
                int(_row_sum(reader.read(names, i), np.uint32(i * row % 2**32)))
                for i in range(leaf.shape[0])
            )
            sums.append((path, leaf.shape, total % 2**32))
            continue
        x = _real_vocab({names[0]: reader.read(names)}, vocab_size)[names[0]]
        sums.append((path, x.shape, int(_row_sum(x, np.uint32(0)))))
    return _digest(sums)


def base_record(path: str, base: Any, vocab_size: int) -> dict[str, str]:
    """What a LoRA checkpoint records of its base: where it was loaded from (``""``: a
    random init from the run's seed) and its :func:`fingerprint`."""
    return {"path": path, "fingerprint": fingerprint(base, vocab_size)}


RESUME_HINT = "resume with that base as load=, or start a new workdir"


def check_base(
    meta: Mapping[str, Any], current: Mapping[str, str], where: str, hint: str = RESUME_HINT
) -> None:
    """One-line refusal when a checkpoint's recorded base is not the one this run loads
    (``hint``: what to do instead, said after it)."""
    saved = meta.get(BASE_META)
    if saved is None:
        raise checkpoint.CheckpointError(
            f"{where} records no LoRA base (not a LoRA run's checkpoint); start a new workdir"
        )
    if saved.get("fingerprint") != current["fingerprint"]:
        was = saved.get("path") or "a random init"
        raise checkpoint.CheckpointError(
            f"{where} was trained on another base: it records {was}"
            f" (fingerprint {saved.get('fingerprint')}), this run loads "
            f"{current['path'] or 'a random init'} (fingerprint {current['fingerprint']}); "
            f"{hint}"
        )


# ----------------------------------------------------------------------------- merging


def adapter_pairs(cfg: LlamaConfig) -> list[tuple[str, tuple[str, str], int]]:
    """``(PEFT name, (module, kernel), input axes)`` of each target, in PEFT's order."""
    return [(t, LORA_TARGETS[t][:2], LORA_TARGETS[t][2]) for t in cfg.lora_target_names]


def delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """``scale * A @ B`` in the kernel's layout: ``a [*in, r]``, ``b [r, *out]``."""
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    r = a32.shape[-1]
    out = a32.reshape(-1, r) @ b32.reshape(r, -1)
    return (scale * out).reshape(*a32.shape[:-1], *b32.shape[1:])


def merge_weights(base: Mapping[str, Any], adapters: Mapping[str, Any], cfg: LlamaConfig) -> dict:
    """Base params with every target kernel replaced by ``W + (alpha / r) * A @ B`` (per
    layer, in fp32, then the kernel's dtype): a plain model's tree, for sampling."""
    out = jax.tree.map(lambda x: x, dict(base))
    layers = adapters[LAYERS_PATH[0]][LAYERS_PATH[1]]
    target = out[LAYERS_PATH[0]][LAYERS_PATH[1]]
    for _, (module, kernel), _ in adapter_pairs(cfg):
        a, b = layers[module][f"{kernel}_lora_a"], layers[module][f"{kernel}_lora_b"]
        w = np.asarray(jax.device_get(target[module][kernel]))
        d = np.stack([delta(a[i], b[i], cfg.lora_scale) for i in range(w.shape[0])])
        target[module] = {**target[module], kernel: (w.astype(np.float32) + d).astype(w.dtype)}
    return out


def adapter_shapes(cfg: LlamaConfig) -> dict:
    """The trained tree of ``ShapeDtypeStruct`` (what an adapter checkpoint holds: the
    adapters, and a reward model's score head)."""
    return split(nn.meta.unbox(abstract_params(Llama(cfg))))[0]


def load_adapters(ckpt_dir: str, step: int | None = None) -> tuple[dict, LlamaConfig]:
    """``(adapters as numpy, the run's LlamaConfig)`` from a LoRA run's checkpoint root
    (newest step, or ``step``), read leaf by leaf without any device placement."""
    cfg = checkpoint.load_model_config(ckpt_dir, step)
    if not cfg.lora_rank:
        raise ValueError(f"{ckpt_dir}: not a LoRA checkpoint (its model has lora_rank=0)")
    reader = checkpoint.ParamReader(ckpt_dir, step)
    shapes = adapter_shapes(cfg)
    found = jax.tree_util.tree_map_with_path(
        lambda p, a: jax.ShapeDtypeStruct(reader.shape(tuple(map(_name, p))), a.dtype), shapes
    )
    checkpoint.check_shapes(shapes, found, f"checkpoint {ckpt_dir}")
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, _: np.asarray(reader.read(tuple(map(_name, p)))), shapes
    )
    return adapters, cfg


def merged_params(base_params: Mapping[str, Any], adapter_ckpt_dir: str) -> dict:
    """Sampling-ready weights: ``base_params`` (a plain model's tree, e.g. from
    ``weights.load``) with the adapters of ``adapter_ckpt_dir`` merged in.
    The sampler builds its model from :func:`base_model_config` of the same dir."""
    adapters, cfg = load_adapters(adapter_ckpt_dir)
    expected = nn.meta.unbox(abstract_params(Llama(base_model_config(cfg))))
    checkpoint.check_shapes(expected, base_params, f"base for {adapter_ckpt_dir}")
    merged = merge_weights(base_params, adapters, cfg)
    return jax.tree.map(
        lambda m, b: jax.device_put(m, b.sharding) if isinstance(b, jax.Array) else m,
        merged,
        dict(base_params),
    )


def base_model_config(cfg: LlamaConfig) -> LlamaConfig:
    """``cfg`` without its adapters: the model merged weights (or the base) run in."""
    return dataclasses.replace(cfg, lora_rank=0, lora_targets="")
