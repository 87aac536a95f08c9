"""Registers, spills and shared memory of compiled GPU kernels, as ``ptxas -v`` reports them.

A kernel that needs more than 255 registers per thread, or that spills
accumulators to local memory, still compiles and runs -- only slower, often
several times slower -- so no correctness test notices.  This module makes those
figures checkable: XLA's GPU compiler writes the PTX of every kernel of a
program when asked to dump (``xla_dump_to``, passed as a compile option, so no
environment variable and no restart), and ``ptxas -v`` -- the assembler XLA
itself runs, from the CUDA toolkit or the ``nvidia-cuda-nvcc`` wheel -- prints
each kernel's registers, spill bytes and static shared memory.  Triton kernels
take their shared memory dynamically, which ptxas cannot see: that size is read
from the launch sequence XLA dumps beside the PTX (``*.thunk_sequence.txt``).

Used by the kernel-resource tests (``tests/test_pallas_gpu.py``, compiled for an
H100 without a GPU through the CUDA plugin's compile-only devices) and by the
device suite's ``kernels`` section (compiled on the real GPU).  Hand-written
parsing, because nothing in jax or XLA returns these figures: ptxas' report is
plain text meant for people.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import shutil
import subprocess
import tempfile

ARCH = "sm_90a"  # Hopper with its arch-specific instructions (wgmma): what XLA targets on H100
REGISTER_LIMIT = 255  # per thread, any NVIDIA GPU since Kepler
MISSING = "needs jax's CUDA plugin and ptxas (no GPU): pip install -e '.[gpu-aot]'"


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """One kernel's figures from ``ptxas -v`` (bytes, except ``registers``)."""

    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int  # static (ptxas) + dynamic (XLA's launch)
    threads: int  # per block, as XLA launches it (0: launch not found)
    wgmma: bool  # the PTX issues Hopper's warpgroup MMA

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def problems(self, register_limit: int = REGISTER_LIMIT) -> list[str]:
        """What is wrong with this kernel's resources (empty when nothing is)."""
        out = []
        if self.registers > register_limit:
            out.append(f"{self.registers} registers > {register_limit}")
        if self.spills:
            out.append(f"spills {self.spill_stores} B stored, {self.spill_loads} B loaded")
        return out

    def summary(self) -> dict:
        return dataclasses.asdict(self)


def find_ptxas() -> str | None:
    """The ptxas XLA uses: jax's CUDA path (``CUDA_ROOT`` or the nvcc wheel), else ``PATH``."""
    try:
        from jax._src.lib import cuda_path  # private: where jax points XLA for ptxas
    except ImportError:
        cuda_path = None
    if cuda_path and os.access(os.path.join(cuda_path, "bin", "ptxas"), os.X_OK):
        return os.path.join(cuda_path, "bin", "ptxas")
    return shutil.which("ptxas")


