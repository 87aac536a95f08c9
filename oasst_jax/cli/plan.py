"""``python -m oasst_jax.plan --config=configs/sft10.py --mesh tensor=8,pipeline=4``.

Answers before renting hardware: does a layout fit, how fast will it be, and
which layout is best.  Flags:

* ``--topology v5p:2x4x4`` compiles the real train step for abstract TPU devices
  (the real TPU compiler, via libtpu: ``pip install -e '.[plan]'``) and reports
  its per-device HBM; ``--topology h100:8`` (``h100:1``, ``h100:32`` = 4 hosts x 8,
  ``h200:N``, ``a100:N``) does the same with XLA's GPU compiler for abstract
  GPUs (jax's CUDA plugin in compile-only mode, no GPU needed:
  ``pip install -e '.[gpu-aot]'``), with ``attention_impl='pallas'`` built as the
  kernels a run there would use (Mosaic GPU on H100/H200 with jax >= 0.11, else
  the Triton kernels); without a topology the step is compiled for emulated
  CPU devices, which proves it compiles and shards but whose memory figures are
  not predictive.
* ``--search`` enumerates layouts for the device count, prunes and ranks them
  with the analytic models and compiles the best ``--compile_top`` for the topology.
* ``--chip h100`` picks the accelerator for the analytic verdicts (default: the
  topology's chip, else H100) -- with a GPU chip the model card's Megatron
  layout is modelled too (Korthikanti et al. 2022, :mod:`oasst_jax.planner.memory`).
* ``--json`` prints only JSON lines.  The last stdout line is always one JSON
  object (scripts rely on it) with ``peak_bytes_per_device``,
  ``param_bytes_per_device``, ``optimizer_bytes_per_device``,
  ``temp_bytes_per_device``, ``flops_per_step`` and ``mesh``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import ml_collections

from oasst_jax import sharding
from oasst_jax.config import micro_steps, model_config
from oasst_jax.model import LlamaConfig
from oasst_jax.planner import chips, lora, memory, search, timing

GIB = 2**30


def parse_mesh(text: str) -> dict[str, int]:
    """``tensor=8,pipeline=4`` -> all five axes (unnamed ones 1; a ``-1`` is kept)."""
    sizes = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise ValueError(f"plan: bad --mesh item {item!r}; use e.g. tensor=8,pipeline=4")
        sizes[name] = int(value)
    try:
        return sharding.mesh_shape(sizes)
    except ValueError as e:
        raise ValueError(f"plan: bad --mesh {text!r}: {e}") from None


def check_batch(cfg: ml_collections.ConfigDict, sizes: dict[str, int], n: int) -> None:
    """The global batch must be whole micro-batches on the mesh's data replicas (else no
    step exists: zero micro-steps); one line names what to change."""
    dp = sharding.axis_size(sizes, "batch")
    try:
        micro_steps(cfg.global_batch_size, cfg.micro_batch_size, dp)
    except ValueError as e:
        raise ValueError(
            f"plan: {e} on {n} devices (mesh {sizes}); pick the devices with --mesh, "
            "--devices or --topology, or change the batch sizes"
        ) from None


def config_layout(cfg: ml_collections.ConfigDict, mesh: dict[str, int]) -> memory.Layout:
    return memory.Layout(mesh, cfg.micro_batch_size, cfg.model.remat_policy)


def prepare_environment(devices: int) -> None:
    """Before jax starts its backends: CPU platform with ``devices`` emulated devices, and
    libtpu told it runs without hardware (silences its start-up error)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"


def analytic_record(
    model_cfg: LlamaConfig, cfg, layout: memory.Layout, chip: chips.Chip, efficiency: float
) -> dict:
    """This trainer's analytic memory and time for ``layout`` on ``chip``."""
    table = memory.param_table(model_cfg)
    mem, t = search.model_layout(
        model_cfg,
        layout,
        chip,
        cfg.seq_length,
        cfg.global_batch_size,
        efficiency,
        table,
        lora.LoraSpec.from_config(cfg),
    )
    return {
        "mesh": dict(layout.mesh),
        "micro_batch_size": layout.micro_batch_size,
        "remat": layout.remat,
        "chip": chip.name,
        "hbm_bytes": chip.hbm_bytes,
        "analytic": memory_dict(mem),
        "analytic_bytes_per_device": mem.total,
        "analytic_fits": mem.total <= chip.hbm_bytes,
        "flops_per_step": t.flops_per_step,
        "step_time_s": t.step_s,
        "mfu": t.mfu,
        "dominant": t.dominant(),
        "notes": list(mem.notes),
        "efficiency": efficiency,
        "overrides": layout.overrides(),
    }


