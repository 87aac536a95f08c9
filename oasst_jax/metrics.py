"""Run logging: tensorboardX scalars, ``metrics.jsonl``, generation samples, optionally
Weights & Biases, and the stdout progress line.

Only process 0 writes.  ``metrics.jsonl`` and ``samples.jsonl`` are opened in append
mode so a resumed run continues the same files; the W&B run id is kept in
``{workdir}/wandb_run_id`` so a resumed run continues the same W&B run too (steps it
already logged before the restart are dropped by W&B with a warning).

A run resumed from step ``N`` (``start_step``) holds each step once: the lines of steps
after ``N`` (logged by the run before it stopped, past its last checkpoint) are removed
from ``metrics.jsonl`` and ``samples.jsonl`` when they are opened, and tensorboard hides
its events from step ``N + 1`` on (``purge_step``), so plots never double back
(1, 2, 3, 4, 3, 4, 5 ...).  A full disk while writing is one line naming the file
(:class:`oasst_jax.atomic_files.SpaceError`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from oasst_jax import atomic_files

WANDB_FIELDS = ("project", "entity", "name")  # a config's ``wandb`` section
WANDB_RUN_ID = "wandb_run_id"


def summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter``, imported without torch where torch is not loaded
    yet: tensorboardX's writer module tries ``import torch`` only to accept torch tensors
    (this logger writes Python floats), which costs every training process that has torch
    installed ~1.5 s and torch's memory (0.2 s against 1.6 s here).  ``sys.modules``
    holding None for a name makes its import raise ImportError, which tensorboardX
    catches; the entry is removed at once, so a later ``import torch`` works."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsLogger:
    """Writes what the train loop measures to every sink, under the same names.

    ``wandb``: ``{"project", "entity", "name"}`` (empty or missing: off; ``entity``
    empty = the user's default, ``name`` empty = W&B's generated name).  ``run_config``
    (the run's whole config as a dict) becomes the W&B run's config.  ``WANDB_MODE=offline``
    writes the run under ``{workdir}/wandb`` for a later ``wandb sync``.  ``start_step``:
    the step the run starts from (module doc); None keeps whatever the files hold.
    """

    def __init__(
        self,
        workdir: str,
        *,
        wandb: Mapping[str, str] | None = None,
        run_config: Mapping[str, Any] | None = None,
        start_step: int | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self._writer = None
        self._jsonl = None
        self._samples = None
        self._wandb = None
        self._sample_rows: list[list[Any]] = []
        options = _wandb_options(wandb)
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            purge = None
            if start_step is not None:
                for name in (METRICS_FILE, SAMPLES_FILE):
                    keep_through(os.path.join(workdir, name), start_step)
                purge = start_step + 1
            writer = summary_writer_class()
            self._writer = writer(os.path.join(workdir, "tb"), purge_step=purge)
            self._jsonl_path = os.path.join(workdir, METRICS_FILE)
            self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
            if options["project"]:
                self._wandb = _start_wandb(workdir, options, dict(run_config or {}))

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` line of strict JSON: a NaN/Inf value is written as
        ``null`` with ``"<name>_nonfinite": true`` beside it (tensorboard and W&B get
        the value)."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": step}
        values = {k: float(v) for k, v in scalars.items()}
        for k, v in values.items():
            self._writer.add_scalar(k, v, step)
            row[k] = v if math.isfinite(v) else None
            if not math.isfinite(v):
                row[f"{k}_nonfinite"] = True
        with _space_errors(self._jsonl_path, step):
            self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
            self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def log_samples(self, step: int, samples: Sequence[tuple[str, str]]) -> None:
        """Generation samples ``(prompt, reply)`` of one evaluation: one
        ``samples.jsonl`` line each (``{"step", "prompt", "reply"}``), a tensorboard
        text entry ``samples`` and, with W&B, the table ``samples`` holding every
        sample logged so far (a W&B table is immutable, so each evaluation logs the
        grown one; the newest shows the run's history)."""
        if not self.enabled or not samples:
            return
        path = os.path.join(self.workdir, SAMPLES_FILE)
        with _space_errors(path, step):
            if self._samples is None:
                self._samples = open(path, "a", encoding="utf-8")  # noqa: SIM115
            for prompt, reply in samples:
                line = {"step": step, "prompt": prompt, "reply": reply}
                self._samples.write(json.dumps(line, ensure_ascii=False) + "\n")
                self._sample_rows.append([step, prompt, reply])
            self._samples.flush()
        text = "\n\n---\n\n".join(f"**prompt**: {p}\n\n**reply**: {r}" for p, r in samples)
        self._writer.add_text("samples", text, step)
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", "prompt", "reply"], data=self._sample_rows)
            self._wandb.log({"samples": table}, step=step)

    def _finish_wandb(self) -> None:
        """End the W&B run, then W&B's service (``wandb.teardown``, which waits for it).

        ``run.finish`` can return before the service has written the run's last records:
        once, under load, an offline run file read right after held no history rows.  A
        training process usually ends right after this (a cluster job's last step), so
        waiting here is what makes its run file (``wandb/offline-run-*``, what ``wandb
        sync`` uploads) complete."""
        import wandb

        self._wandb.finish()
        wandb.teardown()

    def close(self) -> None:
        """Close every sink, each even when another fails (a full disk fails the flush of
        every buffered file); the first failure is raised after, as one line."""
        if not self.enabled:
            return
        sinks = [(os.path.join(self.workdir, "tb"), self._writer.close)]
        sinks.append((self._jsonl_path, self._jsonl.close))
        if self._samples is not None:
            sinks.append((os.path.join(self.workdir, SAMPLES_FILE), self._samples.close))
        if self._wandb is not None:
            sinks.append((os.path.join(self.workdir, "wandb"), self._finish_wandb))
        first = None
        for path, close in sinks:
            try:
                with _space_errors(path, None):
                    close()
            except OSError as e:
                first = first or e
        if first is not None:
            raise first


METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def keep_through(path: str, step: int) -> None:
    """Drop the lines of a JSON-lines log (``{"step": ...}`` each) logged after ``step``,
    and a line torn by a crash, rewriting the file atomically (only when any is dropped)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [line for line in lines if _line_step(line) <= step]
    if len(kept) != len(lines):
        with atomic_files.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)


def _line_step(line: str) -> float:
    """The ``step`` of one log line; infinity (dropped) for a torn or foreign line."""
    try:
        step = json.loads(line).get("step") if line.endswith("\n") else None
    except (ValueError, AttributeError):
        step = None
    return step if isinstance(step, int) else math.inf


@contextlib.contextmanager
def _space_errors(path: str, step: int | None):
    """A full disk while writing ``path`` as one line naming it and what it holds."""
    try:
        yield
    except OSError as e:
        full = atomic_files.out_of_space(e)
        if full is None or isinstance(e, atomic_files.SpaceError):
            raise
        held = "what was written before" if step is None else f"the steps before {step}"
        raise atomic_files.space_error(path, full, f"it holds {held}") from None


def _wandb_options(wandb: Mapping[str, str] | None) -> dict[str, str]:
    """``{"project", "entity", "name"}`` with empty strings for what is not given;
    another key is a one-line error naming it."""
    options = dict.fromkeys(WANDB_FIELDS, "")
    unknown = sorted(set(wandb or {}) - set(WANDB_FIELDS))
    if unknown:
        raise ValueError(f"wandb: unknown field {unknown[0]!r}; valid fields are {WANDB_FIELDS}")
    options.update({k: str(v or "") for k, v in (wandb or {}).items()})
    return options


def _start_wandb(workdir: str, options: dict[str, str], run_config: dict[str, Any]) -> Any:
    """``wandb.init`` for this workdir's run (the id in ``wandb_run_id``, made on first
    use), files under ``{workdir}/wandb``."""
    try:
        import wandb
    except ImportError:
        raise ValueError(
            "W&B logging (wandb.project is set) needs the wandb package: pip install -e '.[wandb]'"
        ) from None
    id_path = os.path.join(workdir, WANDB_RUN_ID)
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with atomic_files.atomic_path(id_path) as tmp, open(tmp, "w") as f:
            f.write(run_id + "\n")
    return wandb.init(
        project=options["project"],
        entity=options["entity"] or None,
        name=options["name"] or None,
        config=run_config,
        dir=workdir,
        id=run_id,
        resume="allow",
    )


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
    """The train loop's one line per logged step; ``eta`` (before the last step) comes
    from ``m["step_time"]``, the mean seconds per step since the previous line."""
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}"]
    if "val_loss" in m:
        parts.append(f"val_loss {m['val_loss']:.4f}")
    parts += [
        f"lr {m['lr']:.3e}",
        f"grad_norm {m['grad_norm']:.3f}",
        f"tok/s {m['tokens_per_s']:.0f}",
        f"mfu {100 * m['mfu']:.1f}%",
        f"pack {100 * m['packing_efficiency']:.0f}%",
    ]
    if step < total and m.get("step_time", 0) > 0:
        parts.append(f"eta {format_duration(eta_seconds(step, total, 1 / m['step_time']))}")
    return " | ".join(parts)


def eta_seconds(step: int, total: int, steps_per_s: float) -> float:
    """Seconds until step ``total`` at ``steps_per_s``."""
    return max(total - step, 0) / steps_per_s


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``1h02m``, ``2d03h``: two units, the larger first."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Timer:
    """Accumulates wall time per named phase (data wait, step, checkpoint)."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out
