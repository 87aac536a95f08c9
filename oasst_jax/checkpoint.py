"""Orbax checkpoints: one directory layout for converted weights and training runs.

A checkpoint directory is an orbax ``CheckpointManager`` root whose step
folders hold named items: ``params`` (the model weights), ``model`` (the
``LlamaConfig`` as JSON, so a checkpoint describes its own shape, like
Megatron's ``--use_checkpoint_args``) and, for training runs, ``opt_state`` and
``meta`` (step, data-iterator state, optimizer settings).  ``convert
hf-to-orbax`` writes step 0 with ``params`` + ``model`` only, so ``finetune``
reads a converted model and a training run the same way.  Orbax writes into a
temporary folder and renames it when complete, so a crash never leaves a step
that looks finished; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from oasst_jax import atomic_files, distributed
from oasst_jax.model import LlamaConfig

# OCDBT buffers a data file's worth of encoded chunks per writer before it
# flushes; its 2 GiB default held ~1.6 GB of a 2 GB model in RAM while saving,
# 64 MiB holds ~0.3 GB (and is faster); a 70B model becomes ~4k files.
WEIGHTS_DATA_FILE_BYTES = 64 << 20


def _manager(directory: str, item_handlers: dict | None = None, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(**options),
        item_handlers=item_handlers,
    )


def latest_step(directory: str) -> int | None:
    """Newest complete step under ``directory`` (None when there is none)."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


# Orbax splits each replicated shard among its replicas to write it (replica-parallel, its
# default off GPUs): each slice is an eager device op, compiled once per shape and
# sharding, for the few KB of a norm or a small shard a cost far above the write it splits
# (on CPU ~0.2 s per distinct shape: ~100 s of the test suite's compiles).  Below this many
# bytes per replica one replica writes the whole shard; a large model's shards are far above.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _pytree_handler(*, copy_host_arrays: bool) -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler with two of its type handlers set.

    ``jax.Array``: replica-parallel writes only from :data:`REPLICA_PARALLEL_MIN_BYTES`.
    ``np.ndarray``: orbax's default deep-copies every host array before writing (a guard
    for asynchronous saves, whose caller may mutate the arrays meanwhile);
    ``copy_host_arrays=False`` is for :func:`save_weights`, which is synchronous, and for a
    converted 70B model held in ``np.memmap`` files the copy would pull the whole fp32 tree
    into RAM: without it tensorstore reads each leaf straight from the map.
    """
    # orbax's default jax.Array handler but for the threshold (its metadata store included;
    # orbax's v0 API exports no other way to set it)
    from orbax.checkpoint._src.metadata import array_metadata_store

    arrays = ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(),
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
    )
    others = (np.number, int, float)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=copy_host_arrays)),
        (jax.Array, arrays),
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
            "params": _pytree_handler(copy_host_arrays=False),
            **{name: ocp.JsonCheckpointHandler() for name in ("model", *extra)},
        },
    ) as mngr:
        with _out_of_space(directory, step, mngr.wait_until_finished):
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


TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's name for a step being written


def remove_partial_steps(directory: str, settle_s: float = 0.0) -> list[str]:
    """Remove the steps orbax left half-written under ``directory`` (``N.orbax-checkpoint-
    tmp*``: a save that failed, e.g. on a full disk, which they would keep full); returns
    their paths.  Process 0 removes; complete steps are never touched.

    Why ``settle_s``: when a save fails, orbax abandons its other tensorstore writes
    rather than waiting for them, and they finish (failing too) over the next moments,
    re-creating the folder; so after a failure the folder is removed again until it has
    stayed gone for ``settle_s``, at most 20 such rounds."""
    if not os.path.isdir(directory):
        return []

    def partial() -> list[str]:
        return sorted(os.path.join(directory, n) for n in os.listdir(directory) if TMP_MARKER in n)

    found = partial()
    if jax.process_index() != 0:
        return found
    for _ in range(20):
        for path in partial():
            shutil.rmtree(path, ignore_errors=True)
        if not settle_s:
            break
        time.sleep(settle_s)
        if not partial():
            break
    return found


@contextlib.contextmanager
def _out_of_space(
    directory: str,
    step: int,
    settle: Callable[[], None],
    newest: Callable[[], str] | None = None,
) -> Iterator[None]:
    """A save that meets a full disk (ENOSPC, EDQUOT, EROFS) as one line naming the step
    and what is kept (``newest()``: what a restart resumes from).  First ``settle()``
    waits for the save's background writers (their errors are this one), then its
    half-written step is removed."""
    try:
        yield
    except Exception as e:
        full = atomic_files.out_of_space(e)
        if full is None or isinstance(e, atomic_files.SpaceError):
            raise
        _QUIET.tripped = True
        with contextlib.suppress(Exception):  # the writers fail alike: this error says it
            settle()
        removed = remove_partial_steps(directory, settle_s=0.5)
        kept = f"removed the partial {', '.join(removed)}" if removed else "nothing half-written"
        after = newest() if newest else "earlier steps are unchanged"
        raise atomic_files.space_error(f"{directory}/{step}", full, f"{kept}; {after}") from e


class _QuietAfterFullDisk(logging.Filter):
    """What a full disk makes orbax's background threads print, dropped: its own error
    (logged with a traceback by every failing writer thread, 12-44 of them), then, once one
    was seen (``tripped``), the errors that follow from it (orbax's other threads and
    abandoned asyncio tasks finding the save aborted), and tensorstore's callbacks into
    the closed event loop of an aborted save (unraisable ``Event loop is closed``, never
    anything to act on).  The main thread says it in one line
    (:func:`oasst_jax.atomic_files.space_error`); anything else still prints."""

    tripped = False
    installed = False

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        text = record.getMessage() if record.levelno >= logging.ERROR else ""
        if (error is not None and atomic_files.out_of_space(error) is not None) or any(
            os.strerror(code) in text for code in atomic_files.OUT_OF_SPACE
        ):
            self.tripped = True
            return False
        after = self.tripped and record.levelno >= logging.ERROR
        return not (after and (_ORBAX in record.pathname or _ORBAX in record.getMessage()))

    def drops(self, error: BaseException | None) -> bool:
        """Whether a thread's or an unraisable exception is full-disk noise."""
        if error is not None and atomic_files.out_of_space(error) is not None:
            self.tripped = True
            return True
        return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


