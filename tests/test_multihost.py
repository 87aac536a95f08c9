"""Multi-host: two local processes (4 emulated CPU devices each, gloo collectives) train the
tiny config to the same losses as one process with 8 devices, and save checkpoints
together.  The mesh (pipeline 2 x sequence 2 x tensor 2) puts pipeline stages, context and
tensor parallelism across the process boundary.  Faults: a process killed mid-step ends
every other one within a minute, with one line naming it, and the restarted job resumes
bit-exactly; a checkpoint read error on one process only makes every process retry, or
every process stop, together.  Input: with the batch axis over processes, 2 and 4
processes each read only their rows, of the one process's batches, to its losses, and 4
resume the one process's checkpoint on its batches.  Plus the decision table of
``oasst_jax.distributed``.

Every process runs ``python -m oasst_jax.train`` (the CLI, so its one-line errors are
what is checked), started through :data:`RUNNER`, which injects a test's faults first.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import COMPILE_FLAGS

from oasst_jax.data.shards import ShardWriter, split_path
from oasst_jax.distributed import initialize_kwargs, lost_peer_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
SAVE = 2  # the killed job's newest checkpoint; the restart resumes there
HEARTBEAT_S = 10

# ``python -m oasst_jax.train ARGS`` after the faults the environment asks this process for:
# OASST_TEST_STALL=FILE: after saving step SAVE, write FILE and sleep (the test kills it);
# OASST_TEST_READ_FAULT=once|always: its checkpoint reads fail with EIO (the first only);
# OASST_TEST_BATCHES=DIR: every train batch this process reads, its rows, in DIR/pI-bK.npz.
RUNNER = f"""
import errno, os, runpy, sys, time
from oasst_jax import checkpoint
checkpoint.RETRY_DELAYS_S = (0.2, 0.2, 0.2)
stall, fault = os.environ.get("OASST_TEST_STALL"), os.environ.get("OASST_TEST_READ_FAULT")
if stall:
    save = checkpoint.TrainCheckpointer.save
    def stalling(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == {SAVE}:
            open(stall, "w").close()
            time.sleep(600)
    checkpoint.TrainCheckpointer.save = stalling
if fault:
    item, reads = checkpoint.TrainCheckpointer._item, []
    def failing(self, *args, **kwargs):
        reads.append(args)
        if fault == "always" or len(reads) == 1:
            raise OSError(errno.EIO, "Input/output error (injected)", self.directory)
        return item(self, *args, **kwargs)
    checkpoint.TrainCheckpointer._item = failing
batches = os.environ.get("OASST_TEST_BATCHES")
if batches:
    import numpy as np
    from oasst_jax.data import pipeline
    read, done = pipeline.Batches.__next__, []
    def recording(self):
        batch = read(self)
        name = f"p{{os.environ['JAX_PROCESS_ID']}}-b{{len(done)}}.npz"
        np.savez(os.path.join(batches, name), rows=self.rows, **batch)
        done.append(name)
        return batch
    pipeline.Batches.__next__ = recording
sys.argv = ["oasst_jax.train", *sys.argv[1:]]
runpy.run_module("oasst_jax.train", run_name="__main__", alter_sys=True)
"""


def _write_shards(root: str) -> None:
    """Synthetic chatml-like samples: a user turn, then an assistant turn (role ids 1, 2)."""
    rs = np.random.RandomState(0)
    for split, count in (("train", 48), ("val", 8)):
        with ShardWriter(split_path(root, "syn", split), vocab_size=1002) as w:
            for _ in range(count):
                user, answer = rs.randint(4, 30), rs.randint(4, 40)
                w.add(rs.randint(0, 1002, user + answer), np.repeat([1, 2], [user, answer]))
            w.commit({"dataset": "synthetic"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(workdir: str, data: str) -> dict:
    return {
        "workdir": workdir,
        "data_path": data,
        "data_prefix": "syn",
        "tokenizer_path": "",
        "seq_length": 64,
        "train_iters": STEPS,
        "log_interval": 1,
        "eval_interval": 0,
        "save_interval": SAVE,
        "data_threads": 1,
        "mesh.fsdp": 1,
        "mesh.pipeline": 2,
        "distributed.heartbeat_timeout_s": HEARTBEAT_S,
    }


def _launch(
    workdir: str, data: str, count: int = 2, more: dict | None = None, **faults: dict[str, str]
) -> list:
    """``count`` processes of one job (8 devices in all); ``faults[i]``: process i's;
    ``more``: overrides beyond :func:`_overrides`."""
    address = f"127.0.0.1:{_free_port()}"
    args = [f"--config={os.path.join(REPO, 'configs', 'tiny.py')}"]
    args += [f"--config.{k}={v}" for k, v in {**_overrides(workdir, data), **(more or {})}.items()]
    procs = []
    for i in range(count):
        env = {
            **os.environ,
            **faults.get(f"p{i}", {}),
            # conftest's compile flags (its quick XLA:CPU compiles), this process's devices
            "XLA_FLAGS": f"{COMPILE_FLAGS} --xla_force_host_platform_device_count={8 // count}",
            "JAX_PLATFORMS": "cpu",
            "JAX_DEFAULT_MATMUL_PRECISION": "highest",
            "JAX_COORDINATOR_ADDRESS": address,
            "JAX_NUM_PROCESSES": str(count),
            "JAX_PROCESS_ID": str(i),
        }
        cmd = [sys.executable, "-c", RUNNER, *args]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def _finish(procs: list, code: int = 0) -> list[str]:
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == code, out[-3000:]
        outputs.append(out)
    return outputs


def _run_here(workdir: str, data: str, more: dict | None = None) -> None:
    """The job's run in this process, which has 8 CPU devices (conftest) and jax imported
    already: the one-process reference without a process start of its own."""
    import jax

    from oasst_jax.cli.train import run
    from oasst_jax.config import load_config

    assert jax.device_count() == 8 and jax.process_count() == 1
    cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))
    overrides = {**_overrides(workdir, data), **(more or {}), "distributed.mode": "off"}
    cfg.update_from_flattened_dict(overrides)
    run(cfg)


def _metrics(workdir: str) -> dict[int, dict]:
    """Each step's newest ``metrics.jsonl`` line (only process 0 writes it), without
    the wall-clock figures."""
    clock = ("time_", "step_time", "tokens_per_s", "mfu")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(clock)} for r in rows}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One uninterrupted two-process job (and the one-process reference, trained here
    meanwhile): the losses every other test's job must reproduce."""
    root = tmp_path_factory.mktemp("multihost")
    data, two, one = str(root / "data"), str(root / "two"), str(root / "one")
    _write_shards(data)
    procs = _launch(two, data)
    try:
        _run_here(one, data)
    finally:
        outputs = _finish(procs)
    return {"data": data, "two": two, "one": one, "outputs": outputs, "root": root}


@pytest.mark.slow
def test_two_processes_match_one(job):
    want, got = _metrics(job["one"]), _metrics(job["two"])
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [got[s]["loss"] for s in got], [want[s]["loss"] for s in got], rtol=1e-5
    )
    outputs = job["outputs"]
    assert "step" in outputs[0] and "step" not in outputs[1]  # progress lines: process 0 only
    for step in (SAVE, STEPS):  # saved collectively
        assert os.path.isdir(os.path.join(job["two"], "checkpoints", str(step)))