def memory_dict(mem: memory.MemoryEstimate) -> dict:
    return {
        "params": mem.params,
        "optimizer": mem.optimizer,
        "grads": mem.grads,
        "activations": mem.activations,
        "transient": mem.transient,
        "total": mem.total,
    }


def megatron_record(model_cfg: LlamaConfig, cfg, layout, chip: chips.Chip, eff: float) -> dict:
    """The model card's run: Megatron-LLM, TP + SP, 1F1B, no distributed optimizer."""
    model_cfg = LlamaConfig(**{**model_cfg.__dict__, "attention_impl": "pallas"})
    mem = memory.megatron_memory(
        model_cfg, layout, cfg.seq_length, cfg.global_batch_size, dropout=cfg.hidden_dropout > 0
    )
    first, _ = memory.megatron_param_counts(
        model_cfg, layout.mesh[sharding.TENSOR], layout.mesh[sharding.PIPELINE]
    )
    t = timing.estimate_time(
        model_cfg, layout, chip, cfg.seq_length, cfg.global_batch_size, first, "megatron", eff
    )
    return {
        "framework": "megatron",
        "chip": chip.name,
        "hbm_bytes": chip.hbm_bytes,
        "analytic": memory_dict(mem),
        "analytic_bytes_per_device": mem.total,
        "headroom_bytes": chip.hbm_bytes - mem.total,
        "fits": mem.total <= chip.hbm_bytes,
        "notes": list(mem.notes),
        "step_time_s": t.step_s,
        "mfu": t.mfu,
        "dominant": t.dominant(),
    }


def compile_record(cfg, layout: memory.Layout, target: Target) -> dict:
    """Compile ``layout`` for the target's devices; per-device figures from the compiler
    (a refusal other than out-of-memory: one line, and the analytic figures stand)."""
    from oasst_jax.planner import aot

    if target.refused:
        return {"compile_refused": target.refused}
    devices = target.devices or aot.cpu_devices(target.num_devices)
    try:
        r = aot.compile_step(cfg, layout, devices)
    except chips.CompileRefused as e:
        if not target.devices:  # CPU emulation refusing is a bug, not a verdict
            raise
        return {"compile_refused": str(e)}
    return {
        "backend": r.backend,
        "device_kind": r.device_kind,
        "memory_predictive": r.backend in ("tpu", "gpu"),
        "argument_bytes_per_device": r.argument_bytes,
        "output_bytes_per_device": r.output_bytes,
        "alias_bytes_per_device": r.alias_bytes,
        "param_bytes_per_device": r.param_bytes,
        "optimizer_bytes_per_device": r.optimizer_bytes,
        "temp_bytes_per_device": r.temp_bytes,  # gradients, activations, workspaces
        "peak_bytes_per_device": r.peak_bytes,
        "compiler_capacity_bytes": r.capacity_bytes or target.capacity_bytes,
        "compile_error": r.error,
        "compile_s": r.compile_s,
        "attention_impl_compiled": r.attention_impl,
        "kernel_calls": r.kernel_calls,
        "kernel_kinds": list(r.kernel_kinds),
    }


def finish(rec: dict) -> dict:
    """Fill the last-line contract when nothing was compiled, and the verdicts."""
    a = rec["analytic"]
    rec.setdefault("param_bytes_per_device", a["params"])
    rec.setdefault("optimizer_bytes_per_device", a["optimizer"])
    rec.setdefault("temp_bytes_per_device", a["grads"] + a["activations"] + a["transient"])
    rec.setdefault("peak_bytes_per_device", a["total"])
    rec.setdefault("memory_predictive", True)
    if rec.get("backend") in ("tpu", "gpu"):
        capacity = rec.get("compiler_capacity_bytes") or rec["hbm_bytes"]
        rec["fits"] = rec["peak_bytes_per_device"] <= capacity
        rec["fits_by"] = f"{rec['backend'].upper()} compiler"
        rec["analytic_error"] = a["total"] / rec["peak_bytes_per_device"] - 1
    else:  # CPU emulation says nothing about HBM; a refused compile leaves the model
        rec["fits"] = rec["analytic_fits"]
        rec["fits_by"] = "analytic model"
    return rec


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:7.2f} GiB"


