"""``oasst_jax.plot``: two runs' ``metrics.jsonl`` -> one PNG of the right size; bad
input is one error line."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
from conftest import REPO

from oasst_jax.cli import plot

pytest.importorskip("matplotlib")


def _run(path, steps, *, lr=1e-5, restart_at=None):
    """A synthetic run: train metrics every step, val every 5, one non-finite loss, and
    (``restart_at``) steps logged again after a restart, as a resumed run appends."""
    path.mkdir()
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 3.0 - 0.05 * step, "lr": lr * step / steps}
        row.update(grad_norm=1.0 / step, tokens_per_s=1000.0 + step)
        if step % 5 == 0:
            row["val_loss"] = 3.1 - 0.05 * step
        rows.append(row)
    rows[3].update(loss=None, loss_nonfinite=True)
    if restart_at:
        rows += [{"step": s, "loss": 9.0} for s in range(restart_at, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_two_runs_make_one_png_of_the_figure_size(tmp_path):
    a = _run(tmp_path / "pre10", 20, restart_at=18)
    b = _run(tmp_path / "sft10", 12, lr=2e-5)
    out = tmp_path / "curves.png"
    plot.main([a, b, "--out", str(out), "--dpi", "50"])
    assert _png_size(out) == (600, 400)  # 12 x 8 inches at 50 dpi
    assert out.stat().st_size > 10_000


def test_read_metrics_skips_nulls_and_keeps_the_last_value_of_a_step(tmp_path):
    series = plot.read_metrics(_run(tmp_path / "r", 20, restart_at=18))
    loss = dict(series["loss"])
    assert 4 not in loss and loss[3] == pytest.approx(2.85)  # step 4's loss was null
    assert loss[18] == loss[20] == 9.0  # re-logged after the restart
    assert [s for s, _ in series["val_loss"]] == [5, 10, 15, 20]
    assert "loss_nonfinite" not in series  # a flag, not a metric


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such run directory"),
        ("", "no such file"),
        ("{bad\n", "metrics.jsonl:1: not JSON"),
    ],
)
def test_bad_run_dir_is_one_line(tmp_path, content, message):
    run = tmp_path / "run"
    if content is not None:
        run.mkdir()
        if content:
            (run / "metrics.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        plot.main([str(run), "--out", str(tmp_path / "x.png")])
    assert str(e.value).startswith("error: ") and message in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "x.png").exists()


def test_command_line_exit_status(tmp_path):
    cmd = [sys.executable, "-m", "oasst_jax.plot", str(tmp_path / "nope"), "--out", "x.png"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
