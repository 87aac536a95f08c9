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

A lost peer.  Every process of a joined job runs a watchdog (:class:`PeerWatch`): a
thread that marks the process alive in the coordination service's key-value store every
second and reads the others' marks.  A peer whose mark has not moved for
``heartbeat_timeout_s`` (killed, crashed, frozen, its host gone) ends every other process
with one ``error:`` line naming it and exit status 1, wherever their main threads wait
(a collective with the dead peer, a checkpoint barrier).  JAX's own heartbeat (given
twice that time plus 10 s, so the watchdog speaks first) stays as the backstop; its
ending is an abort with half a dozen log lines, and the Python callback its client takes
for it cannot be used (jaxlib 0.10 cannot hand it the status: ``std::bad_cast``).  When
the coordinator itself (process 0) dies, JAX's client aborts the others at once, before
any watchdog can: that one case ends in JAX's lines, naming "the leader task".
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

MODES = ("auto", "cluster", "off")

# Every process meets in :func:`gather` within this many seconds or stops (a peer that is
# alive but stuck, e.g. in a hung read); a dead peer ends the run sooner, by heartbeat.
GATHER_TIMEOUT_S = 600


def config() -> ml_collections.ConfigDict:
    """Defaults for ``config.distributed``."""
    return ml_collections.ConfigDict(
        dict(
            mode="auto",
            coordinator_address="",
            num_processes=0,
            process_id=-1,
            # a peer silent this long is lost: every other process stops (JAX's default 100)
            heartbeat_timeout_s=30,
        )
    )


