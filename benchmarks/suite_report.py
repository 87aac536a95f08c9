"""device_suite.py's output: the markdown tables, the goal lines, progress lines, atomic writes.

Plain Python (no jax), so the orchestrator stays light; records are the dicts of
``device_suite.json`` (see device_suite.py's docstring).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable

GIB = 2**30
# The goals: Pallas fwd+bwd vs cuDNN and XLA at seq 4096, train-step MFU.
GOAL_SEQ = 4096
GOAL_VS_CUDNN = 0.9
GOAL_VS_XLA = 3.0
GOAL_MFU = 0.55


def write_atomic(path: str, text: str) -> None:
    """``text`` to a temporary file beside ``path``, renamed in: whole or not at all."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def attention_name(seq: int, impl: str, samples: int) -> str:
    """Unit name of an attention record: ``pallas@4096``, or ``pallas@4096-packed4`` for
    rows packed with 4 samples each."""
    return f"{impl}@{seq}" + (f"-packed{samples}" if samples else "")


def status(rec: dict) -> str:
    if rec.get("ok"):
        return "ok"
    if rec.get("skipped"):
        return f"skipped: {rec.get('reason', '')}"
    return f"FAIL: {rec.get('error', '')}"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _gib(value) -> str:
    return "-" if not value else f"{value / GIB:.1f}"


def _pct(value) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def _per_kernel(rec: dict, field: str, fmt: str, scale: float = 1) -> str:
    """``a/b/c`` over a kernel record's fwd, dq, dk/dv ptxas figures (``-`` without them);
    ``spills``: stored + loaded bytes; ``wgmma``: y/n."""
    kernels = rec.get("kernel_resources")
    if not kernels:
        return "-"
    values = []
    for k in kernels:
        v = k["spill_stores"] + k["spill_loads"] if field == "spills" else k[field]
        values.append(("y" if v else "n") if field == "wgmma" else fmt.format(v * scale))
    return "/".join(values)


COLUMNS: dict[str, list[tuple[str, Callable[[dict], str]]]] = {
    "kernels": [
        ("case", lambda r: r["unit"]),
        ("q/kv heads", lambda r: f"{r.get('heads', '-')}/{r.get('kv_heads', '-')}"),
        ("seq", lambda r: str(r.get("seq", "-"))),
        *[
            (name, lambda r, n=name: _num((r.get("errors") or {}).get(n), ".1e"))
            for name in ("out", "dq", "dk", "dv")
        ],
        ("tolerance", lambda r: _num(max((r.get("tolerances") or {"": None}).values()), ".0e")),
        ("registers fwd/dq/dkv", lambda r: _per_kernel(r, "registers", "{}")),
        ("spills B", lambda r: _per_kernel(r, "spills", "{}")),
        ("smem KiB", lambda r: _per_kernel(r, "shared_bytes", "{:.0f}", 1 / 1024)),
        ("wgmma", lambda r: _per_kernel(r, "wgmma", "{}")),
    ],
    "attention": [
        ("impl@seq", lambda r: r["unit"]),
        ("batch", lambda r: str(r.get("batch", "-"))),
        ("fwd ms", lambda r: _num(r.get("fwd_ms"), ".3f")),
        ("fwd TFLOP/s", lambda r: _num(r.get("fwd_tflops"), ".1f")),
        ("fwd+bwd ms", lambda r: _num(r.get("fwd_bwd_ms"), ".3f")),
        ("fwd+bwd TFLOP/s", lambda r: _num(r.get("fwd_bwd_tflops"), ".1f")),
        ("useful fwd+bwd TFLOP/s", lambda r: _num(r.get("useful_fwd_bwd_tflops"), ".1f")),
        *[
            (f"vs {impl}", lambda r, i=impl: _num(r.get(f"vs_{i}"), ".2f"))
            for impl in ("pallas_triton", "cudnn", "xla", "tokamax")
        ],
    ],
    "train": [
        ("attention/remat", lambda r: r["unit"]),
        ("micro batch", lambda r: str(r.get("micro_batch", "-"))),
        ("step s", lambda r: _num(r.get("step_time_s"), ".3f")),
        ("tokens/s", lambda r: _num(r.get("tokens_per_s"), ",.0f")),
        ("MFU", lambda r: _num(r.get("mfu"), ".1%")),
        ("peak GiB", lambda r: _gib(r.get("peak_bytes"))),
        ("compiled GiB", lambda r: _gib(r.get("compiled_bytes"))),
        ("compile s", lambda r: _num(r.get("compile_s"), ".0f")),
    ],
    "decode": [
        ("batch", lambda r: str(r.get("batch", r["unit"]))),
        ("prompt", lambda r: str(r.get("prompt", "-"))),
        ("new", lambda r: str(r.get("new_tokens", "-"))),
        ("seconds", lambda r: _num(r.get("seconds"), ".3f")),
        ("new tokens/s", lambda r: _num(r.get("new_tokens_per_s"), ",.0f")),
        ("ms/step", lambda r: _num(r.get("ms_per_token_step"), ".2f")),
    ],
    "plan": [
        ("attention/remat", lambda r: r["unit"]),
        ("micro batch", lambda r: str(r.get("micro_batch", "-"))),
        ("predicted GiB", lambda r: _gib(r.get("predicted_bytes"))),
        ("measured GiB", lambda r: _gib(r.get("measured_bytes"))),
        ("memory error", lambda r: _pct(r.get("memory_error_pct"))),
        ("predicted step s", lambda r: _num(r.get("predicted_step_s"), ".3f")),
        ("measured step s", lambda r: _num(r.get("measured_step_s"), ".3f")),
        ("time error", lambda r: _pct(r.get("time_error_pct"))),
        ("implied efficiency", lambda r: _num(r.get("implied_efficiency"), ".0%")),
    ],
}
TITLES = {
    "kernels": (
        "Kernel correctness: Pallas forward and dq/dk/dv vs the XLA reference; registers, "
        "spills and shared memory per kernel from ptxas -v on the PTX XLA compiled (the "
        "attention section's pallas rows run the same tiles: bf16, head dim 128)"
    ),
    "attention": (
        "Attention speed: causal, bf16, head dim 128 (vs: pallas's speed ratio; packedN: N "
        "samples a row, TFLOP/s count the dense causal row, useful TFLOP/s only the work "
        "inside samples; cuDNN gets packed rows as a dense [b,1,L,L] mask)"
    ),
    "train": "Train step: TinyLlama-1.1B shape, seq 4096, packed, bf16, one device",
    "decode": "Decode: new tokens/s, prefill included",
    "plan": "Planner check: analytic prediction vs measurement (error = predicted/measured - 1)",
}