_QUIET = _QuietAfterFullDisk()
_ORBAX = f"{os.sep}orbax{os.sep}"


def quiet_background_space_errors() -> None:
    """Install :class:`_QuietAfterFullDisk` for this process (once; a training run does):
    on the ``absl`` logger orbax logs through and the root handlers, on threads' uncaught
    exceptions and on unraisable ones (which tensorstore's late callbacks raise).  It stays
    installed: an aborted save's writers can report after the run has returned; a new
    run's call only resets what the last one saw."""
    _QUIET.tripped = False
    if _QUIET.installed:
        return
    _QUIET.installed = True
    logging.getLogger("absl").addFilter(_QUIET)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QUIET)
    thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

    def on_thread(args: threading.ExceptHookArgs) -> None:
        if not _QUIET.drops(args.exc_value):
            thread_hook(args)

    def on_unraisable(args: Any) -> None:
        if not _QUIET.drops(args.exc_value):
            unraisable_hook(args)

    threading.excepthook, sys.unraisablehook = on_thread, on_unraisable


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
        except Exception as e:
            if classify_read_error(e) != "other":
                raise CheckpointError(
                    f"checkpoint {directory} (step {step}) cannot be read: {_brief(e)}"
                ) from e
            if not isinstance(e, ValueError):
                raise
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


class CheckpointError(ValueError):
    """A checkpoint the run cannot use, said in one line (the CLI prints it and exits 1)."""


class _Damaged(Exception):
    """A step whose files fail to read or decode (not a mismatch, not a storage hiccup)."""

    def __init__(self, step: int, what: str, brief: str):
        super().__init__(f"step {step} {what}: {brief}")
        self.step = step


# Shared storage (NFS, Lustre, GCS fuse) fails now and then and recovers: such errors are
# retried after these pauses and then end the run; they never make a step look damaged.
RETRY_DELAYS_S = (2.0, 10.0, 30.0)
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.EAGAIN,
        errno.EINTR,
        errno.EBUSY,
        errno.ENOLCK,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
    }
)
# tensorstore raises ValueError("<absl status code>: ...") and orbax wraps a failed
# array read in a bare Exception whose __cause__ is that error.
_TRANSIENT_TEXT = (
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "ABORTED",
    "input/output error",
    "stale file handle",
    "timed out",
)
_DAMAGE_TEXT = (
    "NOT_FOUND",
    "OUT_OF_RANGE",
    "FAILED_PRECONDITION",
    "DATA_LOSS",
    "decod",  # "Error decoding b-tree node", zstd/zarr decode failures
    "decompress",
    "truncated",
    "corrupt",
    "checksum",
    "was not found in the checkpoint",  # orbax: an item folder is missing
)