def initialize_kwargs(dist: Mapping[str, Any], env: Mapping[str, str]) -> dict | None:
    """Arguments for ``jax.distributed.initialize``, or None for a single-process run.

    A pure function of the config and the environment so the decision is testable.
    """
    if dist["mode"] not in MODES:
        raise ValueError(f"config: distributed.mode={dist['mode']!r} not in {MODES}")
    if int(dist["heartbeat_timeout_s"]) < 1:
        raise ValueError(
            f"config: distributed.heartbeat_timeout_s={dist['heartbeat_timeout_s']} must be >= 1"
        )
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
    cross-process collectives); GPU/TPU ignore that setting.  A lost peer ends this
    process with one line (:func:`lost_peer_line`), exit status 1.
    """
    kwargs = initialize_kwargs(dist, os.environ if env is None else env)
    if kwargs is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = float(dist["heartbeat_timeout_s"])
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=int(2 * timeout + 10))
    global _watch
    _watch = PeerWatch(timeout)
    _watch.start()
    atexit.register(_watch.leaving)  # runs before jax's own shutdown (registered earlier)
    sys.excepthook = functools.partial(_after_the_verdict, sys.excepthook, timeout)
    return True


_watch: PeerWatch | None = None


def finished() -> None:
    """This process ends normally: its peers' watchdogs must not take its silence for a
    loss while they finish (called at the end of a run; a process that ends with an
    error is not finished, and its peers stop rather than wait for it)."""
    if _watch is not None:
        _watch.finished()


def _after_the_verdict(hook, timeout_s: float, *exc_info) -> None:
    """``sys.excepthook`` of a joined process.  An error escaping its main thread is most
    often a lost peer seen from inside a collective (gloo: "Connection closed by peer");
    the watchdog names the peer within ``timeout_s`` and ends the process with its one
    line, so the traceback waits for that verdict and is printed only without one."""
    time.sleep(timeout_s + 3 * PeerWatch.PERIOD_S)
    hook(*exc_info)


def lost_peer_line(lost: list[int], me: int, count: int, timeout_s: float) -> str:
    """The one ``error:`` line a process ends with when it has lost peers."""
    who = ", ".join(f"process {p}" for p in lost)
    if lost == [0]:
        who += " (the coordinator)"
    return (
        f"error: lost {who} of {count}: no sign of life for {timeout_s:g}s (killed, crashed, "
        f"frozen or unreachable); process {me} stops too (restart every process to resume "
        "from the newest checkpoint)"
    )


class PeerWatch(threading.Thread):
    """The lost-peer watchdog of a joined process (module docstring).

    Hand-written: JAX's coordination service has the same heartbeat but no way to hear
    of a lost peer from Python short of its abort.  Only the key-value store is used, so
    the watchdog works on every backend and needs no device.  A process that exits
    normally marks itself done (:func:`finished`), so peers still finishing are not
    alarmed.
    """

    PERIOD_S = 1.0
    PREFIX = "oasst_jax/alive/"

    def __init__(self, timeout_s: float):
        super().__init__(name="oasst_jax-peer-watch", daemon=True)
        from jax._src import distributed as jax_distributed  # the client, as orbax takes it

        self.client = jax_distributed.global_state.client
        self.timeout_s = timeout_s
        self.me, self.count = jax.process_index(), jax.process_count()
        self.done = False
        self.exiting = False
        self._quiet = threading.Event()  # set once no client call can still be under way
        self._wake = threading.Event()  # ends the wait between beats early

    def leaving(self) -> None:
        """This process is exiting (atexit) and has said why, if it failed: a peer that
        leaves first (the agreed stop of a failed checkpoint read, say) is no news worth
        a second line, and a shutdown stuck on it still ends (:meth:`_wait_for_exit`).

        Waits until the thread is out of its last key-value call: a daemon thread inside
        a C++ call when the interpreter finalizes is ended by ``pthread_exit`` as it
        returns, and that unwinding through jaxlib's frames aborted the process
        ("FATAL: exception not rethrown", exit -6) after a run that had succeeded."""
        self.exiting = True
        self._wake.set()
        self._quiet.wait(timeout=self.PERIOD_S + 5)

    def _wait_for_exit(self) -> None:
        """Make no more calls; end a process whose shutdown is stuck (jax's shutdown
        barrier waiting on a lost peer) with the status it had, after ``timeout_s``."""
        self._quiet.set()
        time.sleep(self.timeout_s + 3 * self.PERIOD_S)
        os._exit(0 if self.done else 1)

    def finished(self) -> None:
        self.done = True
        with contextlib.suppress(Exception):  # the service may be gone already
            self.client.key_value_set(f"{self.PREFIX}{self.me}", "done", allow_overwrite=True)

    def run(self) -> None:
        seen: dict[int, tuple[str, float]] = {}  # process -> (its mark, when it last moved)
        start = time.monotonic()
        for beat in itertools.count():
            if self.exiting:
                self._wait_for_exit()
            now = time.monotonic()
            try:
                if not self.done:
                    self.client.key_value_set(f"{self.PREFIX}{self.me}", str(beat), True)
                marks = dict(self.client.key_value_dir_get(self.PREFIX))
            except Exception:  # the coordinator's store is gone: so is process 0
                self._stop([0])
            lost = []
            for p in range(self.count):
                mark = marks.get(f"{self.PREFIX}{p}", "")
                if mark != seen.get(p, ("", 0.0))[0]:
                    seen[p] = (mark, now)
                since = seen.get(p, ("", start))[1]
                if p != self.me and mark != "done" and now - since > self.timeout_s:
                    lost.append(p)
            if lost:
                self._stop(lost)
            self._wake.wait(self.PERIOD_S)

    def _stop(self, lost: list[int]) -> None:
        """One line, exit 1 at once (the main thread may be blocked in a collective with
        the lost peer).  Process 0 holds the coordination service, whose end aborts the
        others: it leaves last, once the others have said they are leaving."""
        if self.exiting:  # its own line (if any) is out: exit with the status it had
            os._exit(0 if self.done else 1)
        line = lost_peer_line(lost, self.me, self.count, self.timeout_s)
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"oasst_jax/leaving/{self.me}", "1")
            if self.me == 0:
                others = set(range(1, self.count)) - set(lost)
                deadline = time.monotonic() + 3 * self.PERIOD_S + 5
                while others and time.monotonic() < deadline:
                    leaving = dict(self.client.key_value_dir_get("oasst_jax/leaving/"))
                    others = {p for p in others if f"oasst_jax/leaving/{p}" not in leaving}
                    time.sleep(0.2)
                time.sleep(1.0)  # they write their line and exit
        os.write(2, f"{line}\n".encode())
        os._exit(1)


_gathers = itertools.count()


def gather(name: str, value: Any, timeout_s: float = GATHER_TIMEOUT_S) -> list[Any]:
    """Every process's ``value`` (JSON-able), in process order: a decision each process
    makes from the same list is the same on all of them.

    Exchanged through the coordination service's key-value store rather than a device
    collective: it needs no compiled program, waits with a timeout, and a process that
    arrives from a failed read meets the others here instead of in a collective they
    are not in.  Every process must call it the same number of times in the same order
    (the calls are numbered); ``name`` only makes the keys readable."""
    if jax.process_count() == 1:
        return [value]
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    prefix = f"oasst_jax/gather/{next(_gathers)}/{name}"
    client.key_value_set(f"{prefix}/{jax.process_index()}", json.dumps(value))
    out = []
    for i in range(jax.process_count()):
        try:
            text = client.blocking_key_value_get(f"{prefix}/{i}", int(timeout_s * 1000))
        except Exception as e:  # jaxlib's XlaRuntimeError: DEADLINE_EXCEEDED
            raise TimeoutError(
                f"process {i} did not report its {name} within {timeout_s:g}s "
                f"({' '.join(str(e).split())[:200]})"
            ) from e
        out.append(json.loads(text))
    return out
