"""A LoRA run's adapters as a Hugging Face PEFT adapter, or merged into a full HF model.

:func:`lora_to_peft` writes ``adapter_config.json`` + ``adapter_model.safetensors``
that ``peft.PeftModel.from_pretrained(base_hf_model, DIR)`` loads: PEFT's tensor names
(``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``), its
``[out, in]`` layouts (ours are ``A [*in, r]``, ``B [r, *out]``: flattened and
transposed), fp32 as trained.  :func:`lora_merged_to_hf` writes the merged model
``W + (alpha / r) * B A`` through the bounded-memory exporter
(:func:`oasst_jax.hf.convert.write_hf_dir`): one layer of one kernel at a time.
Both build the output beside ``out`` and rename it into place when complete.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from oasst_jax import atomic_files, checkpoint, lora
from oasst_jax.hf.config import is_hf_dir, write_json
from oasst_jax.hf.convert import check_replaceable, open_orbax, write_hf_dir
from oasst_jax.hf.layout import LAYERS_PATH
from oasst_jax.model import LlamaConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
# PEFT's parent module of each target inside a Llama decoder layer.
PEFT_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
ADAPTER_EXPORT = re.compile(f"{re.escape(ADAPTER_CONFIG)}|{re.escape(ADAPTER_FILE)}")


def peft_tensors(adapters: Any, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """PEFT's state dict of the adapters: ``lora_A.weight [r, in]``, ``lora_B.weight
    [out, r]`` per layer and target (``in``/``out`` flattened in HF's order)."""
    layers = adapters[LAYERS_PATH[0]][LAYERS_PATH[1]]
    r = cfg.lora_rank
    out = {}
    for i in range(cfg.num_hidden_layers):
        for name, (module, kernel), _ in lora.adapter_pairs(cfg):
            prefix = f"base_model.model.model.layers.{i}.{PEFT_PARENT[name]}.{name}"
            a = np.asarray(layers[module][f"{kernel}_lora_a"][i], np.float32)
            b = np.asarray(layers[module][f"{kernel}_lora_b"][i], np.float32)
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
    return out


def adapter_config(cfg: LlamaConfig, base_path: str | None) -> dict[str, Any]:
    """``adapter_config.json``: plain LoRA (no rsLoRA/DoRA, no bias, no modules_to_save)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path or None,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": list(cfg.lora_target_names),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
    }


def _recorded_base(ckpt: str) -> str | None:
    meta = checkpoint.load_json_item(ckpt, "meta") or {}
    return (meta.get(lora.BASE_META) or {}).get("path") or None


def _causal_lm_adapters(ckpt: str) -> tuple[dict, LlamaConfig]:
    """:func:`lora.load_adapters` of a language model's LoRA run; a reward model's is
    refused in one line: it trains a score head too, which neither a causal-LM PEFT
    adapter nor a merged causal LM has a place for."""
    adapters, cfg = lora.load_adapters(ckpt)
    if cfg.score_head:
        raise ValueError(
            f"{ckpt} is a LoRA reward model (a score head trained beside the adapters); "
            "export it with `python -m oasst_jax.convert rm-to-hf`, which merges the "
            "adapters into its base"
        )
    return adapters, cfg


def lora_to_peft(ckpt: str, out: str) -> list[str]:
    """Write the newest step's adapters of the LoRA run ``ckpt`` as a PEFT adapter dir."""
    adapters, cfg = _causal_lm_adapters(ckpt)
    check_replaceable(out, ADAPTER_EXPORT, "an adapter export")
    with atomic_files.atomic_dir(out) as tmp:
        save_file(peft_tensors(adapters, cfg), os.path.join(tmp, ADAPTER_FILE))
        write_json(os.path.join(tmp, ADAPTER_CONFIG), adapter_config(cfg, _recorded_base(ckpt)))
    return [ADAPTER_CONFIG, ADAPTER_FILE]


def check_merge_base(ckpt: str, base: str, reader: Any, cfg: LlamaConfig, hint: str) -> None:
    """Refuse to merge the adapters of ``ckpt`` into ``base`` unless it is the base they were
    trained on: :func:`lora.check_base`, the check a resume and ``sample --adapter`` make,
    on the base's fingerprint computed one layer at a time from ``reader``
    (:func:`lora.reader_fingerprint`), before anything is written."""
    meta = checkpoint.load_json_item(ckpt, "meta") or {}
    record = {"path": base, "fingerprint": lora.reader_fingerprint(reader, cfg, cfg.vocab_size)}
    lora.check_base(meta, record, f"adapter {ckpt}", hint)


class MergedReader:
    """``ParamReader``'s interface over a base checkpoint with the adapters added to each
    target kernel as it is read: ``W + (alpha / r) * A @ B``, in fp32, per layer."""

    def __init__(self, base: checkpoint.ParamReader, adapters: Any, cfg: LlamaConfig):
        self.base, self.cfg = base, cfg
        layers = adapters[LAYERS_PATH[0]][LAYERS_PATH[1]]
        self.pairs = {
            (*LAYERS_PATH, module, kernel): (
                layers[module][f"{kernel}_lora_a"],
                layers[module][f"{kernel}_lora_b"],
            )
            for _, (module, kernel), _ in lora.adapter_pairs(cfg)
        }

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        return self.base.shape(path)

    def read(self, path: tuple[str, ...], index: int | None = None) -> np.ndarray:
        w = self.base.read(path, index).astype(np.float32)
        if path not in self.pairs:
            return w
        a, b = self.pairs[path]
        s = self.cfg.lora_scale
        if index is not None:
            return w + lora.delta(a[index], b[index], s)
        return w + np.stack([lora.delta(a[i], b[i], s) for i in range(w.shape[0])])


def lora_merged_to_hf(
    ckpt: str,
    base: str,
    out: str,
    *,
    max_shard_size: str = "5GB",
    dtype: str | None = None,
    tokenizer: str | None = None,
) -> list[str]:
    """Write base (an orbax checkpoint) + the run's adapters as a full HF model directory;
    a base other than the one the adapters were trained on is refused (its fingerprint)."""
    if is_hf_dir(base):
        raise ValueError(
            f"--base {base} is a Hugging Face directory; merge into an orbax checkpoint of it "
            "(python -m oasst_jax.convert hf-to-orbax --hf-dir BASE --out CKPT), the kind "
            "load= trained on"
        )
    adapters, cfg = _causal_lm_adapters(ckpt)
    reader, base_cfg, hf = open_orbax(base)
    checkpoint.check_same_shape(base_cfg, cfg, f"--base {base}")
    check_merge_base(ckpt, base, reader, cfg, "merge into that base (--base)")
    merged = MergedReader(reader, adapters, cfg)
    return write_hf_dir(
        merged,
        lora.base_model_config(base_cfg),
        hf,
        out,
        max_shard_size=max_shard_size,
        dtype=dtype,
        tokenizer=tokenizer,
    )