# the batch axis over processes: data 2 x fsdp 2 (x tensor 2 inside a process), so with 2
# processes each holds 4 of the 8 rows of a step, with 4 processes 2
SHARED = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.pipeline": 1, "mesh.sequence": 1}


def _batches(directory: str, process: int = 0) -> list[dict]:
    """The train batches one process read (:data:`RUNNER`'s OASST_TEST_BATCHES), in order."""
    out, k = [], 0
    while os.path.exists(path := os.path.join(directory, f"p{process}-b{k}.npz")):
        with np.load(path) as f:
            out.append(dict(f))
        k += 1
    return out


@pytest.fixture(scope="module")
def shared_one(tmp_path_factory):
    """The one-process run on the :data:`SHARED` mesh, every train batch it read recorded."""
    from oasst_jax.data import pipeline

    root = tmp_path_factory.mktemp("shared-one")
    data = str(root / "data")
    _write_shards(data)
    read, done = pipeline.Batches.__next__, []

    def recording(self):
        batch = read(self)
        np.savez(str(root / f"p0-b{len(done)}.npz"), rows=self.rows, **batch)
        done.append(batch)
        return batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.Batches, "__next__", recording)
        _run_here(str(root / "run"), data, SHARED)
    return {"data": data, "run": str(root / "run"), "batches": _batches(str(root))}


