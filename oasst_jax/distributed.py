"""Joining a multi-process (multi-host) job: ``jax.distributed.initialize`` from config/env.

One process per host (TPU VM worker, GPU node) or per GPU; together they see one
global mesh.  Must run before anything touches a device, so :func:`initialize`
is the first thing ``train.run`` does.

Where the coordinator comes from (``config.distributed``):

* ``mode = "auto"`` (default): join when a coordinator address is given (the
  config field, or ``JAX_COORDINATOR_ADDRESS``), or when a multi-task SLURM step is
  detected (``SLURM_NTASKS > 1``: JAX reads the node list, task id and count);
  otherwise run as a single process.
* ``mode = "cluster"``: always call ``jax.distributed.initialize`` and let JAX
  detect what the config leaves unset (Cloud TPU pods, SLURM, Open MPI).  The
  TPU pod launcher uses it: a TPU VM worker has no SLURM-like variables to test.
* ``mode = "off"``: never join (one process, its local devices only).

``num_processes`` / ``process_id`` come from the config, else from
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, else from the detected cluster.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

MODES = ("auto", "cluster", "off")


def config() -> ml_collections.ConfigDict:
    """Defaults for ``config.distributed``."""
    return ml_collections.ConfigDict(
        dict(mode="auto", coordinator_address="", num_processes=0, process_id=-1)
    )


def initialize_kwargs(dist: Mapping[str, Any], env: Mapping[str, str]) -> dict | None:
    """Arguments for ``jax.distributed.initialize``, or None for a single-process run.

    A pure function of the config and the environment so the decision is testable.
    """
    if dist["mode"] not in MODES:
        raise ValueError(f"config: distributed.mode={dist['mode']!r} not in {MODES}")
    if dist["mode"] == "off":
        return None
    address = dist["coordinator_address"] or env.get("JAX_COORDINATOR_ADDRESS", "")
    count = int(dist["num_processes"]) or int(env.get("JAX_NUM_PROCESSES", 0))
    index = int(dist["process_id"])
    if index < 0:
        index = int(env.get("JAX_PROCESS_ID", -1))
    kwargs = {
        "coordinator_address": address or None,
        "num_processes": count or None,
        "process_id": index if index >= 0 else None,
    }
    slurm_job = int(env.get("SLURM_NTASKS", "1")) > 1
    if dist["mode"] == "cluster" or address or slurm_job:
        return kwargs
    return None


def initialize(dist: Mapping[str, Any], env: Mapping[str, str] | None = None) -> bool:
    """Join the job described by ``dist`` (and the environment); True if it did.

    CPU processes exchange collectives over gloo (the default CPU client has no
    cross-process collectives); GPU/TPU ignore that setting.
    """
    kwargs = initialize_kwargs(dist, os.environ if env is None else env)
    if kwargs is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True
