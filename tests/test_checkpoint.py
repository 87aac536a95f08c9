"""Resume decisions of ``TrainCheckpointer.restore`` on a small state (no model, no data):
a checkpoint that does not fit the run stops it with one line and moves nothing; a damaged
newest step falls back to the one before it (and only then is set aside); storage errors
are retried and never taken for damage."""

import errno
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama

from oasst_jax import checkpoint, optim
from oasst_jax.checkpoint import CheckpointError, TrainCheckpointer, classify_read_error
from oasst_jax.config import base_config

CFG = tiny_llama()
STEPS = (2, 4, 6)


def _optim(clip_grad: float = 1.0):
    c = base_config().optim
    c.clip_grad = clip_grad
    return c


def _state(clip_grad: float = 1.0, dtype=jnp.float32) -> dict:
    """Random params big enough that a data file holds only array chunks."""
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "w": jax.random.normal(k1, (256, 256), dtype),
        "norm": {"scale": jax.random.normal(k2, (256,), dtype)},
    }
    tx = optim.make_optimizer(_optim(clip_grad), 10)
    return {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}


def _abstract(state: dict) -> dict:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)


def _settings(clip_grad: float = 1.0) -> dict:
    return {f"optim.{k}": v for k, v in _optim(clip_grad).items()}


def _saved(tmp_path, clip_grad: float = 1.0) -> str:
    """Steps 2, 4, 6, each with params scaled by its step number."""
    d = str(tmp_path / "checkpoints")
    ck = TrainCheckpointer(d, max_to_keep=5, async_save=False)
    state = _state(clip_grad)
    for step in STEPS:
        s = {**state, "params": jax.tree.map(lambda x, step=step: x * step, state["params"])}
        ck.save(step, s, {"data_iterator": {"n": step}}, CFG, _settings(clip_grad))
    ck.close()
    return d


def _restore(d: str, state: dict, settings: dict | None = None):
    ck = TrainCheckpointer(d, max_to_keep=5, async_save=False)
    try:
        return ck.restore(_abstract(state), CFG, settings)
    finally:
        ck.close()


def _damage(d: str, step: int) -> None:
    """Delete the biggest file of the step's params: an array data file."""
    files = [f for f in glob.glob(f"{d}/{step}/params/**/*", recursive=True) if os.path.isfile(f)]
    os.remove(max(files, key=os.path.getsize))


def test_changed_optimizer_is_refused_and_nothing_moved(tmp_path):
    d = _saved(tmp_path, clip_grad=1.0)
    with pytest.raises(CheckpointError) as e:
        _restore(d, _state(clip_grad=0.0), _settings(clip_grad=0.0))
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{d}/6 does not fit this run: opt_state: the checkpoint has" in msg
    assert "optim.clip_grad 1.0 -> 0.0" in msg
    assert sorted(os.listdir(d)) == ["2", "4", "6"]


def test_changed_dtype_and_shape_are_refused(tmp_path):
    d = _saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"params: norm\.scale is float32, this run expects"):
        _restore(d, _state(dtype=jnp.bfloat16))
    wide = _state()
    wide["params"]["w"] = jnp.zeros((256, 128))
    wide["opt_state"] = optim.make_optimizer(_optim(), 10).init(wide["params"])
    with pytest.raises(
        CheckpointError, match=r"params: w has shape \(256, 256\), this run expects"
    ):
        _restore(d, wide)
    assert sorted(os.listdir(d)) == ["2", "4", "6"]


def test_damaged_newest_step_falls_back_to_the_one_before(tmp_path):
    d = _saved(tmp_path)
    _damage(d, 6)
    state, meta = _restore(d, _state())
    assert int(state["step"]) == 4 and meta["data_iterator"] == {"n": 4}
    want = np.asarray(_state()["params"]["w"]) * 4
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), want)
    left = sorted(os.listdir(d))
    assert left[:2] == ["2", "4"] and len(left) == 3 and left[2].startswith("6.unreadable-")


def test_damage_in_two_steps_stops_and_moves_nothing(tmp_path):
    d = _saved(tmp_path)
    _damage(d, 6)
    _damage(d, 4)
    with pytest.raises(CheckpointError, match=r"/6 is damaged .* and so is the step before it"):
        _restore(d, _state())
    assert sorted(os.listdir(d)) == ["2", "4", "6"]


def test_only_step_damaged_stops_rather_than_starting_afresh(tmp_path):
    d = str(tmp_path / "checkpoints")
    ck = TrainCheckpointer(d, async_save=False)
    ck.save(2, _state(), {}, CFG)
    ck.close()
    _damage(d, 2)
    with pytest.raises(CheckpointError, match=r"/2 is damaged .* and there is no older step"):
        _restore(d, _state())
    assert os.listdir(d) == ["2"]