@pytest.mark.slow
# 2 here; 4 processes (2 rows each) in test_resume_with_another_number_of_processes, which
# checks the same rows and losses from the resumed step on (one 4-process job, not two)
@pytest.mark.parametrize("count", [2])
def test_each_process_reads_its_rows_of_the_one_process_batches(count, shared_one, tmp_path):
    """With the batch axis over processes, each of ``count`` processes reads only the rows
    its devices hold (8 / count of each step's 8); put together they are, field for field,
    the batches one process reads alone, and the losses are the one process's."""
    work, recorded = str(tmp_path / "run"), str(tmp_path / "batches")
    os.makedirs(recorded)
    env = {"OASST_TEST_BATCHES": recorded}
    _finish(
        _launch(work, shared_one["data"], count, SHARED, **{f"p{i}": env for i in range(count)})
    )
    parts = [_batches(recorded, i) for i in range(count)]
    want = shared_one["batches"]
    assert len(want) == STEPS and all(len(p) == STEPS for p in parts)
    for step, whole in enumerate(want):
        held = [p[step] for p in parts]
        assert [list(h["rows"]) for h in held] == [
            list(range(i * 8 // count, (i + 1) * 8 // count)) for i in range(count)
        ]
        for k in whole:
            if k != "rows":
                np.testing.assert_array_equal(np.concatenate([h[k] for h in held]), whole[k])
    got, one = _metrics(work), _metrics(shared_one["run"])
    assert sorted(got) == sorted(one) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [got[s]["loss"] for s in got], [one[s]["loss"] for s in got], rtol=1e-5
    )
    assert [got[s]["samples"] for s in got] == [one[s]["samples"] for s in got]


@pytest.mark.slow
def test_resume_with_another_number_of_processes(shared_one, tmp_path):
    """The one process's checkpoint at step SAVE, resumed by 4 processes: the data position
    it stores is the global plan's, so each reads only its 2 rows of the very batches the
    one process read next, and the losses are its losses."""
    work, recorded = str(tmp_path / "run"), str(tmp_path / "batches")
    os.makedirs(os.path.join(work, "checkpoints"))
    os.makedirs(recorded)
    saved = os.path.join(shared_one["run"], "checkpoints", str(SAVE))
    subprocess.run(["cp", "-r", saved, os.path.join(work, "checkpoints")], check=True)
    env = {"OASST_TEST_BATCHES": recorded}
    outputs = _finish(
        _launch(work, shared_one["data"], 4, SHARED, **{f"p{i}": env for i in range(4)})
    )
    assert f"resumed from {work}/checkpoints at step {SAVE}" in outputs[0]
    parts = [_batches(recorded, i) for i in range(4)]
    for k, whole in enumerate(shared_one["batches"][SAVE:]):
        assert [list(p[k]["rows"]) for p in parts] == [[2 * i, 2 * i + 1] for i in range(4)]
        for field in (f for f in whole if f != "rows"):
            got = np.concatenate([p[k][field] for p in parts])
            np.testing.assert_array_equal(got, whole[field])
    got, one = _metrics(work), _metrics(shared_one["run"])
    assert sorted(got) == list(range(SAVE + 1, STEPS + 1))
    np.testing.assert_allclose(
        [got[s]["loss"] for s in got], [one[s]["loss"] for s in got], rtol=1e-5
    )


def _error_lines(out: str) -> list[str]:
    """The ``error:`` lines, and any of JAX's C++ error or fatal log lines."""
    return [x for x in out.splitlines() if x.startswith("error:") or re.match(r"[EF]\d{4} ", x)]


@pytest.mark.slow
def test_killed_process_stops_the_job_and_restart_resumes_bit_exact(job):
    """Process 1 is killed (-9) while process 0 is inside step SAVE + 1's collectives:
    process 0 exits 1 within a minute with one line naming process 1.  The restarted
    job resumes from step SAVE (process 1's first checkpoint read fails once: both
    retry) and its metrics equal the uninterrupted job's, bit for bit."""
    work = str(job["root"] / "killed")
    stalled = os.path.join(str(job["root"]), "stalled")
    procs = _launch(work, job["data"], p1={"OASST_TEST_STALL": stalled})
    deadline = time.monotonic() + 300
    while not os.path.exists(stalled):
        assert time.monotonic() < deadline and procs[0].poll() is None, "never reached the stall"
        time.sleep(0.2)
    time.sleep(1.0)  # process 0 is into the next step, waiting for process 1
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    out, _ = procs[0].communicate(timeout=120)
    took = time.monotonic() - killed
    procs[1].wait()
    print(f"process 0 exited {took:.1f}s after process 1 was killed")  # the README's figure
    assert procs[0].returncode == 1, out[-3000:]
    assert took < 60, out[-3000:]
    errors = _error_lines(out)
    assert len(errors) == 1 and errors[0].startswith("error: lost process 1 of 2"), out[-3000:]
    assert "Traceback" not in out
    assert os.path.isdir(os.path.join(work, "checkpoints", str(SAVE)))

    procs = _launch(work, job["data"], p1={"OASST_TEST_READ_FAULT": "once"})
    outputs = _finish(procs)
    assert "failed (process 1: OSError: [Errno 5]" in outputs[0], outputs[0][-3000:]
    assert f"resumed from {work}/checkpoints at step {SAVE}" in outputs[0]
    assert _metrics(work) == _metrics(job["two"])


@pytest.mark.slow
def test_read_error_on_one_process_stops_every_process(job):
    """Process 1's checkpoint reads always fail: after the retries every process stops
    with the same one line naming process 1 (none waits for the others), and nothing
    is moved."""
    work = str(job["root"] / "unreadable")
    os.makedirs(work)
    subprocess.run(["cp", "-r", os.path.join(job["two"], "checkpoints"), work], check=True)
    procs = _launch(work, job["data"], p1={"OASST_TEST_READ_FAULT": "always"})
    outputs = _finish(procs, code=1)
    for out in outputs:
        errors = _error_lines(out)
        assert len(errors) == 1, out[-3000:]
        assert "storage error reading model config, 4 attempts: process 1: OSError" in errors[0]
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == [str(SAVE), str(STEPS)]


ENV_CASES = [
    ({}, {}, None),  # laptop: one process
    ({"mode": "off"}, {"SLURM_NTASKS": "4"}, None),
    ({}, {"SLURM_NTASKS": "1"}, None),
    ({}, {"SLURM_NTASKS": "4"}, {}),  # JAX reads the SLURM step
    ({"mode": "cluster"}, {}, {}),  # TPU pod: JAX asks the TPU metadata
    (
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
        {},
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
    ),
    (
        {},
        {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "0"},
        {"coordinator_address": "h:1", "num_processes": 8, "process_id": 0},
    ),
]
DIST = {
    "mode": "auto",
    "coordinator_address": "",
    "num_processes": 0,
    "process_id": -1,
    "heartbeat_timeout_s": 30,
}


@pytest.mark.parametrize("dist, env, want", ENV_CASES)
def test_initialize_kwargs(dist, env, want):
    got = initialize_kwargs({**DIST, **dist}, env)
    if want is None:
        assert got is None
    else:
        unset = {"coordinator_address": None, "num_processes": None, "process_id": None}
        assert got == {**unset, **want}


@pytest.mark.parametrize(
    "dist, match",
    [
        ({"mode": "mpi"}, "distributed.mode='mpi'"),
        ({"heartbeat_timeout_s": 0}, "distributed.heartbeat_timeout_s=0 must be >= 1"),
    ],
)
def test_bad_setting_is_one_line_error(dist, match):
    with pytest.raises(ValueError, match=match):
        initialize_kwargs({**DIST, **dist}, {})


@pytest.mark.parametrize(
    "lost, me, who",
    [
        ([3], 0, "error: lost process 3 of 4: no sign of life for 10s"),
        ([0], 2, "error: lost process 0 (the coordinator) of 4: no sign of life for 10s"),
        ([1, 3], 2, "error: lost process 1, process 3 of 4: no sign of life for 10s"),
    ],
)
def test_lost_peer_is_one_line(lost, me, who):
    line = lost_peer_line(lost, me, 4, 10)
    assert line.startswith(who) and "\n" not in line
    assert f"process {me} stops too" in line