def attention_label(rec: dict) -> str:
    """Which attention the compiled program holds: a config's ``pallas`` is the Mosaic
    kernel on TPU, the Mosaic GPU or Triton kernels on GPU (``planner.aot``), but XLA
    attention under CPU emulation."""
    impl, calls = rec["attention_impl_compiled"], rec["kernel_calls"]
    if not calls:
        return impl
    found = ", ".join(f"{name} x{n}" for name, n in sorted(calls.items()))
    return f"{impl} ({' + '.join(rec['kernel_kinds'])} kernel calls: {found})"


def describe(rec: dict) -> list[str]:
    """Human-readable block for one layout."""
    a = rec["analytic"]
    lines = [f"layout {memory.Layout(rec['mesh'], rec['micro_batch_size'], rec['remat']).label()}"]
    if "backend" in rec:
        tag = "" if rec["memory_predictive"] else "  [CPU emulation: NOT PREDICTIVE of HBM use]"
        lines.append(
            f"  compiled for {rec['device_kind']} in {rec['compile_s']:.0f} s, "
            f"{attention_label(rec)} attention{tag}"
        )
        if rec["compile_error"]:
            lines.append(f"  compiler: {rec['compile_error']}")
    if "compile_refused" in rec:
        lines.append(f"  not compiled: {rec['compile_refused']}; figures are ANALYTIC")
    rows = [
        ("params", rec["param_bytes_per_device"], a["params"]),
        ("optimizer state", rec["optimizer_bytes_per_device"], a["optimizer"]),
        ("grads + accumulators", None, a["grads"]),
        ("activations (saved)", None, a["activations"]),
        ("transients", None, a["transient"]),
        ("temporaries (compiler)", rec["temp_bytes_per_device"], None),
        ("total / peak", rec["peak_bytes_per_device"], a["total"]),
    ]
    lines.append(f"  {'per device':24s} {'compiled':>11s} {'analytic':>11s}")
    for name, got, est in rows:
        lines.append(f"  {name:24s} {gib(got):>11s} {gib(est):>11s}")
    lines += [f"  {note}" for note in rec.get("notes", ())]
    verdict = "fits" if rec["fits"] else "DOES NOT FIT"
    hbm = rec.get("compiler_capacity_bytes") or rec["hbm_bytes"]
    lines.append(f"  {rec['chip']} HBM {gib(hbm)}: {verdict} ({rec['fits_by']})")
    if rec.get("backend") == "gpu":
        lines.append(f"  {GPU_MEMORY_NOTE}")
    if "analytic_error" in rec:
        lines.append(f"  analytic vs {rec['fits_by']}: {rec['analytic_error']:+.1%}")
    lines.append(
        f"  {rec['flops_per_step']:.3e} model FLOPs/step; at {rec['efficiency']:.0%} of peak: "
        f"step {rec['step_time_s']:.2f} s, MFU {rec['mfu']:.1%} ({rec['dominant']})"
    )
    return lines


def describe_megatron(rec: dict, layout: memory.Layout) -> list[str]:
    a = rec["analytic"]
    return [
        f"model card layout on {rec['chip']} (Megatron-LLM, TP+SP, 1F1B, analytic): "
        f"{layout.label()}",
        f"  bf16 weights {gib(a['params'])}, fp32 grads {gib(a['grads'])}, "
        f"fp32 master+Adam {gib(a['optimizer'])}",
        f"  activations {gib(a['activations'])} ({rec['notes'][0]}), logits {gib(a['transient'])}",
        f"  total {gib(a['total'])} of {gib(rec['hbm_bytes'])}: "
        f"{'fits' if rec['fits'] else 'DOES NOT FIT'}, headroom {gib(rec['headroom_bytes'])}",
        f"  step {rec['step_time_s']:.2f} s, MFU {rec['mfu']:.1%} ({rec['dominant']})",
    ]


GPU_MEMORY_NOTE = (
    "(jax takes 75 % of a GPU's memory at start unless XLA_PYTHON_CLIENT_MEM_FRACTION "
    "is raised, e.g. to 0.95)"
)


