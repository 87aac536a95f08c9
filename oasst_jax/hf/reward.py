"""Export a reward model: our Llama parameters plus a score head as a Hugging Face
``LlamaForSequenceClassification`` directory (``num_labels = 1``, ``pad_token_id`` set).

The score head is ``params["score"]["kernel"]``, ``[hidden, 1]``: the reward of a sequence
is its final normed hidden state at the last token times that kernel, which is what
``LlamaForSequenceClassification`` computes at the last token that is not ``pad_token_id``
(so the pad id must not end a real sequence; chatml sequences end with ``\\n``).

The tensors are :mod:`oasst_jax.hf.convert`'s export (``hf_tensors`` over a reader of the
in-memory tree, same names and layouts) without ``lm_head.weight``, plus ``score.weight``
(``[1, hidden]``); the config is :func:`~oasst_jax.hf.config.llama_to_hf_config` with the
classification fields.  The directory is built beside ``out`` and renamed into place when
complete, and an existing ``out`` is replaced only when it holds nothing but export files
(``convert.check_replaceable``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from oasst_jax import atomic_files, checkpoint, lora
from oasst_jax.hf.config import CONFIG_FILE, hf_dtype, is_hf_dir, llama_to_hf_config, write_json
from oasst_jax.hf.convert import check_replaceable, hf_tensors, open_orbax, write_tokenizer_files
from oasst_jax.hf.layout import HEAD_TENSOR, get_path
from oasst_jax.hf.peft import MergedReader, check_merge_base
from oasst_jax.hf.safetensors_io import parse_size, write_safetensors
from oasst_jax.model import LlamaConfig
from oasst_jax.tokenizer import tokenizer_for_vocab

SCORE_PATH = ("score", "kernel")
SCORE_TENSOR = "score.weight"


class TreeReader:
    """``convert.hf_tensors``'s reader interface (``read(path, layer)``) over a parameter
    tree in memory (numpy or jax arrays)."""

    def __init__(self, params: Mapping[str, Any]):
        self.params = params

    def read(self, path: tuple[str, ...], index: int | None = None) -> np.ndarray:
        leaf = get_path(self.params, path)
        return np.asarray(leaf if index is None else leaf[index])


def reward_config(
    cfg: LlamaConfig, dtype: str, pad_token_id: int, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``config.json`` of the exported reward model: one label, ``pad_token_id`` set."""
    return {
        **llama_to_hf_config(cfg, dtype, base),
        "architectures": ["LlamaForSequenceClassification"],
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "pad_token_id": pad_token_id,
    }


def export_reward_model(
    params: Mapping[str, Any],
    cfg: LlamaConfig,
    out: str,
    *,
    pad_token_id: int,
    dtype: str = "bfloat16",
    tokenizer: str | None = None,
    max_shard_size: str = "5GB",
    base: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``out`` (module doc); returns the weight files written.  ``params`` is the
    model's tree with ``score/kernel`` ``[hidden, 1]``; ``tokenizer`` (a SentencePiece
    model) adds the tokenizer files; ``base`` an imported config.json's extra keys."""
    return write_reward_dir(TreeReader(params), cfg, out, pad_token_id=pad_token_id,
                            dtype=dtype, tokenizer=tokenizer, max_shard_size=max_shard_size,
                            base=base)  # fmt: skip


def reward_to_hf(
    ckpt: str,
    out: str,
    *,
    pad_token_id: int = 0,
    dtype: str | None = None,
    tokenizer: str | None = None,
    max_shard_size: str = "5GB",
) -> list[str]:
    """A reward-model run's newest checkpoint (``objective="rm"``; a LoRA run's merged
    into its recorded base, :func:`_lora_reader`) as a HF
    ``LlamaForSequenceClassification``, read one layer at a time (``convert rm-to-hf``)."""
    cfg = checkpoint.load_model_config(ckpt)
    if not cfg.score_head:
        raise ValueError(
            f"{ckpt} holds no score head (model.score_head=False): not a reward-model run's "
            "checkpoint (objective='rm'); export a language model with orbax-to-hf"
        )
    reader, cfg, base = _lora_reader(ckpt, cfg) if cfg.lora_rank else open_orbax(ckpt)
    return write_reward_dir(reader, cfg, out, pad_token_id=pad_token_id,
                            dtype=dtype or (hf_dtype(base) if base else "bfloat16"),
                            tokenizer=tokenizer, max_shard_size=max_shard_size,
                            base=base)  # fmt: skip


