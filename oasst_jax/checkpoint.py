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
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from oasst_jax.model import LlamaConfig

# OCDBT buffers a data file's worth of encoded chunks per writer before it
# flushes; its 2 GiB default held ~1.6 GB of a 2 GB model in RAM while saving,
# 64 MiB holds ~0.3 GB (and is faster); a 70B model becomes ~4k files.
WEIGHTS_DATA_FILE_BYTES = 64 << 20


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


def _in_place_pytree_handler() -> ocp.PyTreeCheckpointHandler:
    """A pytree handler that writes numpy leaves from their own buffers.

    Orbax's default numpy handler deep-copies every host array before writing
    (a guard for asynchronous saves, whose caller may mutate the arrays
    meanwhile); :func:`save_weights` is synchronous, and for a converted 70B
    model held in ``np.memmap`` files the copy would pull the whole fp32 tree
    into RAM.  Without it tensorstore reads each leaf straight from the map.
    """
    others = (jax.Array, np.number, int, float)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        *((ty, ocp.type_handlers.get_type_handler(ty)) for ty in others),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def save_weights(
    directory: str,
    params: Any,
    cfg: LlamaConfig,
    step: int = 0,
    extra_json: Mapping[str, Mapping[str, Any]] | None = None,
    save_args: Any = None,
) -> None:
    """Write ``params`` + model config as a weights-only checkpoint at ``step``.

    ``extra_json`` adds named JSON items beside them (``convert`` keeps the
    source Hugging Face config there so an export restores its dtype and ids).
    ``save_args`` (a tree of ``ocp.SaveArgs`` or None) sets per-leaf chunking.
    Numpy leaves are written without a host copy (they may be ``np.memmap``);
    the on-disk layout is the one :func:`load_weights` / ``StandardRestore`` read.
    """
    extra = {name: ocp.args.JsonSave(dict(item)) for name, item in (extra_json or {}).items()}
    with ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
        item_handlers={
            "params": _in_place_pytree_handler(),
            **{name: ocp.JsonCheckpointHandler() for name in ("model", *extra)},
        },
    ) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.PyTreeSave(
                    params,
                    save_args=save_args,
                    ocdbt_target_data_file_size=WEIGHTS_DATA_FILE_BYTES,
                ),
                model=ocp.args.JsonSave(dataclasses.asdict(cfg)),
                **extra,
            ),
        )
        mngr.wait_until_finished()


def _restore_json(mngr: ocp.CheckpointManager, step: int, name: str) -> dict:
    """One JSON item of a step (``model``, ``meta`` or an ``extra_json`` item)."""
    return mngr.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]


def load_json_item(directory: str, name: str, step: int | None = None) -> dict | None:
    """A JSON item saved with ``extra_json``; None when the step has no such item."""
    step = _resolve_step(directory, step)
    with _manager(directory) as mngr:
        try:
            return _restore_json(mngr, step, name)
        except KeyError:
            return None


def load_model_config(directory: str, step: int | None = None) -> LlamaConfig:
    """The model config stored with a checkpoint."""
    step = _resolve_step(directory, step)
    with _manager(directory) as mngr:
        return LlamaConfig.from_mapping(_restore_json(mngr, step, "model"))


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


class ParamReader:
    """Reads saved parameters a slice at a time, straight from tensorstore.

    Orbax restores whole leaves (a partial restore still materialises each
    chosen leaf), and one stacked ``[layers, ...]`` leaf of a 70B model is
    ~75 GB in fp32; export needs one layer of it at a time.  Each leaf of
    the ``params`` item is a zarr array inside the step's OCDBT store, keyed
    by its tree path joined with dots, so a slice can be read on its own.
    """

    def __init__(self, directory: str, step: int | None = None):
        step = _resolve_step(directory, step)
        self.params_dir = os.path.join(os.path.abspath(directory), str(step), "params")
        with open(os.path.join(self.params_dir, "_METADATA")) as f:
            meta = json.load(f)
        self._driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self._stores: dict[tuple[str, ...], ts.TensorStore] = {}

    def _store(self, path: tuple[str, ...]) -> ts.TensorStore:
        if path not in self._stores:
            kvstore = {"driver": "ocdbt", "base": f"file://{self.params_dir}"}
            spec = {"driver": self._driver, "kvstore": {**kvstore, "path": ".".join(path)}}
            self._stores[path] = ts.open(spec, open=True, read=True).result()
        return self._stores[path]

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self._store(path).shape)

    def read(self, path: tuple[str, ...], index: int | None = None) -> np.ndarray:
        """The leaf at ``path``, or only its ``index``-th row (layer) when given."""
        store = self._store(path)
        return (store if index is None else store[index]).read().result()


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


SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_pad_multiple",
)


def check_same_shape(stored: LlamaConfig | None, cfg: LlamaConfig, where: str) -> None:
    """One-line error when a checkpoint's model shape differs from the config's."""
    if stored is None:
        return
    for field in SHAPE_FIELDS:
        if getattr(stored, field) != getattr(cfg, field):
            raise ValueError(
                f"{where}: checkpoint has model.{field}={getattr(stored, field)}, the config "
                f"asks for {getattr(cfg, field)} (use_checkpoint_args=True adopts the checkpoint's)"
            )


def _read_model_config(mngr: ocp.CheckpointManager, step: int) -> LlamaConfig | None:
    """The step's model config, or None when it cannot be read (a damaged step)."""
    try:
        return LlamaConfig.from_mapping(_restore_json(mngr, step, "model"))
    except (OSError, ValueError, KeyError):
        return None


class TrainCheckpointer:
    """Resumable training checkpoints: params, optimizer state, step and data-iterator state.

    Saves are asynchronous (orbax writes in the background and commits by
    renaming a temporary folder), keep the newest ``max_to_keep``, and restore
    falls back to the previous step if the newest one cannot be read.
    """

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._mngr = _manager(
            self.directory, max_to_keep=max_to_keep, enable_async_checkpointing=async_save
        )

    def save(self, step: int, state: dict, meta: dict, cfg: LlamaConfig) -> None:
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                opt_state=ocp.args.StandardSave(state["opt_state"]),
                meta=ocp.args.JsonSave({"step": step, **meta}),
                model=ocp.args.JsonSave(dataclasses.asdict(cfg)),
            ),
            force=True,
        )

    def restore(self, abstract_state: dict, cfg: LlamaConfig) -> tuple[dict, dict] | None:
        """``(state, meta)`` from the newest readable step, or None if there is none.

        The model shape stored with the run must equal ``cfg``'s (a clear error
        otherwise); only then is a step that fails to read treated as damaged.
        """
        for step in sorted(self._mngr.all_steps(), reverse=True):
            check_same_shape(_read_model_config(self._mngr, step), cfg, f"{self.directory}/{step}")
            try:
                restored = self._mngr.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(abstract_state["params"]),
                        opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except (OSError, ValueError, KeyError) as e:
                self._set_aside(step, e)
                continue
            state = {
                "step": jax.numpy.asarray(restored["meta"]["step"], jax.numpy.int32),
                "params": restored["params"],
                "opt_state": restored["opt_state"],
            }
            return state, dict(restored["meta"])
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        """Rename an unreadable step out of the manager's view (kept for inspection), so
        training resumes from the previous one and can write this step number again."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.unreadable-{int(time.time())}"
        if jax.process_index() == 0:  # one renamer; the others wait for it
            print(f"checkpoint step {step} unreadable ({type(error).__name__}); moved to {dst}")
            os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self._mngr.reload()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