def cuda_plugin_installed() -> bool:
    """Whether a CUDA PJRT plugin (compile-only devices, XLA's GPU compiler) is importable."""
    import importlib.util

    def found(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # no jax_plugins package at all
            return False

    return found("jax_plugins.xla_cuda12") or found("jax_plugins.xla_cuda13")


def unavailable() -> str:
    """Why kernel resources cannot be measured here ('' when they can)."""
    if not cuda_plugin_installed() or find_ptxas() is None:
        return MISSING
    return ""


_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)*\.entry\s+([\w$.]+)\s*\(", re.M)


def ptx_entries(ptx: str) -> dict[str, str]:
    """``{kernel name: its PTX}`` for each ``.entry`` of a PTX module."""
    starts = list(_ENTRY.finditer(ptx))
    bounds = [m.start() for m in starts] + [len(ptx)]
    return {m.group(1): ptx[m.start() : end] for m, end in zip(starts, bounds[1:], strict=True)}


_COMPILING = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(report: str) -> dict[str, dict[str, int]]:
    """``{entry: {registers, spill_stores, spill_loads, stack_bytes, static_shared}}`` from
    the text ``ptxas -v`` writes (non-entry functions' lines are folded into no entry)."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        if m := _COMPILING.search(line):
            current = out.setdefault(m.group(1), {})
        elif "Function properties for" in line:
            name = line.rsplit("for", 1)[1].strip()
            current = out.get(name)  # None for a callee: its figures are not an entry's
        elif current is not None and (m := _PROPERTIES.search(line)):
            stack, stores, loads = map(int, m.groups())
            current.update(stack_bytes=stack, spill_stores=stores, spill_loads=loads)
        elif current is not None and (m := _USED.search(line)):
            smem = _SMEM.search(line)
            current["registers"] = int(m.group(1))
            current["static_shared"] = int(smem.group(1)) if smem else 0
    return out


def run_ptxas(ptx: str, arch: str = ARCH, ptxas: str | None = None) -> str:
    """``ptxas -v`` on one PTX module; its report (ptxas writes it to stderr)."""
    ptxas = ptxas or find_ptxas()
    if ptxas is None:
        raise RuntimeError(f"no ptxas: {MISSING}")
    with tempfile.TemporaryDirectory(prefix="ptxas-") as tmp:
        path = os.path.join(tmp, "module.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [ptxas, f"-arch={arch}", "-O3", "-v", path, "-o", os.devnull]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout + proc.stderr


def module_resources(
    ptx: str, launch: dict[str, dict[str, int]] | None = None, arch: str = ARCH
) -> list[KernelResources]:
    """Every entry of one PTX module; ``launch``: :func:`launches` of its program."""
    report = parse_ptxas(run_ptxas(ptx, arch))
    launch = launch or {}
    out = []
    for name, text in ptx_entries(ptx).items():
        r = report.get(name)
        if r is None or "registers" not in r:
            raise RuntimeError(f"ptxas reported nothing for kernel {name}")
        out.append(
            KernelResources(
                kernel=name,
                registers=r["registers"],
                spill_stores=r.get("spill_stores", 0),
                spill_loads=r.get("spill_loads", 0),
                stack_bytes=r.get("stack_bytes", 0),
                shared_bytes=r["static_shared"] + launch.get(name, {}).get("shared_bytes", 0),
                threads=launch.get(name, {}).get("threads", 0),
                wgmma="wgmma.mma_async" in text,
            )
        )
    return out


def dump_options(directory: str) -> dict:
    """Compile options that make XLA write each kernel's PTX and its launch sequence to
    ``directory`` (from jax 0.11 PTX is an "emitter" dump, written only when its name
    matches ``xla_dump_emitter_re``; ``.*`` would also log every MLIR pass, 5x slower),
    at the optimisation level a user's compile gets whatever ``JAX_DISABLE_MOST_OPTIMIZATIONS``
    says (LLVM -O0 takes more registers: a test suite's fast setting must not change them)."""
    return {
        "xla_dump_to": directory,
        "xla_dump_emitter_re": "ptx",
        "xla_backend_optimization_level": 3,
        "xla_llvm_disable_expensive_passes": False,
    }


_LAUNCH = re.compile(
    r"\] (\S+) grid: \[[\d, ]+\] threads: \[(\d+), (\d+), (\d+)\]\s+shared_memory: (\d+) bytes"
)


def launches(thunk_sequence: str) -> dict[str, dict[str, int]]:
    """``{kernel: {threads, shared_bytes}}`` from XLA's ``*.thunk_sequence.txt`` dump: the
    launch's block size and dynamic shared memory (Triton kernels take all of theirs so)."""
    out = {}
    for m in _LAUNCH.finditer(thunk_sequence):
        x, y, z, smem = map(int, m.groups()[1:])
        out[m.group(1)] = {"threads": x * y * z, "shared_bytes": smem}
    return out


def compile_with_resources(lowered, prefixes: tuple[str, ...] = ("",), arch: str = ARCH):
    """``(compiled, [KernelResources])``: ``lowered.compile()`` with XLA dumping its PTX,
    then ptxas on each PTX module holding a kernel whose name starts with one of
    ``prefixes`` (default: every kernel of the program)."""
    with tempfile.TemporaryDirectory(prefix="xla-dump-") as tmp:
        compiled = lowered.compile(compiler_options=dump_options(tmp))
        ptx_files = sorted(glob.glob(os.path.join(tmp, "*.ptx")))
        if not ptx_files:
            raise RuntimeError("XLA wrote no PTX: not a GPU compile?")
        launch = {}
        for path in glob.glob(os.path.join(tmp, "*.thunk_sequence.txt")):
            with open(path) as f:
                launch |= launches(f.read())
        kernels = []
        for path in ptx_files:
            with open(path) as f:
                ptx = f.read()
            if any(name.startswith(prefixes) for name in ptx_entries(ptx)):
                kernels += module_resources(ptx, launch, arch)
    return compiled, [k for k in kernels if k.kernel.startswith(prefixes)]


# Mosaic GPU compiles its kernels itself (MLIR -> PTX -> cubin inside its XLA custom call),
# so XLA's dump never holds their PTX: Mosaic writes its own where these variables say,
# with the ptxas report of its own compile and the shared memory it reserves.
MOSAIC_DUMP_ENV = {
    "MOSAIC_GPU_DUMP_PTX": "1",
    "MOSAIC_GPU_DUMP_PTXAS": "1",
    "MOSAIC_GPU_DUMP_RESOURCES": "1",
}
MOSAIC_ENTRY_SUFFIX = "_mosaic_gpu_kernel"  # Mosaic's entry: <kernel_name> + this
_SMEM_SCRATCH = re.compile(r"smem_scratch_bytes=(\d+)")
_MAXNTID = re.compile(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)")


def mosaic_kernel(directory: str, stem: str) -> KernelResources:
    """One Mosaic GPU kernel's figures from its dump (``stem.ptx``, ``.ptxas``, ``.resources.txt``):
    ptxas' report of Mosaic's own compile, the block size from the PTX (``.maxntid``), the
    shared memory Mosaic reserves (all of it dynamic: ptxas sees none)."""
    read = lambda ext: open(os.path.join(directory, stem + ext)).read()  # noqa: SIM115
    ptx, report = read(".ptx"), parse_ptxas(read(".ptxas"))
    (entry,) = ptx_entries(ptx)
    r = report.get(entry)
    if r is None or "registers" not in r:
        raise RuntimeError(f"ptxas reported nothing for Mosaic GPU kernel {entry}")
    smem = _SMEM_SCRATCH.search(read(".resources.txt"))
    threads = _MAXNTID.search(ptx)
    return KernelResources(
        kernel=entry.removesuffix(MOSAIC_ENTRY_SUFFIX),
        registers=r["registers"],
        spill_stores=r.get("spill_stores", 0),
        spill_loads=r.get("spill_loads", 0),
        stack_bytes=r.get("stack_bytes", 0),
        shared_bytes=r["static_shared"] + (int(smem.group(1)) if smem else 0),
        threads=math.prod(map(int, threads.groups())) if threads else 0,
        wgmma="wgmma.mma_async" in ptx,
    )


def compile_mosaic_with_resources(lower, prefixes: tuple[str, ...] = ("",)):
    """Like :func:`compile_with_resources` for Mosaic GPU kernels: ``lower()`` (a
    ``Lowered``; the shared-memory figure is written while lowering) and ``.compile()``
    with Mosaic GPU dumping each kernel (the dump directory also goes into XLA's options,
    so the compile is never a cache hit that would dump nothing)."""
    with tempfile.TemporaryDirectory(prefix="mosaic-dump-") as tmp:
        env = {**MOSAIC_DUMP_ENV, "MOSAIC_GPU_DUMP_TO": tmp}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            lowered = lower()
            compiled = lowered.compile(compiler_options={"xla_dump_to": os.path.join(tmp, "xla")})
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        stems = sorted(n.removesuffix(".ptx") for n in os.listdir(tmp) if n.endswith(".ptx"))
        if not stems:
            raise RuntimeError("Mosaic GPU wrote no PTX: no Mosaic GPU kernel compiled?")
        kernels = [mosaic_kernel(tmp, stem) for stem in stems]
    return compiled, [k for k in kernels if k.kernel.startswith(prefixes)]
