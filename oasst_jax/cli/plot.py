"""Training curves of one or more runs in one PNG, read from their ``metrics.jsonl``.

    python -m oasst_jax.plot runs/pre10 runs/sft10 --out curves.png

Four panels (loss with ``val_loss`` markers, learning rate, gradient norm, tokens/s)
over the step, one colour per run.  ``metrics.jsonl`` is what the trainer writes
(``oasst_jax.metrics``): strict JSON, ``null`` for a non-finite value (left out of
the plot).  A resumed run appends to the same file, so a step logged twice (before
and after a restart) is drawn with its last value.  matplotlib (the ``plot`` extra)
is imported only here, with the Agg backend through its object API, so no display
and no global pyplot state are involved; the PNG is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from oasst_jax import atomic_files, cli

# (panel title, metric names drawn in it); the first name of a panel is a line, the
# others markers (evaluations are sparse)
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "val_loss")),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("tokens/s", ("tokens_per_s",)),
)
FIGSIZE = (12.0, 8.0)  # inches; 1200 x 800 pixels at the default dpi


def read_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` sorted by step, the last value of a step
    kept and ``null`` values left out.  A missing file or a line that is not a JSON
    object with an integer ``step`` is a one-line error naming the file and line."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a training workdir?)")
    by_step: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError(f"{path}:{number}: expected an object with an integer 'step'")
            for name, value in row.items():
                if name != "step" and isinstance(value, (int, float)) and value is not True:
                    by_step.setdefault(name, {})[row["step"]] = float(value)
    return {name: sorted(values.items()) for name, values in by_step.items()}


def plot_runs(run_dirs: Sequence[str], out: str, *, dpi: int = 100) -> None:
    """Draw :data:`PANELS` for every run into ``out`` (PNG), runs overlaid."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    runs = [(label, read_metrics(d)) for label, d in zip(_labels(run_dirs), run_dirs, strict=True)]
    fig = Figure(figsize=FIGSIZE, dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    for ax, (title, names) in zip(axes, PANELS, strict=True):
        for n, (label, series) in enumerate(runs):
            for k, name in enumerate(names):
                if not series.get(name):
                    continue
                steps, values = zip(*series[name], strict=True)
                style = {"marker": "o", "linestyle": "--"} if k else {}
                suffix = f" {name}" if len(names) > 1 else ""
                ax.plot(steps, values, color=f"C{n}", label=label + suffix, **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_files.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")


def _labels(run_dirs: Sequence[str]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    pairs = zip(names, run_dirs, strict=True)
    return [n if names.count(n) == 1 else os.path.normpath(d) for n, d in pairs]


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m oasst_jax.plot", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training workdir(s)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch (figure: 12 x 8 in)")
    return p


def run(args: argparse.Namespace) -> None:
    plot_runs(args.run_dirs, args.out, dpi=args.dpi)
    print(f"wrote {args.out}")


def main(argv: Sequence[str] | None = None) -> None:
    """A missing run directory or ``metrics.jsonl``, a damaged line, or no matplotlib:
    one ``error:`` line (:func:`oasst_jax.cli.run_main`)."""
    cli.run_main(run, _parser().parse_args(argv))


if __name__ == "__main__":
    main()