@dataclasses.dataclass(frozen=True)
class Target:
    """What is planned for: the chip, its device count, and abstract devices if any."""

    chip: chips.Chip
    num_devices: int
    devices: list | None  # abstract TPU/GPU devices; None = analytic / CPU emulation
    efficiency: float
    refused: str = ""  # why the compile-only client gave no devices (figures stay analytic)
    capacity_bytes: int | None = None  # memory the GPU target describes


def make_target(topology: str, chip_name: str, mesh, devices_hint: int, efficiency) -> Target:
    """The chip and devices a plan is for: a TPU slice (libtpu), GPU hosts (the CUDA
    plugin), or, without a topology, a device count for CPU emulation or search."""
    from oasst_jax.planner import aot

    chip = chips.chip(chip_name or topology or "h100")
    if not topology:
        n = math.prod(mesh.values()) if mesh else devices_hint
        return Target(chip, n, None, efficiency)
    if chips.chip(topology).platform == "tpu":
        devices = aot.tpu_devices(topology)
        return Target(chip, len(devices), devices, efficiency)
    gpu, hosts, per_host = chips.gpu_topology(topology)
    capacity = chips.target_memory_bytes(chips.target_config(gpu))
    try:
        devices = chips.gpu_devices(topology)
    except chips.CompileRefused as e:
        return Target(chip, hosts * per_host, None, efficiency, str(e), capacity)
    return Target(chip, len(devices), devices, efficiency, "", capacity)


def ranking_key(rec: dict) -> tuple:
    """Fitting layouts fastest first, then the rest by memory (closest to fitting)."""
    return (not rec["fits"], rec["step_time_s"] if rec["fits"] else rec["peak_bytes_per_device"])


def table_lines(records: list[dict]) -> list[str]:
    lines = [
        f"{'rank':>4s}  {'layout':34s} {'analytic':>11s} {'compiled':>11s} "
        f"{'fits':>5s} {'step s':>7s} {'MFU':>6s}"
    ]
    for i, r in enumerate(records):
        lay = memory.Layout(r["mesh"], r["micro_batch_size"], r["remat"]).label()
        comp = gib(r["peak_bytes_per_device"]) if "backend" in r else "-"
        lines.append(
            f"{i + 1:4d}  {lay:34s} {gib(r['analytic_bytes_per_device']):>11s} {comp:>11s} "
            f"{str(r['fits']):>5s} {r['step_time_s']:7.2f} {r['mfu']:6.1%}"
        )
    return lines


def run_search(cfg, target: Target, compile_top: int, say) -> list[dict]:
    """Enumerate, model and rank layouts; compile the best ``compile_top`` when TPU
    devices are given (the compiler's verdict then decides ``fits``)."""
    model_cfg = model_config(cfg)
    seq, batch = cfg.seq_length, cfg.global_batch_size
    layouts = search.enumerate_layouts(model_cfg, target.num_devices, seq, batch)
    ranked = search.rank(
        model_cfg,
        layouts,
        target.chip,
        seq,
        batch,
        target.efficiency,
        lora.LoraSpec.from_config(cfg),
    )
    fitting = sum(c.fits for c in ranked)
    say(
        f"search: {len(layouts)} valid layouts, {fitting} fit {target.chip.name} HBM x "
        f"{search.HEADROOM:.0%} by the analytic model"
    )
    if not fitting:
        state = gib(ranked[0].memory.params + ranked[0].memory.optimizer).strip()
        say(
            f"no layout fits: parameters + optimizer state alone are {state} per device on "
            f"{target.num_devices} x {target.chip.name}; the least memory-hungry are listed"
        )
    records = []
    for c in ranked[: max(compile_top, 1)]:
        rec = analytic_record(model_cfg, cfg, c.layout, target.chip, target.efficiency)
        if target.devices is not None or target.refused:
            rec.update(compile_record(cfg, c.layout, target))
        records.append(finish(rec))
    return sorted(records, key=ranking_key)


