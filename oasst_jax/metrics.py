"""Run logging: tensorboardX scalars, ``metrics.jsonl``, generation samples, optionally
Weights & Biases, and the stdout progress line.

Only process 0 writes.  ``metrics.jsonl`` and ``samples.jsonl`` are opened in append
mode so a resumed run continues the same files; the W&B run id is kept in
``{workdir}/wandb_run_id`` so a resumed run continues the same W&B run too (steps it
already logged before the restart are dropped by W&B with a warning).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from oasst_jax import files

WANDB_FIELDS = ("project", "entity", "name")  # a config's ``wandb`` section
WANDB_RUN_ID = "wandb_run_id"


class MetricsLogger:
    """Writes what the train loop measures to every sink, under the same names.

    ``wandb``: ``{"project", "entity", "name"}`` (empty or missing: off; ``entity``
    empty = the user's default, ``name`` empty = W&B's generated name).  ``run_config``
    (the run's whole config as a dict) becomes the W&B run's config.  ``WANDB_MODE=offline``
    writes the run under ``{workdir}/wandb`` for a later ``wandb sync``.
    """

    def __init__(
        self,
        workdir: str,
        *,
        wandb: Mapping[str, str] | None = None,
        run_config: Mapping[str, Any] | None = None,
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
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._writer = SummaryWriter(os.path.join(workdir, "tb"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
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
        if self._samples is None:
            self._samples = open(os.path.join(self.workdir, "samples.jsonl"), "a")  # noqa: SIM115
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

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
            if self._samples is not None:
                self._samples.close()
            if self._wandb is not None:
                self._wandb.finish()


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
        with files.atomic_path(id_path) as tmp, open(tmp, "w") as f:
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
