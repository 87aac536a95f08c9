"""Orbax checkpoints: one directory layout for converted weights and training runs.

A checkpoint directory is an orbax ``CheckpointManager`` root whose step
folders hold named items: ``params`` (the model weights), ``model`` (the
``LlamaConfig`` as JSON, so a checkpoint describes its own shape, like
Megatron's ``--use_checkpoint_args``) and, for training runs, ``opt_state``,
``meta`` and ``data``.  ``convert hf-to-orbax`` writes step 0 with ``params`` +
``model`` only, so ``finetune`` reads a converted model and a training run the
same way.  Orbax writes into a temporary folder and renames it when complete,
so a crash never leaves a step that looks finished; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from oasst_jax.model import LlamaConfig


def _manager(directory: str, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(**options)
    )


def latest_step(directory: str) -> int | None:
    """Newest complete step under ``directory`` (None when there is none)."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


def save_weights(directory: str, params: Any, cfg: LlamaConfig, step: int = 0) -> None:
    """Write ``params`` + model config as a weights-only checkpoint at ``step``."""
    with _manager(directory, enable_async_checkpointing=False) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                model=ocp.args.JsonSave(dataclasses.asdict(cfg)),
            ),
        )
        mngr.wait_until_finished()


def load_model_config(directory: str, step: int | None = None) -> LlamaConfig:
    """The model config stored with a checkpoint."""
    step = _resolve_step(directory, step)
    with _manager(directory) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
    return LlamaConfig.from_mapping(restored["model"])


def load_weights(directory: str, abstract_params: Any = None, step: int | None = None) -> Any:
    """Restore only the ``params`` item.

    ``abstract_params`` (a tree of ``jax.ShapeDtypeStruct`` with shardings)
    places each array directly on its devices; a shape mismatch is reported
    with the parameter's path instead of an orbax traceback.
    """
    step = _resolve_step(directory, step)
    with _manager(directory) as mngr:
        try:
            restored = mngr.restore(
                step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
            )
        except ValueError as e:
            raise ValueError(
                f"checkpoint {directory} (step {step}) does not match the model: {e}"
            ) from None
    return restored["params"]


def check_shapes(expected: Any, found: Any, where: str) -> None:
    """Raise a one-line error naming the first parameter whose shape differs."""
    exp = dict(jax.tree_util.tree_leaves_with_path(expected))
    got = dict(jax.tree_util.tree_leaves_with_path(found))
    for path, leaf in exp.items():
        name = jax.tree_util.keystr(path)
        if path not in got:
            raise ValueError(f"{where}: parameter {name} is missing")
        if tuple(got[path].shape) != tuple(leaf.shape):
            raise ValueError(
                f"{where}: parameter {name} has shape {tuple(got[path].shape)}, "
                f"the model expects {tuple(leaf.shape)}"
            )


def _resolve_step(directory: str, step: int | None) -> int:
    if step is not None:
        return step
    found = latest_step(directory)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {directory}")
    return found
