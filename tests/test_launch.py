"""Launch scripts: they parse (``bash -n``, and shellcheck where installed), and the SLURM
script hands every task the jax.distributed wiring (run against stand-in srun/scontrol)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [os.path.join(REPO, "launch", n) for n in ("tpu_pod.sh", "slurm_gpu.sbatch")]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses(script):
    subprocess.run(["bash", "-n", script], check=True)
    shellcheck = shutil.which("shellcheck") or os.path.join(REPO, ".venv", "bin", "shellcheck")
    if os.path.exists(shellcheck):
        subprocess.run([shellcheck, script], check=True)


def _tool(path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_script_wires_jax_distributed(tmp_path):
    """Two tasks (two per node): each gets the first node as coordinator, the task count,
    its own process id and, with several tasks per node, its local GPU."""
    bin_dir, submit = tmp_path / "bin", tmp_path / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    _tool(bin_dir / "scontrol", 'printf "gpu-node-3\\ngpu-node-4\\n"\n')
    _tool(
        bin_dir / "srun",
        "while [[ $1 == --* ]]; do shift; done\n"
        'for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i "$@"; done\n',
    )
    _tool(
        submit / ".venv" / "bin" / "python",
        'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID '
        '${JAX_LOCAL_DEVICE_IDS:-none} $*"\n',
    )
    shared = tmp_path / "shared"
    (shared / "data" / "oasst_top1_2023-07-23").mkdir(parents=True)  # pretokenized already
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(submit),
        "SLURM_JOB_NODELIST": "gpu-node-[3-4]",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "STAGE": "sft10",
        "SHARED": str(shared),
    }
    out = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "slurm_gpu.sbatch")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 2
    for i, line in enumerate(out):
        assert line.startswith(f"gpu-node-3:12355 2 {i} {i} -m oasst_jax.train"), line
        assert "--config=configs/sft10.py" in line
        assert f"--config.load={shared}/runs/pre10/checkpoints" in line
