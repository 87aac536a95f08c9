"""One-command device suite: kernel correctness, attention speed, train step, decode, planner check.

    python benchmarks/device_suite.py --out DIR [--smoke]
        [--sections kernels,attention,train,decode,plan] [--budget-s 400]
        [--isolate auto|config|section]

Writes ``DIR/device_suite.json`` (keys ``meta``, ``kernels``, ``attention``, ``train``,
``decode``, ``plan``; each section a list of records with ``unit``, ``device``, ``ok`` and
its figures; ``skipped``/``reason`` or ``error`` where ``ok`` is false) and
``DIR/device_suite.md`` (the same as tables), both rewritten atomically as each unit's
record arrives, so a run cut short still leaves what it measured.  ``--smoke`` runs every section
on the CPU at toy sizes (tests/test_device_suite.py), so the script cannot rot.

Sections (sizes in :data:`DEVICE`):
  kernels    Pallas forward and dq/dk/dv vs the XLA reference (fp32 at 'highest' precision),
             the Triton and (on Hopper) the Mosaic GPU kernels ('mosaic-' units),
             bf16 and fp32, causal and full, GQA 32:8 and a group of 6, packed segments,
             length 1000 (not a whole number of blocks); tolerances as tests/test_attention.py;
             on a GPU each kernel's registers, spill bytes, shared memory and wgmma use
             (``kernel_resources``: ptxas -v on the PTX XLA compiled, the same tiles as
             the attention section's pallas rows).
  attention  forward and fwd+bwd ms and TFLOP/s of pallas (the kernels training picks:
             Mosaic GPU on Hopper, its record's 'backend'), pallas_triton, cudnn, xla and
             tokamax's Mosaic GPU kernel (when it imports) at seq 4096/2048/8192/1024,
             32k tokens per batch, 32 q / 8 kv heads, d 128, bf16, causal; rows packed
             with 4, 1 and 8 samples at 4096 (``packed``: samples a row, 0 dense), with
             ``useful_*_tflops`` over the FLOPs inside samples next to the raw (dense-row)
             TFLOP/s; cuDNN takes packed rows as a dense mask (``note``). Pallas records
             carry ``vs_<impl>`` (fwd+bwd) and ``vs_<impl>_fwd`` speed ratios (> 1: faster).
  train      TinyLlama-1.1B shape (configs/bench_tinyllama.py), seq 4096, packed, bf16:
             tokens/s, MFU, allocator peak and compiler bytes for attention x remat, at
             the largest micro batch (<= 16) the compiler says fits 85% of the memory.
  decode     new tokens/s (prefill included) at batch 1, 8, 32, prompt 512, 128 new tokens.
  plan       the planner's peak memory and step time for each measured train config
             against the measurement (error %, and the efficiency that would match).

Every section runs in its own worker process (each train config too, on a device: the
allocator's peak cannot be reset within a process), so a crash, an out-of-memory or a
hang costs one unit, not the run.  ``--budget-s`` is shared out over the sections by
weight (time a section leaves is passed on); past its share a section starts nothing new,
and a worker still busy ``GRACE_S`` (45 s) later is killed.  The planner check always
gets 30 s (+15 s grace), so a run ends by ``budget + 90`` s at worst.

On a lent H200 the device machine has jax 0.11 + CUDA 13, flax, optax, orbax; grain,
ml_collections and tensorboardX travel as wheels in the git-ignored ``.whl/`` (only the
train, decode and plan sections need one: ml_collections, for the config and optimizer).
Prepare them once where pip reaches the index, in the repository root (about 11 MB)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \\
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \\
      --platform manylinux2014_x86_64 -d .whl \\
      grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 importlib_resources==7.1.0 \\
      ml_collections==1.1.0 tensorboardX==2.6.5 \\
      tokamax==0.0.17 einshape==1.0 qwix==0.1.8 immutabledict==4.3.1 pydantic==2.14.4 \\
      pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5

(the first two lines of names are the package's missing dependencies and theirs; the rest
is tokamax, the optional outside anchor, whose ``xprof`` import is stubbed).  Then one
device call: ``run`` with ``carry=[".whl"]``, ``timeout_s=560`` and this command (fill in
``git rev-parse --short HEAD``; a failed install still runs the kernel sections)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
      --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site GIT_COMMIT=<hash> \\
      PYTHONUNBUFFERED=1; python3 benchmarks/device_suite.py --out $OUT --budget-s 400 \\
      2>&1 | tee $OUT/device_suite.log

It ends in about 7.5 minutes (plus the machine's start), leaving the rest of a
15-minute lease for a short rerun of what the budget cut (``--sections train
--budget-s 120``) while the machine is warm, or ``give_back``.  Commit
``device_suite.md`` as ``benchmarks/results/<device>-<date>.md`` (the name is printed
last) with the JSON beside it as ``<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from suite_report import attention_name

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECTIONS = ("kernels", "attention", "train", "decode", "plan")
# Share of the remaining budget each section gets when it starts (measured guesses of need).
WEIGHTS = {"kernels": 0.14, "attention": 0.22, "train": 0.46, "decode": 0.14, "plan": 0.04}
MIN_SECTION_S = {"plan": 30.0}  # the planner check is cheap and the point of the train runs
GRACE_S = 45.0  # a worker past its section's deadline by this much is killed (a compile)
PLAN_GRACE_S = 15.0  # the planner check compiles nothing
TRACEBACK_CHARS = 3000  # of a failed unit's traceback kept in its record
POLL_S = 2.0  # how often the worker's new records are merged into the saved results
TRAIN_GRID = [  # priority order: the budget cuts from the end
    ["pallas", "selective"],
    ["cudnn", "selective"],
    ["xla", "selective"],
    ["pallas", "none"],
    ["cudnn", "none"],
    ["xla", "none"],
]


def _kernel_cases() -> list[dict]:
    """Most important first (the budget cuts from the end): the training path (bf16, causal,
    packed) on the Triton and the Mosaic GPU kernels, then dense, fp32, non-causal and a
    query group of 6 (not a power of two); Mosaic GPU takes no fp32 (Triton runs it)."""
    t, m = "pallas_triton", "pallas_mosaic"
    cases = [
        ("bf16-causal-packed", "bfloat16", True, True, 4, t),
        ("mosaic-bf16-causal-packed", "bfloat16", True, True, 4, m),
        ("bf16-causal", "bfloat16", True, False, 4, t),
        ("mosaic-bf16-causal", "bfloat16", True, False, 4, m),
        ("fp32-causal-packed", "float32", True, True, 4, t),
        ("bf16-full-packed", "bfloat16", False, True, 4, t),
        ("mosaic-bf16-full-packed", "bfloat16", False, True, 4, m),
        ("bf16-causal-packed-group6", "bfloat16", True, True, 6, t),
        ("mosaic-bf16-causal-packed-group6", "bfloat16", True, True, 6, m),
        ("fp32-causal", "float32", True, False, 4, t),
    ]
    keys = ("name", "dtype", "causal", "packed", "group", "impl")
    return [dict(zip(keys, c, strict=True)) for c in cases]


DEVICE = {
    "kernels": {"batch": 2, "seq": 1000, "kv_heads": 8, "dim": 128, "cases": _kernel_cases()},
    "attention": {
        "seqs": [4096, 2048, 8192, 1024],
        "tokens": 32768,
        "heads": 32,
        "kv_heads": 8,
        "dim": 128,
        # 'pallas' is what training runs (Mosaic GPU on Hopper: the record's 'backend'),
        # 'pallas_triton' the Triton kernels beside it.
        "impls": ["pallas", "pallas_triton", "cudnn", "xla", "tokamax"],
        "packed_seq": 4096,
        # [samples per row, impls]: most important first (the budget cuts from the end);
        # XLA's packed figure once (it materialises the scores, whatever the packing).
        "packed_grid": [
            [4, ["pallas", "pallas_triton", "cudnn", "xla"]],
            [1, ["pallas", "pallas_triton", "cudnn"]],
            [8, ["pallas", "pallas_triton", "cudnn"]],
        ],
        "repeats": 7,
        "inner": 5,
    },
    "train": {
        "config": "configs/bench_tinyllama.py",
        "seq": 4096,
        "grid": TRAIN_GRID,
        "max_mb": 16,
        "warmup": 2,
        "steps": 5,
    },
    "decode": {
        "config": "configs/bench_tinyllama.py",
        "batches": [1, 8, 32],
        "prompt": 512,
        "new_tokens": 128,
        "repeats": 3,
        "attention": "xla",  # decoding with the KV cache always uses the XLA reference
    },
}
_TOY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
SMOKE = {  # every code path once, as small and few as possible (cudnn, tokamax: skipped on CPU)
    "kernels": {
        "batch": 1,
        "seq": 40,
        "kv_heads": 1,
        "dim": 16,
        "cases": [c for c in _kernel_cases() if c["name"] in ("bf16-causal-packed", "fp32-causal")],
    },
    "attention": {
        **DEVICE["attention"],
        "seqs": [32],
        "impls": ["xla", "cudnn", "tokamax"],  # the kernels section runs the Pallas kernel
        "tokens": 32,
        "heads": 2,
        "kv_heads": 1,
        "dim": 16,
        "packed_seq": 32,
        "packed_grid": [[4, ["xla"]]],
        "repeats": 1,
        "inner": 1,
    },
    "train": {
        "config": "configs/tiny.py",
        "model": _TOY_MODEL,
        "seq": 32,
        "grid": [["xla", "selective"], ["cudnn", "selective"]],
        "max_mb": 2,
        "memory_limit": 2**30,  # the CPU reports none: a nominal one runs the micro-batch pick
        "warmup": 0,
        "steps": 2,
    },
    "decode": {
        "config": "configs/tiny.py",
        "model": _TOY_MODEL,
        "batches": [2],
        "prompt": 8,
        "new_tokens": 3,
        "repeats": 2,
        "attention": "xla",
    },
}
# XLA:CPU compiles toy programs in a third of the time without its optimisation passes, and
# its older fusion emitters halve that again (tests/conftest.py sets the same for the suite;
# XLA 0.11 has no old emitters and aborts on the flag).
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11):
    SMOKE_XLA_FLAGS += " --xla_cpu_use_fusion_emitters=false"
for _sizes in (DEVICE, SMOKE):  # the planner check reads the train section's model
    _train = _sizes["train"]
    _sizes["plan"] = {k: _train.get(k, {}) for k in ("config", "model", "seq", "grid")}


# ---------------------------------------------------------------- jobs


def attention_grid(size: dict) -> list[list]:
    """``[seq, impl, samples per row]`` units; 0 samples: dense rows, no segment ids."""
    grid = [[seq, impl, 0] for seq in size["seqs"] for impl in size["impls"]]
    seq = size["packed_seq"]
    return grid + [[seq, impl, n] for n, impls in size["packed_grid"] for impl in impls]


def unit_names(section: str, size: dict, grid: list) -> list[str]:
    if section == "kernels":
        return [c["name"] for c in size["cases"]]
    if section == "attention":
        return [attention_name(seq, impl, packed) for seq, impl, packed in grid]
    if section in ("train", "plan"):
        return [f"{impl}/{remat}" for impl, remat in grid]
    return [f"batch{b}" for b in size["batches"]]


def jobs_for(section: str, size: dict, per_config: bool) -> list[dict]:
    """The worker jobs of a section: one, or one per train config when ``per_config``."""
    if section == "kernels":
        grids = [None]
    elif section == "attention":
        grids = [attention_grid(size)]
    elif section == "decode":
        grids = [None]
    elif section == "train" and per_config:
        grids = [[g] for g in size["grid"]]
    else:
        grids = [size["grid"]]
    return [
        {"section": section, "size": size, "grid": g, "units": unit_names(section, size, g)}
        for g in grids
    ]


# ---------------------------------------------------------------- budget


class Budget:
    """Deadlines from one global budget: a starting section gets its weight's share of what
    is left (so time an earlier section did not use passes on)."""

    def __init__(self, total_s: float, sections: list[str]):
        self.end = time.time() + total_s
        self.left = list(sections)

    def deadline(self, section: str) -> float:
        now = time.time()
        weight = WEIGHTS[section] / sum(WEIGHTS[s] for s in self.left)
        share = max(0.0, self.end - now) * weight
        return now + max(share, MIN_SECTION_S.get(section, 0.0))

    def done(self, section: str) -> None:
        self.left.remove(section)


# ---------------------------------------------------------------- orchestrator


def child_env(smoke: bool, section: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # leave room for the CUDA context, cuDNN and Triton workspaces beside XLA's pool
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    if smoke or section == "plan":  # the planner is analytic: keep it off the device
        env["JAX_PLATFORMS"] = "cpu"
    if smoke:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SMOKE_XLA_FLAGS}".strip()
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    return env


def _die_with_parent() -> None:
    """In the worker, before exec (Linux): SIGKILL when the orchestrator dies, however it
    dies (the device call's timeout), so no worker is left holding the GPU."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def _read_records(path: str) -> tuple[list[dict], dict | None]:
    """``(unit records, env record)`` of a worker's JSON-lines file so far."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line still being written, or cut off by a kill
    env = next((r for r in records if r.get("unit") == "__env__"), None)
    if env:
        env = {k: v for k, v in env.items() if k != "unit"}
    return [r for r in records if r.get("unit") != "__env__"], env


def run_job(
    job: dict, deadline: float, kill_at: float, smoke: bool, on_update=None
) -> tuple[list, dict | None]:
    """Run one job in a worker process; ``(records, env record)``.  ``on_update(records)``
    sees each new record as the worker writes it (the suite saves then).  Units the worker
    never recorded (it crashed or was killed) come back as failed records."""
    job = {**job, "deadline": deadline, "kill_at": kill_at}
    with tempfile.TemporaryDirectory(prefix="device_suite_") as tmp:
        job_path, records_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "records.jsonl")
        job["records"] = records_path
        with open(job_path, "w") as f:
            json.dump(job, f)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", job_path]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env(smoke, job["section"]), preexec_fn=_die_with_parent
        )
        rc, why, seen = None, "", 0
        while rc is None:
            try:
                rc = proc.wait(timeout=max(0.1, min(POLL_S, kill_at - time.time())))
            except subprocess.TimeoutExpired:
                if time.time() >= kill_at:
                    proc.kill()
                    late = kill_at - deadline
                    rc, why = (
                        proc.wait(),
                        f"worker killed, still busy {late:.0f} s past the deadline",
                    )
            records, env = _read_records(records_path)
            if on_update and len(records) > seen:
                seen = len(records)
                on_update(records)
    done = {r["unit"] for r in records}
    why = why or f"worker exited with status {rc} before this unit"
    records += [{"unit": u, "ok": False, "error": why} for u in job["units"] if u not in done]
    return records, env


def skipped(units: list[str], reason: str) -> list[dict]:
    return [{"unit": u, "ok": False, "skipped": True, "reason": reason} for u in units]


def add_ratios(records: list[dict]) -> None:
    """On each pallas record: its speed over each other implementation's at the same shape
    (TFLOP/s ratio, > 1 = pallas faster), fwd+bwd as ``vs_<impl>``, forward ``vs_<impl>_fwd``."""
    for p in records:
        if p.get("impl") != "pallas" or not p.get("fwd_ms"):
            continue
        for r in records:
            if r is p or not r.get("fwd_ms"):
                continue
            if (r.get("seq"), r.get("packed")) == (p["seq"], p["packed"]):  # same FLOPs
                p[f"vs_{r['impl']}_fwd"] = round(r["fwd_ms"] / p["fwd_ms"], 3)
                p[f"vs_{r['impl']}"] = round(r["fwd_bwd_ms"] / p["fwd_bwd_ms"], 3)


def host_meta(args) -> dict:
    def run(cmd: list[str]) -> str | None:
        try:
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20)
            return out.stdout.strip() or None if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    smi = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "argv": sys.argv[1:],
        "smoke": args.smoke,
        "budget_s": args.budget_s,
        "python": platform.python_version(),
        "host": platform.node(),
        # the device machine gets no .git: the command passes GIT_COMMIT
        "git_commit": os.environ.get("GIT_COMMIT") or run(["git", "rev-parse", "--short", "HEAD"]),
        "nvidia_smi": run(smi),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def orchestrate(args) -> dict:
    from suite_report import markdown, results_name, write_atomic

    sizes = SMOKE if args.smoke else DEVICE
    sections = [s for s in SECTIONS if s in args.sections]
    per_config = args.isolate == "config" or (args.isolate == "auto" and not args.smoke)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "device_suite.json")
    md_path = os.path.join(args.out, "device_suite.md")
    start = time.time()
    results = {"meta": host_meta(args), **{s: [] for s in SECTIONS}}

    def save() -> None:
        results["meta"]["wall_s"] = round(time.time() - start, 1)
        device = (results["meta"].get("env") or {}).get("device_kind")
        device = device or (results["meta"]["nvidia_smi"] or "unknown").split(",")[0]
        for s in SECTIONS:  # records made here (skipped, worker lost) name the device too
            for r in results[s]:
                r.setdefault("device", device)
        write_atomic(json_path, json.dumps(results, indent=1, default=str))
        write_atomic(md_path, markdown(results))

    save()
    budget = Budget(args.budget_s, sections)
    for section in sections:
        deadline = budget.deadline(section)
        kill_at = deadline + (PLAN_GRACE_S if section == "plan" else GRACE_S)
        print(f"== {section}: {deadline - time.time():.0f} s of budget", flush=True)
        durations = []
        for job in jobs_for(section, sizes[section], per_config):
            if section == "plan":
                job["train"] = results["train"]
            expected = statistics.median(durations) if durations else 0.0
            if time.time() > deadline or time.time() + expected > kill_at:
                results[section] += skipped(job["units"], "time budget spent")
                save()
                continue
            t0, before = time.time(), list(results[section])

            def update(records, before=before, section=section) -> None:
                results[section] = before + records
                if section == "attention":
                    add_ratios(results[section])
                save()

            try:
                records, env = run_job(job, deadline, kill_at, args.smoke, update)
            except Exception as e:  # the orchestrator itself failed: say so, carry on
                records = [{"unit": u, "ok": False, "error": repr(e)} for u in job["units"]]
                env = {}
            durations.append(time.time() - t0)
            if env and section != "plan" and "env" not in results["meta"]:
                results["meta"]["env"] = env
            update(records)
        budget.done(section)
    results["meta"]["results_name"] = results_name(results)
    save()
    return results


# ---------------------------------------------------------------- worker


def worker(job_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # Pallas Triton, jax 0.11
    with open(job_path) as f:
        job = json.load(f)
    import benchlib
    import device_sections
    import jax
    from suite_report import progress

    device = jax.devices()[0].device_kind
    durations = []
    out = open(job["records"], "a")  # noqa: SIM115 -- one line per record, flushed

    written = set()

    def write(rec: dict) -> None:
        out.write(json.dumps(rec, default=str) + "\n")
        out.flush()
        written.add(rec["unit"])

    def failure(e: Exception) -> dict:
        """The error line for the table, the traceback's end for whoever reads the JSON."""
        tb = traceback.format_exc()
        print(tb[-TRACEBACK_CHARS:], file=sys.stderr, flush=True)
        return {"ok": False, "error": benchlib.error_line(e), "traceback": tb[-TRACEBACK_CHARS:]}

    write({"unit": "__env__", **device_sections.environment()})

    def emit(unit: str, fn) -> None:
        now = time.time()
        expected = statistics.median(durations) if durations else 0.0
        if now > job["deadline"] or now + expected > job["kill_at"]:
            rec = {"ok": False, "skipped": True, "reason": "time budget spent"}
        else:
            try:
                rec = fn()
            except Exception as e:  # one unit failing (OOM, lowering error) must not stop the rest
                rec = failure(e)
            rec.setdefault("ok", True)
            rec["unit_s"] = round(time.time() - now, 2)
            durations.append(time.time() - now)
        rec = {"unit": unit, "device": rec.pop("device", device), **rec}
        write(rec)
        print(f"[{job['section']}] {progress(rec)}", flush=True)

    try:
        device_sections.SECTIONS[job["section"]](job, emit)
    except Exception as e:  # the section's own set-up (e.g. decode's weights): every unit left
        rec = failure(e)
        for unit in job["units"]:
            if unit not in written:
                write({"unit": unit, "device": device, **rec})
    out.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="output directory (device_suite.json, device_suite.md)")
    ap.add_argument("--smoke", action="store_true", help="every section on the CPU, toy sizes")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--budget-s", type=float, default=400.0, help="time budget, seconds")
    ap.add_argument(
        "--isolate",
        choices=("auto", "config", "section"),
        default="auto",
        help="one worker per train config (auto: unless --smoke) or per section",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if not args.out:
        ap.error("--out DIR is required")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section {unknown[0]!r}; choose from {','.join(SECTIONS)}")
    results = orchestrate(args)
    from suite_report import markdown

    print(markdown(results), flush=True)
    failed = sum(not r.get("ok") and not r.get("skipped") for s in SECTIONS for r in results[s])
    name = results["meta"]["results_name"]
    print(f"device_suite: {failed} failed records; results in {args.out} (commit as "
          f"benchmarks/results/{name}.md)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