class _ScoredReader:
    """A reader of the trunk (``read(path, layer)``) that serves the score head from a
    LoRA run's trained leaves."""

    def __init__(self, trunk: Any, score: np.ndarray):
        self.trunk, self.score = trunk, score

    def read(self, path: tuple[str, ...], index: int | None = None) -> np.ndarray:
        return self.score if path == SCORE_PATH else self.trunk.read(path, index)


def _lora_reader(ckpt: str, cfg: LlamaConfig) -> tuple[Any, LlamaConfig, dict | None]:
    """``(reader, plain config, base's hf config)`` of a LoRA reward model: the base its
    run recorded (``load=``, an orbax checkpoint) with the adapters merged into each target
    kernel as it is read (``W + (alpha / r) * A @ B``, one layer at a time), and the score
    head it trained.  A run without a recorded orbax base has nothing to merge into, and
    a base rewritten since the run (another fingerprint) is refused."""
    meta = checkpoint.load_json_item(ckpt, "meta") or {}
    path = (meta.get(lora.BASE_META) or {}).get("path")
    if not path:
        raise ValueError(
            f"{ckpt}: a LoRA reward model trained on a random base (no load=): there are no "
            "base weights to merge its adapters into"
        )
    if is_hf_dir(path):
        raise ValueError(
            f"{ckpt} was trained on the Hugging Face directory {path}; import it "
            "(python -m oasst_jax.convert hf-to-orbax) and merge into that checkpoint"
        )
    trained, cfg = lora.load_adapters(ckpt)
    reader, base_cfg, hf = open_orbax(path)
    checkpoint.check_same_shape(base_cfg, cfg, f"LoRA base {path}")
    check_merge_base(ckpt, path, reader, cfg, "restore that base at its path to export")
    merged = MergedReader(reader, trained, cfg)
    return _ScoredReader(merged, trained["score"]["kernel"]), lora.base_model_config(cfg), hf


def write_reward_dir(
    reader: Any,
    cfg: LlamaConfig,
    out: str,
    *,
    pad_token_id: int,
    dtype: str,
    tokenizer: str | None,
    max_shard_size: str,
    base: Mapping[str, Any] | None,
) -> list[str]:
    """:func:`export_reward_model` from any ``reader`` with ``read(path, layer)`` (an
    in-memory tree or a checkpoint's :class:`~oasst_jax.checkpoint.ParamReader`)."""
    try:
        kernel = np.asarray(reader.read(SCORE_PATH))
    except (KeyError, TypeError):
        raise ValueError("params has no score head ('score' / 'kernel', [hidden, 1])") from None
    if kernel.shape != (cfg.hidden_size, 1):
        raise ValueError(
            f"score kernel has shape {kernel.shape}, expected ({cfg.hidden_size}, 1) "
            "(hidden_size, num_labels=1)"
        )
    tensors = [t for t in hf_tensors(reader, cfg, dtype) if t[0] != HEAD_TENSOR[1]]
    score = np.ascontiguousarray(kernel.T.astype(jnp.dtype(dtype)))
    tensors.append((SCORE_TENSOR, score.shape, lambda: score))
    tok = tokenizer_for_vocab(tokenizer, cfg.vocab_size) if tokenizer else None
    check_replaceable(out)
    with atomic_files.atomic_dir(out) as tmp:
        write_tokenizer_files(tok, out, tmp, cfg.max_position_embeddings)
        written = write_safetensors(tmp, tensors, dtype, parse_size(max_shard_size))
        write_json(os.path.join(tmp, CONFIG_FILE), reward_config(cfg, dtype, pad_token_id, base))
    return written
