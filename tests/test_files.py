"""Atomic writes: the target is complete or as it was, and no temporary is left behind."""

from __future__ import annotations

import os

import pytest

from oasst_jax import files


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "report.json"
    files.write_json(target, {"a": 1})
    assert target.read_text() == '{"a": 1}\n'
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("died mid-write")
    assert target.read_text() == '{"a": 1}\n'
    assert os.listdir(tmp_path) == ["report.json"]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        files.write_json(tmp_path / "missing" / "x.json", {})


def test_atomic_dir_swaps_in_only_a_complete_directory(tmp_path):
    out = tmp_path / "out"
    with files.atomic_dir(out) as tmp:
        open(os.path.join(tmp, "old"), "w").close()
    with pytest.raises(RuntimeError), files.atomic_dir(out) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
        raise RuntimeError("died mid-write")
    assert os.listdir(out) == ["old"] and os.listdir(tmp_path) == ["out"]
    with files.atomic_dir(out) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    assert os.listdir(out) == ["new"] and os.listdir(tmp_path) == ["out"]