def run_single(cfg, mesh: dict[str, int], target: Target, say) -> dict:
    """Compile the config's layout (CPU emulation or TPU topology) beside the analytic
    estimate; with a GPU chip and a TP x PP x DP mesh, the Megatron (model card) figures too."""
    model_cfg = model_config(cfg)
    layout = config_layout(cfg, mesh)
    rec = analytic_record(model_cfg, cfg, layout, target.chip, target.efficiency)
    rec.update(compile_record(cfg, layout, target))
    rec = finish(rec)
    card_layout = mesh[sharding.FSDP] == mesh[sharding.SEQUENCE] == 1
    if target.chip.platform == "gpu" and card_layout and not lora.LoraSpec.from_config(cfg):
        rec["megatron"] = megatron_record(model_cfg, cfg, layout, target.chip, target.efficiency)
        say("\n".join(describe_megatron(rec["megatron"], layout)))
    say("\n".join(describe(rec)))
    return rec


def run(
    cfg,
    mesh: dict[str, int] | None,
    topology: str,
    chip_name: str,
    *,
    do_search: bool,
    efficiency: float,
    compile_top: int,
    json_only: bool,
    devices_hint: int,
) -> dict:
    """Plan (or search) and print; the returned record is the last stdout line."""
    target = make_target(topology, chip_name, mesh, devices_hint, efficiency)
    chip, n = target.chip, target.num_devices
    say = (lambda *_: None) if json_only else print
    say(
        f"plan: {model_config(cfg).num_params() / 1e9:.2f}B params, {n} x {chip.name}, seq "
        f"{cfg.seq_length}, global batch {cfg.global_batch_size}, timing at {efficiency:.0%} of "
        f"peak ({chip.peak_flops / 1e12:.0f} TFLOP/s bf16)"
    )
    if target.refused:
        say(f"not compiled: {target.refused}; the figures below are ANALYTIC")
    if not do_search:
        layers = model_config(cfg).num_hidden_layers
        sizes = sharding.resolve_mesh(mesh or cfg.mesh, n, num_layers=layers)
        check_batch(cfg, sizes, n)
        rec = run_single(cfg, sizes, target, say)
        print(json.dumps(rec))
        return rec
    records = run_search(cfg, target, compile_top, say)
    say("\n".join(table_lines(records)))
    for r in records:
        print(json.dumps(r) if json_only else "\n".join(describe(r)))
    lead = "winner: " if records[0]["fits"] else "nothing fits; least memory: "
    say(lead + " ".join(records[0]["overrides"]))
    print(json.dumps(records[0]))
    return records[0]


def run_flags(cfg: ml_collections.ConfigDict) -> None:
    """Configure the platform before jax starts a backend, then plan (flags: _define_flags)."""
    from absl import flags

    f = flags.FLAGS
    mesh = parse_mesh(f.mesh) if f.mesh else None
    fixed = mesh and -1 not in mesh.values()
    if "JAX_PLATFORMS" not in os.environ:  # jax read it at import: set the config too
        import jax

        jax.config.update("jax_platforms", "cpu")
    prepare_environment(math.prod(mesh.values()) if fixed else f.devices)
    run(
        cfg,
        mesh,
        f.topology,
        f.chip,
        do_search=f.search,
        efficiency=f.efficiency,
        compile_top=f.compile_top,
        json_only=f.json,
        devices_hint=f.devices,
    )


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("mesh", "", "mesh override, e.g. tensor=8,pipeline=4 (others 1)")
    flags.DEFINE_string(
        "topology", "", "TPU or GPU topology to compile for, e.g. v5p:2x4x4, h100:8, h100:4x8"
    )
    flags.DEFINE_string("chip", "", f"chip for the analytic verdicts: {sorted(chips.CHIPS)}")
    flags.DEFINE_integer("devices", 32, "device count when the mesh has a -1 axis")
    flags.DEFINE_bool("search", False, "search layouts for the device count")
    flags.DEFINE_integer("compile_top", 2, "--search: how many best layouts to model/compile")
    flags.DEFINE_float("efficiency", timing.EFFICIENCY, "fraction of peak FLOP/s reached")
    flags.DEFINE_bool("json", False, "print JSON lines only")


def main() -> None:
    from oasst_jax.cli import cli_main

    cli_main(
        run_flags,
        "training config file",
        define=_define_flags,
        lock_config=False,
        description="Does a layout fit, how fast will it be, and which layout is best: "
        "analytic models plus an ahead-of-time compile, before renting hardware.",
    )


if __name__ == "__main__":
    main()
