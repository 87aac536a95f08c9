"""What a training run starts from: the model it trains and the weights it loads.

``load=`` (read through :mod:`oasst_jax.weights`, the one loader) becomes the state's
params, a LoRA run's frozen base (with the record a checkpoint keeps of it), or a DPO
run's reference; ``use_checkpoint_args`` takes the model's shape from the checkpoint at
``load``.  The loop (``oasst_jax/cli/train.py``) asks, this module decides.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from oasst_jax import checkpoint, config, lora, weights
from oasst_jax.hf.config import is_hf_dir
from oasst_jax.model import LlamaConfig
from oasst_jax.train_step import model_params


def model_config(cfg) -> LlamaConfig:
    """The config's model, or with ``use_checkpoint_args`` the shape stored with the orbax
    checkpoint in ``load`` (numerics and attention choices stay the run's own)."""
    model_cfg = config.model_config(cfg)
    if not (cfg.use_checkpoint_args and cfg.load):
        return model_cfg
    path = weights.resolve(cfg.load, f"load={cfg.load}")
    if is_hf_dir(path):
        return model_cfg
    stored = checkpoint.load_model_config(path)
    keep = ("dtype", "remat_policy", "attention_impl", "attention_backend", "attention_dropout")
    keep += tuple(f.name for f in dataclasses.fields(LlamaConfig) if f.name.startswith("lora_"))
    return dataclasses.replace(stored, **{k: getattr(model_cfg, k) for k in keep})


def load_weights(cfg, model_cfg: LlamaConfig, trainer) -> Any:
    """The ``load=`` weights placed as the state's params (a reward model's score head,
    which an SFT checkpoint lacks, freshly drawn from the seed; never read from ``load``)."""
    abstract = dict(trainer.abstract_state["params"])
    score = abstract.pop("score", None)
    if score is not None:
        model_cfg = dataclasses.replace(model_cfg, score_head=False)
    params = weights.load(cfg.load, model_cfg, abstract, where=f"load={cfg.load}")
    if score is not None:
        kernel = score["kernel"]
        draw = jax.random.normal(jax.random.key(cfg.seed), kernel.shape, kernel.dtype)
        params["score"] = {
            "kernel": jax.device_put(draw * model_cfg.initializer_range, kernel.sharding)
        }
    return params


def reference_weights(cfg, model_cfg: LlamaConfig, trainer) -> Any:
    """A full DPO run's reference: its starting weights (``load=``, else the seed's init)."""
    if cfg.load:
        return load_weights(cfg, model_cfg, trainer)
    return trainer.init_random(jax.random.key(cfg.seed))["params"]  # = its reference


def pre_pass_weights(cfg, model_cfg: LlamaConfig, trainer, state: dict, restored) -> Any:
    """The weights a DPO reference pre-pass runs: a LoRA run's base (adapters off), a
    fresh state's own params, or ``load=`` again on resume."""
    if "frozen" in state:
        return model_params(jax.tree.map(np.zeros_like, state["params"]), state["frozen"])
    if restored is None:
        return state["params"]
    return reference_weights(cfg, model_cfg, trainer)


def lora_base(cfg, model_cfg: LlamaConfig, trainer) -> tuple[Any, dict]:
    """A LoRA run's base weights (``load``, else the seed's random init) and the record a
    checkpoint keeps of them (path + content fingerprint), computed before any restore so
    a checkpoint trained on another base is refused."""
    if cfg.load:
        base = weights.load(
            cfg.load,
            lora.base_model_config(model_cfg),
            trainer.abstract_base,
            where=f"load={cfg.load}",
        )
    else:
        base = trainer.random_base(jax.random.key(cfg.seed))
    return base, lora.base_record(cfg.load, base, model_cfg.vocab_size)