def table(section: str, records: list[dict]) -> list[str]:
    cols = [*COLUMNS[section], ("status", status)]
    lines = ["| " + " | ".join(t for t, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        cells = []
        for _, fn in cols:
            try:
                cells.append(fn(r).replace("|", "\\|"))
            except (KeyError, TypeError, ValueError):
                cells.append("?")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def goals(results: dict) -> list[str]:
    """The issue's targets against what was measured (absent figures say so)."""
    att = {r["unit"]: r for r in results.get("attention", [])}
    pallas = att.get(f"pallas@{GOAL_SEQ}", {})
    lines = []
    for impl, goal in (("cudnn", GOAL_VS_CUDNN), ("xla", GOAL_VS_XLA)):
        got = pallas.get(f"vs_{impl}")
        verdict = "not measured" if got is None else ("met" if got >= goal else "NOT met")
        figure = "" if got is None else f"{got:.2f}x, "
        lines.append(f"- Pallas fwd+bwd at seq {GOAL_SEQ} >= {goal}x {impl}: {figure}{verdict}")
    mfus = [(r["mfu"], r["unit"]) for r in results.get("train", []) if r.get("ok") and "mfu" in r]
    best = max(mfus, default=None)
    verdict = "not measured" if best is None else ("met" if best[0] >= GOAL_MFU else "NOT met")
    figure = "" if best is None else f"best {best[0]:.1%} ({best[1]}), "
    lines.append(f"- train-step MFU >= {GOAL_MFU:.0%}: {figure}{verdict}")
    return lines


def header(meta: dict) -> list[str]:
    env = meta.get("env") or {}
    versions = ", ".join(
        f"{k} {env[k]}" for k in ("jax", "jaxlib", "flax", "optax", "cuda", "cudnn") if env.get(k)
    )
    device = env.get("device_kind", "unknown device")
    smoke = " (smoke run: toy sizes on the CPU; figures mean nothing)" if meta.get("smoke") else ""
    gpu = meta.get("nvidia_smi") or "-"
    commit = meta.get("git_commit") or "-"
    run = f"budget {meta.get('budget_s')} s, wall {meta.get('wall_s')} s"
    return [
        f"# Device suite: {device}, {meta.get('date', '')}{smoke}",
        "",
        f"{versions}; Python {meta.get('python', '?')}; GPU, driver, memory: {gpu}; "
        f"commit {commit}; {run}.",
    ]


def markdown(results: dict) -> str:
    lines = header(results.get("meta", {})) + ["", "Goals:", *goals(results)]
    for section in COLUMNS:
        records = results.get(section) or []
        if records:
            lines += ["", f"## {TITLES[section]}", "", *table(section, records)]
    return "\n".join(lines) + "\n"


def results_name(results: dict) -> str:
    """``<device>-<date>``, e.g. ``nvidia-h200-2026-12-01``: the name under benchmarks/results/."""
    meta = results.get("meta", {})
    device = (meta.get("env") or {}).get("device_kind", "unknown")
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return f"{slug}-{meta.get('date', '')[:10]}"


_FIGURES = (
    ("micro_batch", "mb {}", "d"),
    ("fwd_bwd_tflops", "fwd+bwd {} TFLOP/s", ".1f"),
    ("useful_fwd_bwd_tflops", "useful {} TFLOP/s", ".1f"),
    ("vs_cudnn", "vs cudnn {}", ".2f"),
    ("vs_xla", "vs xla {}", ".2f"),
    ("tokens_per_s", "{} tok/s", ",.0f"),
    ("mfu", "MFU {}", ".1%"),
    ("new_tokens_per_s", "{} new tok/s", ",.0f"),
    ("memory_error_pct", "memory {}%", "+.1f"),
    ("time_error_pct", "time {}%", "+.1f"),
    ("unit_s", "({} s)", ".1f"),
)


def progress(rec: dict) -> str:
    """One line per record for the live log."""
    parts = [f"{rec['unit']}: {status(rec)}"]
    errors = rec.get("errors")
    if errors:
        parts.append("max err " + format(max(errors.values()), ".1e"))
    for key, text, fmt in _FIGURES:
        if isinstance(rec.get(key), int | float):
            parts.append(text.format(format(rec[key], fmt)))
    return " ".join(parts)
