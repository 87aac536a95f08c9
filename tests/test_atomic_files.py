"""Atomic writes: the target is complete or as it was, and no temporary is left behind."""

from __future__ import annotations

import errno
import os

import pytest

from oasst_jax import atomic_files


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "report.json"
    atomic_files.write_json(target, {"a": 1})
    assert target.read_text() == '{"a": 1}\n'
    with pytest.raises(RuntimeError), atomic_files.atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("died mid-write")
    assert target.read_text() == '{"a": 1}\n'
    assert os.listdir(tmp_path) == ["report.json"]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        atomic_files.write_json(tmp_path / "missing" / "x.json", {})


def test_atomic_dir_swaps_in_only_a_complete_directory(tmp_path):
    out = tmp_path / "out"
    with atomic_files.atomic_dir(out) as tmp:
        open(os.path.join(tmp, "old"), "w").close()
    with pytest.raises(RuntimeError), atomic_files.atomic_dir(out) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
        raise RuntimeError("died mid-write")
    assert os.listdir(out) == ["old"] and os.listdir(tmp_path) == ["out"]
    with atomic_files.atomic_dir(out) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    assert os.listdir(out) == ["new"] and os.listdir(tmp_path) == ["out"]


def test_every_written_file_gets_the_usual_mode(tmp_path):
    """safetensors' ``save_file`` creates its file 0600; written through ``atomic_path``
    or ``atomic_dir`` it reads like every other file (0666 & ~umask: 0644)."""
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save_file

    old = os.umask(0o022)
    try:
        with atomic_files.atomic_dir(tmp_path / "export") as tmp:
            save_file({"w": np.zeros(2)}, os.path.join(tmp, "model.safetensors"))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write("{}")
        with atomic_files.atomic_path(tmp_path / "one.safetensors") as tmp:
            save_file({"w": np.zeros(2)}, tmp)
    finally:
        os.umask(old)
    for path in (
        tmp_path / "export" / "model.safetensors",
        tmp_path / "export" / "config.json",
        tmp_path / "one.safetensors",
    ):
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path


def _full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_is_one_line_naming_the_path_and_what_was_kept(tmp_path, code):
    """ENOSPC / EDQUOT / EROFS while writing: the temporary is removed and the error is
    one line naming the target and what is kept (the previous file or directory)."""
    target, out = tmp_path / "report.json", tmp_path / "export"
    with pytest.raises(OSError) as err, atomic_files.atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(code, os.strerror(code))
    assert err.value.errno == code and "\n" not in str(err.value)
    assert f"{os.strerror(code)} writing {target}; nothing was written" in str(err.value)
    atomic_files.write_json(target, {"a": 1})
    with pytest.raises(OSError, match=f"writing {target}; the previous {target} is unchanged"):
        with atomic_files.atomic_path(target) as tmp, open(tmp, "w") as f:
            f.write("half")
            _full()
    with atomic_files.atomic_dir(out) as tmp:
        open(os.path.join(tmp, "old"), "w").close()
    # tensorstore/orbax say it as text in another exception, the errno as its cause or not
    wrapped = ValueError(f"RESOURCE_EXHAUSTED: writing chunk: {os.strerror(code)}")
    with pytest.raises(OSError, match=f"writing {out}; the previous {out} is unchanged"):
        with atomic_files.atomic_dir(out) as tmp:
            raise wrapped
    assert sorted(os.listdir(tmp_path)) == ["export", "report.json"]
    assert os.listdir(out) == ["old"] and target.read_text() == '{"a": 1}\n'
    with pytest.raises(ValueError, match="not a disk"), atomic_files.atomic_dir(out):
        raise ValueError("not a disk problem")
