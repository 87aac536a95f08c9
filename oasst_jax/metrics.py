"""Run logging: tensorboardX scalars, ``metrics.jsonl`` and the stdout progress line.

Only process 0 writes.  ``metrics.jsonl`` is opened in append mode so a
resumed run continues the same file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

import jax


class MetricsLogger:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._writer = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._writer = SummaryWriter(os.path.join(workdir, "tb"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` line of strict JSON: a NaN/Inf value is written as
        ``null`` with ``"<name>_nonfinite": true`` beside it (tensorboard gets the value)."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": step}
        for k, v in scalars.items():
            v = float(v)
            self._writer.add_scalar(k, v, step)
            row[k] = v if math.isfinite(v) else None
            if not math.isfinite(v):
                row[f"{k}_nonfinite"] = True
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
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
    return " | ".join(parts)


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