def test_transient_storage_errors_are_retried_never_set_aside(tmp_path, monkeypatch):
    d = _saved(tmp_path)
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS_S", (0.0, 0.0))
    real = TrainCheckpointer._item  # one item of a step, as a resume reads it
    calls = []

    def flaky(self, step, *args, **kwargs):
        calls.append(step)
        if fail_times is None or len(calls) <= fail_times:
            cause = ValueError("UNAVAILABLE: Error reading local file: [OS error 5]")
            raise Exception("Encountered error while reading array index") from cause
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(TrainCheckpointer, "_item", flaky)
    fail_times = 2  # fails twice, then reads
    state, _ = _restore(d, _state())
    assert int(state["step"]) == 6
    calls.clear()
    fail_times = None  # never recovers: the run stops, nothing is moved
    with pytest.raises(CheckpointError, match=r"/6: storage error reading .*3 attempts.*UNAVA"):
        _restore(d, _state())
    assert sorted(os.listdir(d)) == ["2", "4", "6"]


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    "error, kind",
    [
        (OSError(errno.EIO, "Input/output error"), "transient"),
        (OSError(errno.ESTALE, "Stale file handle"), "transient"),
        (TimeoutError("read timed out"), "transient"),
        (ValueError("DEADLINE_EXCEEDED: gcs read"), "transient"),
        (_chained(Exception("reading array"), ValueError("UNAVAILABLE: x")), "transient"),
        (_chained(Exception("reading array"), ValueError("FAILED_PRECONDITION: zstd")), "damaged"),
        (ValueError('NOT_FOUND: Error reading "a/.zarray"'), "damaged"),
        (ValueError("Error decoding b-tree node: ZSTD_decompressStream() failed"), "damaged"),
        (FileNotFoundError("_METADATA does not exist"), "damaged"),
        (KeyError('Item "params" was not found in the checkpoint.'), "damaged"),
        (PermissionError(errno.EACCES, "Permission denied"), "other"),
        (ValueError("PERMISSION_DENIED: x [tensorstore_spec='{\"compressor\": 1}']"), "other"),
        (TypeError("unsupported operand"), "other"),
    ],
)
def test_read_errors_are_classified(error, kind):
    assert classify_read_error(error) == kind


def test_damaged_weights_are_called_unreadable_not_mismatched(tmp_path):
    d = str(tmp_path / "weights")
    params = _state()["params"]
    checkpoint.save_weights(d, params, CFG)
    _damage(d, 0)
    with pytest.raises(CheckpointError, match=r"\(step 0\) cannot be read: ValueError: FAIL"):
        checkpoint.load_weights(d, _abstract({"p": params})["p"])


# ----------------------------------------------------------------------------- a full disk


def _tmpfs(path, size: str, remount: bool = False) -> None:
    """A small tmpfs at ``path`` (root only: skipped elsewhere), or resized."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    opts = f"remount,size={size}" if remount else f"size={size}"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the test needs one")


_SAVE_ON_A_FULL_DISK = """
import sys
from absl import logging
from test_checkpoint import CFG, _state
from oasst_jax import checkpoint
logging.use_absl_handler()  # as the CLI has it (absl's app.run): orbax's logs reach stderr
checkpoint.quiet_background_space_errors()
ck = checkpoint.TrainCheckpointer(sys.argv[1])
try:
    ck.save(2, _state(), {}, CFG)
    ck.close()
except OSError as e:
    print(e)
    sys.exit(3)
"""


def test_a_full_disk_at_a_save_is_one_line_and_removes_the_partial_step(tmp_path):
    """An async save that meets a full disk: one line naming the step, the step's
    ``*.orbax-checkpoint-tmp*`` folder removed (also what orbax's abandoned writes
    re-create), nothing else on stderr (orbax logs a traceback per failing writer
    thread); the complete step before it restores, and with space back the next save
    works.  A weights-only save (``convert hf-to-orbax``) says the same."""
    import subprocess
    import sys

    disk = tmp_path / "disk"
    _tmpfs(disk, "300k")  # less than one step
    try:
        d = str(disk / "checkpoints")
        env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__), "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, "-c", _SAVE_ON_A_FULL_DISK, d], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 3, proc.stderr[-3000:]
        assert proc.stdout.strip() == (
            f"[Errno 28] No space left on device writing {d}/2; removed the partial {d}/2."
            "orbax-checkpoint-tmp; no complete checkpoint (the next start begins afresh); "
            "free space (or make it writable) and run again"
        )
        noise = [x for x in proc.stderr.splitlines() if "Traceback" in x or "orbax" in x]
        assert noise == [], proc.stderr[-3000:]
        assert os.listdir(d) == []
        _tmpfs(disk, "64m", remount=True)
        checkpoint.quiet_background_space_errors()
        state = _state()
        ck = TrainCheckpointer(d, async_save=True)
        ck.save(2, state, {}, CFG)
        ck.close()
        fs = os.statvfs(disk)
        used = (fs.f_blocks - fs.f_bfree) * fs.f_frsize
        _tmpfs(disk, str(used + 200_000), remount=True)  # room for a third of a step
        ck = TrainCheckpointer(d, async_save=True)
        with pytest.raises(OSError) as err:
            ck.save(4, state, {}, CFG)
            ck.close()
        line = str(err.value)
        assert line.startswith(
            f"[Errno 28] No space left on device writing {d}/4; removed the partial {d}/4."
            "orbax-checkpoint-tmp"
        ), line
        assert f"newest checkpoint: {d}/2 (the next start resumes there)" in line
        assert sorted(os.listdir(d)) == ["2"]
        with pytest.raises(OSError, match=f"writing {disk}/w/0; removed the partial {disk}/w/0"):
            checkpoint.save_weights(str(disk / "w"), jax.device_get(state["params"]), CFG)
        assert os.listdir(disk / "w") == []
        _tmpfs(disk, "64m", remount=True)
        restored, _ = _restore(d, state)
        assert int(restored["step"]) == 2
        ck = TrainCheckpointer(d, async_save=True)
        ck.save(4, state, {}, CFG)
        ck.close()
        assert sorted(os.listdir(d)) == ["2", "4"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
