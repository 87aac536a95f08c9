"""benchmarks/device_suite.py: every section runs on the CPU (--smoke) and writes the JSON and
markdown scripts rely on; failures, budgets and killed workers become records, not crashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SUITE = os.path.join(BENCH, "device_suite.py")
SECTIONS = ("kernels", "attention", "train", "decode", "plan")
# The figures each section promises on the records that ran.
FIGURES = {
    "kernels": ("errors", "tolerances", "dtype", "causal", "packed"),
    "attention": ("impl", "seq", "batch", "fwd_ms", "fwd_tflops", "fwd_bwd_ms", "fwd_bwd_tflops"),
    "train": ("micro_batch", "tokens_per_s", "mfu", "step_time_s", "peak_bytes", "compiled_bytes"),
    "decode": ("batch", "new_tokens_per_s", "seconds"),
    "plan": ("predicted_bytes", "measured_bytes", "memory_error_pct", "time_error_pct"),
}


@pytest.fixture(scope="module")
def suite_module():
    sys.path.insert(0, BENCH)
    try:
        import device_suite

        yield device_suite
    finally:
        sys.path.remove(BENCH)


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, SUITE, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_smoke_runs_every_section(tmp_path):
    proc = _run("--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "device_suite.json").read_text())
    assert data["meta"]["env"]["backend"] == "cpu"
    for section in SECTIONS:
        records = data[section]
        ran = [r for r in records if r["ok"]]
        assert ran, f"{section}: nothing ran"
        for r in records:
            assert {"unit", "device", "ok"} <= r.keys(), r
            # what cannot run on a CPU (cuDNN, tokamax) says why; nothing else may fail
            assert r["ok"] or (r.get("skipped") and r.get("reason")), r
        for r in ran:
            missing = [k for k in FIGURES[section] if k not in r]
            assert not missing, f"{section} {r['unit']}: no {missing}"
    # no PTX in interpret mode: the kernel records say so instead of registers and spills
    assert all("interpret mode" in r["kernel_resources_reason"] for r in data["kernels"])
    packed = [r for r in data["attention"] if r["ok"] and r["packed"]]
    assert [(r["unit"], r["packed"]) for r in packed] == [("xla@32-packed4", 4)]
    # 4 equal samples a row: a quarter of the dense causal work is inside samples
    assert packed[0]["useful_fraction"] == pytest.approx(0.25)
    assert packed[0]["useful_fwd_bwd_tflops"] == pytest.approx(packed[0]["fwd_bwd_tflops"] / 4)
    skipped = {r["unit"] for s in SECTIONS for r in data[s] if r.get("skipped")}
    assert {"cudnn@32", "tokamax@32", "cudnn/selective"} <= skipped
    md = (tmp_path / "device_suite.md").read_text()
    for title in ("Kernel correctness", "Attention speed", "Train step", "Decode", "Planner"):
        assert f"## {title}" in md
    assert "| registers fwd/dq/dkv |" in md
    assert "Goals:" in md and "device_suite: 0 failed records" in proc.stdout


def test_spent_budget_skips_without_starting_workers(tmp_path):
    start = time.monotonic()
    proc = _run(
        "--smoke", "--out", str(tmp_path), "--sections", "attention,decode", "--budget-s", "0"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - start < 20  # no worker (jax import, compiles) was started
    data = json.loads((tmp_path / "device_suite.json").read_text())
    assert data["kernels"] == [] and data["train"] == []
    for r in data["attention"] + data["decode"]:
        assert r["skipped"] and r["reason"] == "time budget spent" and not r["ok"]
        assert r["device"]  # named even though no worker ran


def test_a_failing_unit_is_a_record_and_the_rest_runs(suite_module, tmp_path):
    """Two broken kernel cases: each becomes an ok=false record naming its error."""
    size = {**suite_module.SMOKE["kernels"]}
    good = size["cases"][0]
    no_packed = {k: v for k, v in good.items() if k != "packed"}
    size["cases"] = [{**good, "name": "bad-dtype", "dtype": "no-such-dtype"}, no_packed]
    job = suite_module.jobs_for("kernels", size, per_config=False)[0]
    now = time.time()
    records, env = suite_module.run_job(job, now + 300, now + 300, smoke=True)
    assert env["backend"] == "cpu"
    assert [r["unit"] for r in records] == ["bad-dtype", good["name"]]
    assert all(not r["ok"] and r["error"] for r in records)
    assert "no-such-dtype" in records[0]["error"]
    assert records[1]["error"] == "KeyError: 'packed'"
    assert "Traceback" in records[1]["traceback"]


def test_a_failing_section_setup_fails_each_unit(suite_module):
    """decode loads its weights before any unit: that error lands on every unit."""
    size = {
        **suite_module.SMOKE["decode"],
        "config": "configs/no-such-config.py",
        "batches": [1, 2],
    }
    job = suite_module.jobs_for("decode", size, per_config=False)[0]
    now = time.time()
    records, _ = suite_module.run_job(job, now + 300, now + 300, smoke=True)
    assert [r["unit"] for r in records] == ["batch1", "batch2"]
    for r in records:
        assert not r["ok"] and r["error"].startswith("FileNotFoundError: config file not found")


def test_a_killed_worker_leaves_failed_records(suite_module):
    job = suite_module.jobs_for("decode", suite_module.SMOKE["decode"], per_config=False)[0]
    now = time.time()
    records, _ = suite_module.run_job(job, now, now + 0.5, smoke=True)
    assert records == [{"unit": "batch2", "ok": False, "error": records[0]["error"]}]
    assert "killed" in records[0]["error"]


def test_budget_passes_unused_time_on(suite_module, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(suite_module.time, "time", lambda: clock[0])
    budget = suite_module.Budget(100.0, ["kernels", "train"])
    w = suite_module.WEIGHTS
    first = budget.deadline("kernels") - clock[0]
    assert first == pytest.approx(100 * w["kernels"] / (w["kernels"] + w["train"]))
    clock[0] += 1.0  # kernels finished early: train gets the rest
    budget.done("kernels")
    assert budget.deadline("train") - clock[0] == pytest.approx(99.0)


def test_pallas_records_get_speed_ratios(suite_module):
    recs = [
        {"impl": "pallas", "seq": 4096, "packed": False, "fwd_ms": 4.0, "fwd_bwd_ms": 10.0},
        {"impl": "cudnn", "seq": 4096, "packed": False, "fwd_ms": 3.0, "fwd_bwd_ms": 8.0},
        {"impl": "xla", "seq": 4096, "packed": True, "fwd_ms": 20.0, "fwd_bwd_ms": 50.0},
        {"impl": "xla", "seq": 4096, "packed": False, "ok": False, "error": "OOM"},
    ]
    suite_module.add_ratios(recs)
    assert recs[0]["vs_cudnn"] == 0.8 and recs[0]["vs_cudnn_fwd"] == 0.75
    assert "vs_xla" not in recs[0]  # the packed xla row is another shape; dense xla failed


def test_kernel_table_shows_each_kernels_registers_spills_and_shared_memory(suite_module):
    import suite_report

    def kernel(name, registers, spilled, shared, wgmma):
        return {
            "kernel": name, "registers": registers, "spill_stores": spilled,
            "spill_loads": spilled, "stack_bytes": 0, "shared_bytes": shared, "threads": 128,
            "wgmma": wgmma,
        }  # fmt: skip

    rec = {
        "unit": "bf16-causal-packed",
        "ok": True,
        "kernel_resources": [
            kernel("flash_fwd", 236, 0, 66560, True),
            kernel("flash_dq", 194, 0, 57600, True),
            kernel("flash_dkv", 255, 4, 58112, False),
        ],
    }
    header, _, row = suite_report.table("kernels", [rec])
    assert "| registers fwd/dq/dkv | spills B | smem KiB | wgmma |" in header
    assert "| 236/194/255 | 0/0/8 | 65/56/57 | y/y/n |" in row
    no_ptx = {"unit": "fp32-causal", "ok": True, "kernel_resources_reason": "interpret mode"}
    assert "| - | - | - | - |" in suite_report.table("kernels", [no_ptx])[2]
