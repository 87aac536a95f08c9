"""Hugging Face directory <-> orbax checkpoint: the two conversions ``python -m
oasst_jax.convert`` runs.

Import (:func:`hf_to_orbax`) reads tensors one at a time into stacked ``[layers,
...]`` fp32 arrays memory-mapped from a temporary folder beside the output, which
orbax then writes from; export (:func:`orbax_to_hf`) reads one layer's slice of a leaf
at a time and holds one shard.  Neither needs RAM for the whole fp32 model (276 GB for
Llama-2-70B).  The source dtype (read from the tensors) is kept in the checkpoint's
``hf_config`` item and restored on export, so HF -> orbax -> HF gives the same
tensors bit for bit (fp32 / bf16 / fp16 sources are exact in the fp32 checkpoint).

Export builds the output directory under a hidden name beside ``out`` and renames it
into place when complete, so a failed export leaves an existing ``out`` as it was.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from oasst_jax import atomic_files, checkpoint
from oasst_jax.hf.config import CONFIG_FILE, hf_dtype, llama_to_hf_config, write_json
from oasst_jax.hf.layout import (
    LAYERS_PATH,
    expected_hf_shapes,
    hf_tensor_specs,
    key_path,
    param_shapes,
    to_hf_layout,
)
from oasst_jax.hf.load import load_hf
from oasst_jax.hf.safetensors_io import INDEX_FILE, SINGLE_FILE, parse_size, write_safetensors
from oasst_jax.hf.tokenizer import TOKENIZER_FILES, write_hf_tokenizer
from oasst_jax.model import LlamaConfig
from oasst_jax.tokenizer import tokenizer_for_vocab

HF_ITEM = "hf_config"  # orbax item holding the source config.json
# Names an export writes; an existing --out holding anything else is not replaced.
EXPORT_FILE = re.compile(
    "|".join(
        [re.escape(n) for n in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE, *TOKENIZER_FILES)]
        + [r"model-\d{5}-of-\d{5}\.safetensors"]
    )
)
MIN_LAYER_CHUNKED_BYTES = 64 << 20  # smaller stacked leaves are read whole cheaply


# ----------------------------------------------------------------------------- import


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


def hf_to_orbax(
    hf_dir: str, out: str, *, add_chatml_tokens: bool = False, megatron_new_tokens: bool = False
) -> LlamaConfig:
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
            hf_dir,
            add_chatml_tokens=add_chatml_tokens,
            megatron_new_tokens=megatron_new_tokens,
            allocate=_memmap_allocator(tmp),
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
        stacked = key_path(path)[: len(LAYERS_PATH)] == LAYERS_PATH
        if not stacked or leaf.nbytes < MIN_LAYER_CHUNKED_BYTES:
            return None
        return ocp.SaveArgs(chunk_byte_size=leaf.nbytes // leaf.shape[0], shard_axes=(0,))

    return jax.tree_util.tree_map_with_path(args, params)


# ----------------------------------------------------------------------------- export


def hf_tensors(
    reader: Any, cfg: LlamaConfig, dtype: str
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
        lambda p, a: jax.ShapeDtypeStruct(reader.shape(key_path(p)), a.dtype), expected
    )
    checkpoint.check_shapes(expected, found, f"checkpoint {ckpt}")
    return reader, cfg, checkpoint.load_json_item(ckpt, HF_ITEM)


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
    (``oasst_jax.hf.tokenizer``).

    The directory is built beside ``out`` under a hidden name and renamed into
    place when complete (``atomic_files.atomic_dir``), so a failure leaves ``out`` as
    it was.  An existing ``out`` is replaced whole, and only when it holds
    nothing but files an export writes (a previous export); re-exporting in
    place needs disk for both copies until the swap.  Without ``tokenizer`` the
    tokenizer files of the export being replaced are kept (:func:`write_tokenizer_files`).
    """
    reader, cfg, base = open_orbax(ckpt)
    return write_hf_dir(
        reader, cfg, base, out, max_shard_size=max_shard_size, dtype=dtype, tokenizer=tokenizer
    )


def write_hf_dir(
    reader: Any,
    cfg: LlamaConfig,
    base: dict[str, Any] | None,
    out: str,
    *,
    max_shard_size: str = "5GB",
    dtype: str | None = None,
    tokenizer: str | None = None,
) -> list[str]:
    """:func:`orbax_to_hf` from any ``reader`` with ``ParamReader.read(path, layer)`` (the
    LoRA merge reads base + adapters through one), one layer's tensor at a time."""
    dtype = dtype or (hf_dtype(base) if base else "bfloat16")
    max_bytes = parse_size(max_shard_size)
    hf_config = llama_to_hf_config(cfg, dtype, base)
    tok = tokenizer_for_vocab(tokenizer, cfg.vocab_size) if tokenizer else None
    check_replaceable(out)
    with atomic_files.atomic_dir(out) as tmp:
        write_tokenizer_files(tok, out, tmp, cfg.max_position_embeddings)
        written = write_safetensors(tmp, hf_tensors(reader, cfg, dtype), dtype, max_bytes)
        write_json(os.path.join(tmp, CONFIG_FILE), hf_config)
    return written


def write_tokenizer_files(tok: Any, out: str, tmp: str, max_length: int) -> list[str]:
    """The tokenizer files of an export being built in ``tmp``: written from ``tok``, or
    without one (no ``--tokenizer``) copied from the export at ``out`` being replaced, so
    re-exporting the weights does not delete the tokenizer a previous export wrote.
    Returns the names kept that way."""
    if tok is not None:
        write_hf_tokenizer(tok, tmp, max_length)
        return []
    kept = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(out, n))]
    for name in kept:
        shutil.copyfile(os.path.join(out, name), os.path.join(tmp, name))
    return kept


def check_replaceable(out: str, written: re.Pattern = EXPORT_FILE, what: str = "an export") -> None:
    """One-line error unless ``out`` is new, or a directory holding only files that ``what``
    writes (names matching ``written``): an existing export is replaced whole."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise ValueError(f"{out} exists and is not a directory; choose a new --out")
    foreign = sorted(n for n in os.listdir(out) if not written.fullmatch(n))
    if foreign:
        raise ValueError(
            f"{out} holds {foreign[0]!r}, which {what} does not write; an existing "
            "export is replaced whole, so choose a new --out or move it away"
        )
