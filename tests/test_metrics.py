"""``oasst_jax.metrics``: strict-JSON metrics, generation samples in every sink, the W&B
run (offline, read back from its ``.wandb`` file) and the progress line's ETA."""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from pathlib import Path

import pytest

from oasst_jax import metrics

M = {
    "loss": 2.5,
    "lr": 1e-5,
    "grad_norm": 0.75,
    "tokens_per_s": 1000.0,
    "mfu": 0.4,
    "packing_efficiency": 0.9,
}


def _wandb_records(run_file: Path):
    """The protobuf records of a ``run-ID.wandb`` file: a 7-byte ``:W&B`` header, then
    LevelDB-log framing (32 KiB blocks; records of 7-byte header ``crc, length, type``,
    split FIRST/MIDDLE/LAST across blocks, FULL when whole)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _history(run_file: Path) -> dict[int, dict]:
    """``{step: {key: value}}`` of every history row (nested keys joined with ``/``)."""
    rows: dict[int, dict] = {}
    for r in _wandb_records(run_file):
        if r.WhichOneof("record_type") == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            rows.setdefault(row["_step"], {}).update(row)
    return rows


def test_wandb_offline_run_holds_metrics_config_and_samples(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # W&B's own caches stay in the temp dir
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    work = tmp_path / "run"
    config = {"optim": {"lr": 2e-5}, "train_iters": 519}
    options = {"project": "oasst", "entity": "", "name": "sft10-test"}
    logger = metrics.MetricsLogger(str(work), wandb=options, run_config=config)
    logger.write(1, {"loss": 2.5, "lr": 1e-5})
    logger.write(2, {"loss": float("nan"), "lr": 2e-5})
    logger.log_samples(2, [("What is 2+2?", "4"), ("Hi", "Hello! <|im_end|>")])
    logger.close()

    # the same metric names and values as metrics.jsonl (W&B keeps the NaN)
    (run_dir,) = (work / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    history = _history(run_file)
    assert history[1]["loss"] == 2.5 and history[1]["lr"] == 1e-5
    assert math.isnan(history[2]["loss"]) and history[2]["lr"] == 2e-5
    lines = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"step": 2, "loss": None, "loss_nonfinite": True, "lr": 2e-5}
    # the run's name, project and config
    (run,) = [r.run for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project) == ("sft10-test", "oasst")
    stored = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert stored["optim"] == {"lr": 2e-5} and stored["train_iters"] == 519
    assert run.run_id == (work / metrics.WANDB_RUN_ID).read_text().strip()
    # the samples table, samples.jsonl and the tensorboard text
    table = json.loads((run_dir / "files" / history[2]["samples/path"]).read_text())
    assert table["columns"] == ["step", "prompt", "reply"]
    assert table["data"] == [[2, "What is 2+2?", "4"], [2, "Hi", "Hello! <|im_end|>"]]
    samples = [json.loads(line) for line in (work / "samples.jsonl").read_text().splitlines()]
    assert samples[1] == {"step": 2, "prompt": "Hi", "reply": "Hello! <|im_end|>"}
    assert b"What is 2+2?" in b"".join(p.read_bytes() for p in (work / "tb").iterdir())


def test_samples_without_wandb_append_across_restarts(tmp_path):
    for step in (5, 10):  # a resumed run appends to the same file
        logger = metrics.MetricsLogger(str(tmp_path))
        logger.log_samples(step, [(f"p{step}", f"r{step}")])
        logger.close()
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == [
        {"step": 5, "prompt": "p5", "reply": "r5"},
        {"step": 10, "prompt": "p10", "reply": "r10"},
    ]
    assert not (tmp_path / "wandb").exists() and not (tmp_path / metrics.WANDB_RUN_ID).exists()


def test_unknown_wandb_field_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="wandb: unknown field 'projekt'"):
        metrics.MetricsLogger(str(tmp_path), wandb={"projekt": "x"})


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (44.6, "45s"), (185, "3m05s"), (3720, "1h02m"), (3 * 86400 + 7200, "3d02h")],
)
def test_format_duration(seconds, text):
    assert metrics.format_duration(seconds) == text


def test_eta_from_steps_per_second():
    assert metrics.eta_seconds(100, 519, 0.5) == 838
    assert metrics.eta_seconds(519, 519, 0.5) == 0


def test_progress_line_shows_eta_until_the_last_step():
    line = metrics.progress_line(19, 519, {**M, "step_time": 7.44})
    assert line.endswith(" | eta 1h02m") and line.startswith("step 19/519 | loss 2.5000")
    assert "eta" not in metrics.progress_line(519, 519, {**M, "step_time": 7.44})
    assert "eta" not in metrics.progress_line(3, 519, M)  # no step time measured


def _session_starts(workdir: Path) -> list[int]:
    """Steps of the ``SessionLog.START`` events in the tensorboard files (purge steps)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted((workdir / "tb").iterdir()):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                out.append(ev.step)
    return out


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """A run that logged steps 1-4 (and a line torn by its crash) resumed from its step-2
    checkpoint: metrics.jsonl and samples.jsonl keep steps <= 2 and then continue, and
    tensorboard is told to hide its events from step 3 on (purge_step)."""
    first = metrics.MetricsLogger(str(tmp_path), start_step=0)
    for step in range(1, 5):
        first.write(step, M)
        first.log_samples(step, [(f"p{step}", "r")])
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # torn by the crash
    again = metrics.MetricsLogger(str(tmp_path), start_step=2)
    for step in range(3, 6):
        again.write(step, M)
    again.log_samples(5, [("p5", "r")])
    again.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    samples = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in samples] == [1, 2, 5]
    assert _session_starts(tmp_path)[-1] == 3


class _FullFile:
    """A log file on a full disk: every write fails as the kernel says it."""

    def write(self, *_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = close = write


def test_a_full_disk_while_logging_is_one_line_naming_the_file(tmp_path):
    logger = metrics.MetricsLogger(str(tmp_path))
    logger.write(1, M)
    logger._jsonl = _FullFile()
    with pytest.raises(OSError) as err:
        logger.write(2, M)
    assert str(err.value) == (
        f"[Errno 28] No space left on device writing {tmp_path / 'metrics.jsonl'}; it holds "
        "the steps before 2; free space (or make it writable) and run again"
    )
    with pytest.raises(OSError, match=f"writing {tmp_path / 'metrics.jsonl'}; it holds what"):
        logger.close()  # every sink closed all the same
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 1


def test_the_tensorboard_writer_does_not_load_torch(tmp_path):
    """A training process where torch is installed (the test extras; many GPU images) writes
    tensorboard events without loading torch (metrics.summary_writer_class: ~1.5 s of every
    start), and leaves ``import torch`` working."""
    import importlib.util
    import subprocess
    import sys

    assert importlib.util.find_spec("torch") is not None  # installed, so it could be loaded
    code = (
        "import sys; from oasst_jax import metrics\n"
        "m = metrics.MetricsLogger(sys.argv[1]); m.write(1, {'loss': 2.5}); m.close()\n"
        "assert 'torch' not in sys.modules, 'torch loaded'; print('tb ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "tb ok", out.stderr[-2000:]
    assert list((tmp_path / "tb").glob("events.*")), list(tmp_path.rglob("*"))
