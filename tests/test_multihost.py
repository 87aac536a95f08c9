"""Multi-host: two local processes (4 emulated CPU devices each, gloo collectives) train the
tiny config to the same losses as one process with 8 devices, and save one checkpoint
together.  The mesh (pipeline 2 x sequence 2 x tensor 2) puts pipeline stages, context and
tensor parallelism across the process boundary.  Plus the decision table of
``oasst_jax.distributed``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from oasst_jax.data.shards import ShardWriter, split_path
from oasst_jax.distributed import initialize_kwargs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3

# Runs train.run(config + overrides) in a fresh process with its own device count.
RUNNER = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from oasst_jax.config import load_config
from oasst_jax.train import run
cfg = load_config(sys.argv[1])
cfg.update_from_flattened_dict(json.loads(sys.argv[2]))
run(cfg)
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


def _overrides(workdir: str, data: str, dist: dict) -> dict:
    return {
        "workdir": workdir,
        "data_path": data,
        "data_prefix": "syn",
        "tokenizer_path": "",
        "seq_length": 64,
        "train_iters": STEPS,
        "log_interval": 1,
        "eval_interval": 0,
        "save_interval": STEPS,
        "data_threads": 1,
        "mesh.fsdp": 1,
        "mesh.pipeline": 2,
        **{f"distributed.{k}": v for k, v in dist.items()},
    }


def _launch(workdir: str, data: str, devices: int, dist: dict) -> subprocess.Popen:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUNNER,
            os.path.join(REPO, "configs", "tiny.py"),
            json.dumps(_overrides(workdir, data, dist)),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run_here(workdir: str, data: str) -> None:
    """RUNNER's run in this process, which has 8 CPU devices (conftest) and jax imported
    already: the one-process reference without a process start of its own."""
    import jax

    from oasst_jax.config import load_config
    from oasst_jax.train import run

    assert jax.device_count() == 8 and jax.process_count() == 1
    cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))
    cfg.update_from_flattened_dict(_overrides(workdir, data, {"mode": "off"}))
    run(cfg)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(workdir: str) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_two_processes_match_one(tmp_path):
    data = str(tmp_path / "data")
    _write_shards(data)
    two = str(tmp_path / "two")
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        _launch(two, data, 4, {"coordinator_address": address, "num_processes": 2, "process_id": i})
        for i in range(2)
    ]
    # the reference trains here while the two processes start up and train
    one = str(tmp_path / "one")
    try:
        _run_here(one, data)
    finally:
        outputs = [_finish(p) for p in procs]

    want, got = _losses(one), _losses(two)  # only process 0 writes metrics.jsonl
    assert len(want) == len(got) == STEPS
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert "step" in outputs[0] and "step" not in outputs[1]  # progress lines: process 0 only
    assert os.path.isdir(os.path.join(two, "checkpoints", str(STEPS)))  # saved collectively


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


@pytest.mark.parametrize("dist, env, want", ENV_CASES)
def test_initialize_kwargs(dist, env, want):
    cfg = {"mode": "auto", "coordinator_address": "", "num_processes": 0, "process_id": -1}
    got = initialize_kwargs({**cfg, **dist}, env)
    if want is None:
        assert got is None
    else:
        unset = {"coordinator_address": None, "num_processes": None, "process_id": None}
        assert got == {**unset, **want}


def test_unknown_mode_is_one_line_error():
    dist = {"mode": "mpi", "coordinator_address": "", "num_processes": 0, "process_id": -1}
    with pytest.raises(ValueError, match="distributed.mode='mpi'"):
        initialize_kwargs(dist, {})
