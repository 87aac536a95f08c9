"""Reading and writing Hugging Face safetensors weights, without torch and without pickle.

Reading takes ``model.safetensors`` or the shards listed in
``model.safetensors.index.json``, one tensor at a time; ``.bin``/``.pt`` files are
refused because loading them means unpickling, and an index entry naming a file outside
the model directory is refused.  A damaged file (truncated, not safetensors) is one
``ValueError`` line naming it and the tensor.  Writing splits the tensors into shards of
at most a given size, the layout ``from_pretrained`` reads, holding one shard at a time.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from oasst_jax.hf.config import read_json, write_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
        weight_map = read_json(index)
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
        write_json(os.path.join(out_dir, INDEX_FILE), index)
    return file_names