def _causes(error: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _message(e: BaseException) -> str:
    """The error's text without tensorstore's spec dump (which names e.g. a compressor)."""
    return str(e).split(" [tensorstore_spec", 1)[0]


def _matches(text: str, markers: tuple[str, ...]) -> bool:
    return any(m in text if m.isupper() else m in text.lower() for m in markers)


def classify_read_error(error: BaseException) -> str:
    """``"transient"`` (storage hiccup: retry), ``"damaged"`` (the step's files are
    missing, truncated or undecodable) or ``"other"`` (anything else: stop, move nothing)."""
    chain = _causes(error)
    for e in chain:
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return "transient"
        if isinstance(e, TimeoutError | ConnectionError) or _matches(_message(e), _TRANSIENT_TEXT):
            return "transient"
    for e in chain:
        if isinstance(e, json.JSONDecodeError | FileNotFoundError | EOFError):
            return "damaged"
        if _matches(_message(e), _DAMAGE_TEXT):
            return "damaged"
    return "other"


def _brief(error: BaseException) -> str:
    """The root cause in one line (orbax's wrapper says less than tensorstore's error)."""
    root = _causes(error)[-1]
    text = " ".join(_message(root).split())
    return f"{type(root).__name__}: {text[:300]}"


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat(tree: Any) -> dict[str, Any]:
    """Leaves by dotted path, namedtuple fields and dict keys alike (orbax saves both
    as dicts), empty nodes (``None``, optax's ``EmptyState``) dropped."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def tree_mismatch(saved: Any, expected: Any) -> str | None:
    """How a saved tree's metadata differs from the expected abstract tree (paths,
    then shapes, then dtypes), or None when it matches."""
    got, want = _flat(saved), _flat(expected)
    extra = [k for k in got if k not in want]
    missing = [k for k in want if k not in got]
    if extra or missing:
        parts = []
        if extra:
            more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
            parts.append(f"the checkpoint has {extra[0]}{more}")
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            parts.append(f"this run expects {missing[0]}{more}")
        return " where ".join(parts) if len(parts) == 2 else parts[0] + ", the other side has none"
    for name, leaf in want.items():
        shape = tuple(getattr(got[name], "shape", ()) or ())
        if shape != tuple(leaf.shape):
            return f"{name} has shape {shape}, this run expects {tuple(leaf.shape)}"
        dtype = getattr(got[name], "dtype", None)
        if dtype is not None and np.dtype(dtype) != np.dtype(leaf.dtype):
            return f"{name} is {np.dtype(dtype)}, this run expects {np.dtype(leaf.dtype)}"
    return None


def _changed(stored: Mapping[str, Any], current: Mapping[str, Any], prefix: str) -> list[str]:
    keys = sorted(set(stored) | set(current))
    return [
        f"{prefix}{k} {stored.get(k)!r} -> {current.get(k)!r}"
        for k in keys
        if stored.get(k) != current.get(k)
    ]


class TrainCheckpointer:
    """Resumable training checkpoints: params, optimizer state, step and data-iterator state.

    Saves are asynchronous (orbax writes in the background and commits by
    renaming a temporary folder) and keep the newest ``max_to_keep``.  Restore
    refuses a checkpoint that does not match the run (model shape, tree paths,
    shapes, dtypes) with one line and moves nothing; retries storage errors and
    then stops; and only when the newest step's files are damaged *and* the step
    before it reads cleanly does it set the newest aside and resume from that one.
    """

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        # cleanup_tmp_directories: a step a killed run left half-written goes at start-up
        self._mngr = _manager(
            self.directory,
            item_handlers={
                "params": _pytree_handler(copy_host_arrays=True),
                "opt_state": _pytree_handler(copy_host_arrays=True),
                "meta": ocp.JsonCheckpointHandler(),
                "model": ocp.JsonCheckpointHandler(),
            },
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._saving: int | None = None  # the step whose (async) save may still fail

    def save(
        self,
        step: int,
        state: dict,
        meta: dict,
        cfg: LlamaConfig,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """``settings`` (flat, JSON-able: e.g. the optimizer config) are stored in ``meta``
        so a resume that no longer fits can say which of them changed.  A full disk, met
        by this save or by the previous one still writing, is one line (:meth:`_space`)."""
        with self._space(step if self._saving is None else self._saving):
            self._mngr.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.PyTreeSave(state["params"]),
                    opt_state=ocp.args.PyTreeSave(state["opt_state"]),
                    meta=ocp.args.JsonSave(
                        {"step": step, **meta, "settings": dict(settings or {})}
                    ),
                    model=ocp.args.JsonSave(dataclasses.asdict(cfg)),
                ),
                force=True,
            )
        self._saving = step

    def newest(self) -> str:
        """What a restart resumes from, said for an error line: the newest complete step
        (orbax renames a step's folder to its number only once it is whole)."""
        names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        steps = [int(n) for n in names if n.isdigit()]
        if not steps:
            return "no complete checkpoint (the next start begins afresh)"
        return f"newest checkpoint: {self.directory}/{max(steps)} (the next start resumes there)"

    def _space(self, step: int) -> contextlib.AbstractContextManager:
        """:func:`_out_of_space` for a save of ``step``, naming what a restart resumes."""
        return _out_of_space(self.directory, step, self._mngr.wait_until_finished, self.newest)

    def restore(
        self,
        abstract_state: dict,
        cfg: LlamaConfig,
        settings: Mapping[str, Any] | None = None,
        check_meta: Callable[[dict, str], None] | None = None,
    ) -> tuple[dict, dict] | None:
        """``(state, meta)`` from the newest step (or the one before it, if the newest is
        damaged), None when there is no step.  ``settings`` are the run's, as passed to
        :meth:`save`, to name what changed when the checkpoint does not fit.
        ``check_meta(meta, where)`` sees a step's ``meta`` before any array is read and
        raises (a :class:`CheckpointError`) to refuse it: a LoRA run's base check.
        Only ``params`` and ``opt_state`` are restored; other state entries (a LoRA run's
        ``frozen`` base) are the caller's."""
        steps = sorted(self._mngr.all_steps(), reverse=True)
        if not steps:
            return None
        try:
            return self._restore_step(steps[0], abstract_state, cfg, settings, check_meta)
        except _Damaged as damage:
            newest = damage
        where = f"{self.directory}/{steps[0]}"
        if len(steps) == 1:
            raise CheckpointError(
                f"{where} is damaged ({newest}) and there is no older step; move it away "
                "to start afresh"
            ) from newest
        try:
            restored = self._restore_step(steps[1], abstract_state, cfg, settings, check_meta)
        except _Damaged as older:
            raise CheckpointError(
                f"{where} is damaged ({newest}) and so is the step before it ({older}); "
                "nothing was moved"
            ) from older
        except ValueError as e:  # the older step does not fit the run either
            raise CheckpointError(f"{where} is damaged ({newest}); falling back: {e}") from e
        self._set_aside(steps[0], newest)
        return restored

    def _read(self, step: int, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` on every process, then one verdict for all of them: the worst outcome
        any process had decides (another error, then damage, then a storage error), so
        the processes retry together, fall back together or stop together; a process
        deciding alone would retry or wait in the next collective while the others have
        moved on, and the job would hang.  Storage errors are retried, damage raised as
        :class:`_Damaged`, anything else as a one-line :class:`CheckpointError`."""
        where = f"{self.directory}/{step}"
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None), 1):
            value = error = None
            try:
                value = fn()
            except Exception as e:  # classified and agreed on below; nothing is swallowed
                error = e
            kind, brief = _agree(error, f"step {step} {what}")
            if kind == "ok":
                return value
            if kind == "transient" and delay is not None:
                _log(f"reading {what} of {where} failed ({brief}); retry in {delay:g}s")
                time.sleep(delay)
                continue
            if kind == "transient":
                raise CheckpointError(
                    f"{where}: storage error reading {what}, {attempt} attempts: "
                    f"{brief}; nothing was moved"
                ) from error
            if kind == "damaged":
                raise _Damaged(step, what, brief) from error
            raise CheckpointError(f"{where}: cannot read {what}: {brief}") from error
        raise AssertionError("unreachable")

    def _item(self, step: int, name: str, args: Any) -> Any:
        """One item of a step, read by its own handler.

        ``CheckpointManager.restore`` ends in a barrier across processes (a device
        collective, no timeout): a process whose read fails never reaches it, and the
        others would wait there for it forever.  Read without it, every process meets
        the others in :meth:`_read`'s agreement instead, whatever its read did."""
        path = epath.Path(self.directory) / str(step) / name
        json_item = isinstance(args, ocp.args.JsonRestore)
        handler = ocp.JsonCheckpointHandler() if json_item else ocp.StandardCheckpointHandler()
        try:
            return handler.restore(path, args=args)
        finally:
            handler.close()

    def _restore_step(
        self,
        step: int,
        abstract_state: dict,
        cfg: LlamaConfig,
        settings: Mapping | None,
        check_meta: Callable[[dict, str], None] | None = None,
    ) -> tuple[dict, dict]:
        where = f"{self.directory}/{step}"
        stored = self._read(
            step,
            "model config",
            lambda: LlamaConfig.from_mapping(self._item(step, "model", ocp.args.JsonRestore())),
        )
        check_same_shape(stored, cfg, where)
        if check_meta is not None:
            check_meta(
                self._read(step, "meta", lambda: self._item(step, "meta", ocp.args.JsonRestore())),
                where,
            )
        for item in ("params", "opt_state"):
            saved = self._read(step, f"{item} metadata", lambda item=item: self._tree(step, item))
            problem = tree_mismatch(saved, abstract_state[item])
            if problem:
                tree_fields = (*SHAPE_FIELDS, "param_dtype", "lora_rank", "lora_targets")
                changed = _changed(
                    {f: getattr(stored, f) for f in tree_fields},
                    {f: getattr(cfg, f) for f in tree_fields},
                    "model.",
                )
                changed += self._changed_settings(step, settings)
                hint = f"; changed since: {', '.join(changed)}" if changed else ""
                raise CheckpointError(
                    f"{where} does not fit this run: {item}: {problem}{hint} (resume with the "
                    "checkpoint's settings, or start a new workdir with load= and finetune=True)"
                )
        restored = self._read(
            step,
            "arrays",
            lambda: {
                "params": self._item(
                    step, "params", ocp.args.StandardRestore(abstract_state["params"])
                ),
                "opt_state": self._item(
                    step, "opt_state", ocp.args.StandardRestore(abstract_state["opt_state"])
                ),
                "meta": self._item(step, "meta", ocp.args.JsonRestore()),
            },
        )
        state = {
            "step": jax.numpy.asarray(restored["meta"]["step"], jax.numpy.int32),
            "params": restored["params"],
            "opt_state": restored["opt_state"],
        }
        return state, dict(restored["meta"])

    def _tree(self, step: int, item: str) -> Any:
        """The saved tree's leaf metadata (paths, shapes, dtypes); no array is read."""
        path = epath.Path(self.directory) / str(step) / item
        return ocp.StandardCheckpointHandler().metadata(path).tree

    def _changed_settings(self, step: int, settings: Mapping | None) -> list[str]:
        if not settings:
            return []
        try:
            stored = self._item(step, "meta", ocp.args.JsonRestore()).get("settings") or {}
        except Exception:  # only a hint for the message being raised
            return []
        return _changed(stored, settings, "") if stored else []  # older runs stored none

    def _set_aside(self, step: int, error: Exception) -> None:
        """Rename a damaged step out of the manager's view (kept for inspection), so
        training resumes from the previous one and can write this step number again."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.unreadable-{int(time.time())}"
        if jax.process_index() == 0:  # one renamer; the others wait for it
            print(f"checkpoint step {step} is damaged ({error}); moved to {dst}", flush=True)
            os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self._mngr.reload()

    def close(self) -> None:
        """Wait for the pending save (a full disk it meets: one line, :meth:`_space`)."""
        try:
            with self._space(self._saving or 0):
                self._mngr.wait_until_finished()
        finally:
            with contextlib.suppress(Exception):  # its save's error is the one raised above
                self._mngr.close()


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


_SEVERITY = ("ok", "transient", "damaged", "other")


def _agree(error: BaseException | None, what: str) -> tuple[str, str]:
    """The worst outcome of one read over every process (:data:`_SEVERITY`) and that
    error in brief (naming the process that had it in a multi-process run)."""
    own = ["ok", ""] if error is None else [classify_read_error(error), _brief(error)]
    outcomes = distributed.gather(f"read {what}", own)
    worst = max(range(len(outcomes)), key=lambda i: (_SEVERITY.index(outcomes[i][0]), -i))
    kind, brief = outcomes[worst]
    if len(outcomes) > 1 and kind != "ok":
        brief = f"process {worst}: {brief}"
    return kind, brief
