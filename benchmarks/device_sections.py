"""The five sections of ``device_suite.py``, run inside its worker processes.

Each ``run_<section>(job, emit)`` walks the job's units (``job['units']``, names the
orchestrator computed) and calls ``emit(unit, fn)`` once per unit; ``emit`` guards the
call (an exception becomes an ``ok: false`` record), skips it once the job's deadline
has passed and appends the record to the job's JSON-lines file.  Sizes come from the
job (``device_suite.DEVICE`` / ``SMOKE``), so nothing here knows about ``--smoke``.
The config and optimizer modules (ml_collections, a wheel the device lacks) are imported
only by the sections that need them, so kernels and attention run without the wheels.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import statistics
import time

import benchlib
import jax
import jax.numpy as jnp
import numpy as np
import suite_report
from flax import linen as nn

from oasst_jax import decode, sharding
from oasst_jax.attention import gpu_backend, mosaic_gpu, ptxas
from oasst_jax.model import Llama, LlamaConfig, hidden_dropout_rates
from oasst_jax.planner import chips, memory, timing
from oasst_jax.train_step import StepConfig, build_trainer

GIB = 2**30
# Kernel tolerances, as tests/test_attention.py: errors relative to the reference's largest
# magnitude; bf16 may also be 1.5x XLA's own bf16 error against the fp32 reference.
FP32_TOL = 1e-5
BF16_TOL = 2e-2
GRAD_NAMES = ("out", "dq", "dk", "dv")
FLASH_KERNELS = ("flash_fwd", "flash_dq", "flash_dkv")  # the Pallas calls' names in the PTX
# ... and the Mosaic GPU kernels' (their PTX comes from Mosaic's own dump, not XLA's)
MOSAIC_KERNELS = ("mosaic_flash_fwd", "mosaic_flash_dq", "mosaic_flash_dkv")
# Train: fill the device's memory to this fraction by the compiler's figure; a compiled
# program above HARD_FILL is stepped down before it runs.
FILL = 0.85
HARD_FILL = 0.95


def device_kind() -> str:
    return jax.devices()[0].device_kind


def memory_stats() -> dict:
    return jax.devices()[0].memory_stats() or {}


def environment() -> dict:
    """Versions and the device, for the report's header."""
    import flax
    import jaxlib
    import optax

    env = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device_kind(),
        "device_count": jax.device_count(),
        "bytes_limit": memory_stats().get("bytes_limit"),
    }
    try:  # private, and only on CUDA builds
        from jax._src.lib import cuda_versions

        if cuda_versions is not None:
            env["cuda"] = cuda_versions.cuda_runtime_get_version()
            env["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception:  # noqa: BLE001 -- versions are a courtesy
        pass
    return env


# ---------------------------------------------------------------- kernels


def _loss_and_grads(impl: str, seg, causal: bool):
    """Jitted ``(sum(out * w), out), (dq, dk, dv)`` for a fixed non-uniform ``w``."""

    def loss(q, k, v):
        out = benchlib.attention_fn(impl, causal, seg)(q, k, v)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return (out.astype(jnp.float32) * w).sum(), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _grads(impl: str, q, k, v, seg, causal: bool, precision: str | None = None):
    """``(out, dq, dk, dv)`` of ``sum(out * w)`` for a fixed non-uniform ``w``."""
    fn = _loss_and_grads(impl, seg, causal)
    if precision:  # the reference: no TF32 on the GPU
        with jax.default_matmul_precision(precision):
            (_, out), grads = fn(q, k, v)
    else:
        (_, out), grads = fn(q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *grads)]


def resources_unavailable() -> str:
    """Why the kernels' registers/spills cannot be read here ('' when they can)."""
    if jax.default_backend() != "gpu":
        return f"the kernels run in interpret mode on {jax.default_backend()}: no PTX"
    return ptxas.unavailable()


def _pallas_grads(impl: str, q, k, v, seg, causal: bool) -> tuple[list[np.ndarray], dict]:
    """The Pallas ``(out, dq, dk, dv)`` and its kernels' ptxas figures: the program is
    compiled once, with XLA (Triton) or Mosaic GPU dumping its PTX, and that executable runs."""
    why = resources_unavailable()
    mosaic = impl == "pallas_mosaic"
    names = MOSAIC_KERNELS if mosaic else FLASH_KERNELS
    if not why:
        lower = lambda: _loss_and_grads(impl, seg, causal).lower(q, k, v)
        try:
            if mosaic:  # Mosaic GPU writes part of its dump while lowering
                compiled, kernels = ptxas.compile_mosaic_with_resources(lower, names)
            else:
                compiled, kernels = ptxas.compile_with_resources(lower(), names)
        except RuntimeError as e:  # ptxas refused or is too old: the correctness check runs
            why = f"ptxas: {benchlib.error_line(e)}"
    if why:
        return _grads(impl, q, k, v, seg, causal), {"kernel_resources_reason": why}
    (_, out), grads = compiled(q, k, v)
    kernels.sort(key=lambda r: names.index(r.kernel))
    resources = [r.summary() for r in kernels]
    return [np.asarray(x, np.float32) for x in (out, *grads)], {"kernel_resources": resources}


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1.0))


def kernel_case(size: dict, case: dict, seed: int) -> dict:
    """Pallas forward and dq/dk/dv against the XLA reference on fresh random inputs."""
    heads = size["kv_heads"] * case["group"]
    dtype = jnp.dtype(case["dtype"])
    q, k, v = benchlib.random_qkv(
        size["batch"], size["seq"], heads, size["kv_heads"], size["dim"], dtype, seed
    )
    seg = None
    if case["packed"]:  # three samples of unequal length per row
        a, b = size["seq"] // 4, size["seq"] // 2
        row = np.array([1] * a + [2] * b + [3] * (size["seq"] - a - b), np.int32)
        seg = jnp.asarray(np.tile(row, (size["batch"], 1)))
    causal, impl = case["causal"], case.get("impl", "pallas_triton")
    got, resources = _pallas_grads(impl, q, k, v, seg, causal)
    if dtype == jnp.float32:
        want = _grads("xla", q, k, v, seg, causal, precision="highest")
        tols = dict.fromkeys(GRAD_NAMES, FP32_TOL)
        xla_err = None
    else:
        upcast = (x.astype(jnp.float32) for x in (q, k, v))
        want = _grads("xla", *upcast, seg, causal, precision="highest")
        xla_bf16 = _grads("xla", q, k, v, seg, causal)
        xla_err = {n: _rel_err(r, w) for n, r, w in zip(GRAD_NAMES, xla_bf16, want, strict=True)}
        tols = {n: max(BF16_TOL, 1.5 * xla_err[n]) for n in GRAD_NAMES}
    errors = {n: _rel_err(g, w) for n, g, w in zip(GRAD_NAMES, got, want, strict=True)}
    finite = all(bool(np.isfinite(g).all()) for g in got)
    bad = [n for n in GRAD_NAMES if not errors[n] <= tols[n]]
    rec = {
        "impl": impl,
        "dtype": dtype.name,
        "causal": causal,
        "packed": case["packed"],
        "batch": size["batch"],
        "seq": size["seq"],
        "heads": heads,
        "kv_heads": size["kv_heads"],
        "head_dim": size["dim"],
        "errors": errors,
        "tolerances": tols,
        "xla_bf16_errors": xla_err,
        "finite": finite,
        **resources,
        "ok": finite and not bad,
    }
    if not rec["ok"]:
        rec["error"] = "non-finite output" if not finite else f"over tolerance: {', '.join(bad)}"
    return rec


def run_kernels(job: dict, emit) -> None:
    size = job["size"]
    for i, case in enumerate(size["cases"]):
        reason = available(case.get("impl", "pallas_triton"))
        if reason:
            emit(case["name"], lambda r=reason: {"ok": False, "skipped": True, "reason": r})
        else:
            emit(case["name"], lambda case=case, i=i: kernel_case(size, case, seed=100 + i))


# ---------------------------------------------------------------- attention speed


def available(impl: str) -> str:
    """Why ``impl`` cannot run here ('' when it can)."""
    if impl == "cudnn" and jax.default_backend() != "gpu":
        return "cuDNN needs a GPU"
    if impl == "pallas_mosaic":
        if jax.default_backend() != "gpu":
            return "Mosaic GPU kernels need a Hopper GPU (tests/test_mosaic_gpu.py interprets them)"
        device = jax.devices()[0]
        if gpu_backend(device, 128, jnp.bfloat16) != "mosaic_gpu":
            return mosaic_gpu.unavailable() or f"{device.device_kind} is not a Hopper GPU"
    if impl == "tokamax":
        if jax.default_backend() != "gpu":
            return "tokamax's flash kernels need a GPU"
        try:
            benchlib.import_tokamax()
        except ImportError as e:
            return f"tokamax does not import: {benchlib.error_line(e)}"
    return ""


def attention_unit(size: dict, seq: int, impl: str, packed: int, cache: dict) -> dict:
    """One implementation at one shape; ``packed``: samples per row (0: dense rows)."""
    batch = max(1, size["tokens"] // seq)
    key = (seq, packed)
    if key not in cache:  # one set of inputs per shape, shared by the implementations
        cache.clear()
        q, k, v = benchlib.random_qkv(
            batch, seq, size["heads"], size["kv_heads"], size["dim"], jnp.bfloat16, seed=seq
        )
        seg = jnp.asarray(benchlib.packed_segment_ids(batch, seq, packed)) if packed else None
        cache[key] = (q, k, v, seg)
    q, k, v, seg = cache[key]
    rec = {
        "impl": impl,
        "seq": seq,
        "batch": batch,
        "heads": size["heads"],
        "kv_heads": size["kv_heads"],
        "head_dim": size["dim"],
        "dtype": "bfloat16",
        "causal": True,
        "packed": packed,
    }
    reason = available(impl)
    if reason:
        return {**rec, "ok": False, "skipped": True, "reason": reason}
    if impl == "tokamax":
        rec["note"] = benchlib.import_tokamax()[1]
    if impl == "cudnn" and packed:
        rec["note"] = benchlib.CUDNN_PACKED_NOTE
    if impl == "pallas":  # which kernels plain 'pallas' picked on this device
        rec["backend"] = gpu_backend(jax.devices()[0], size["dim"], jnp.bfloat16)
    figures = benchlib.measure_attention(
        impl,
        q,
        k,
        v,
        causal=True,
        segment_ids=seg,
        repeats=size["repeats"],
        inner=size["inner"],
    )
    return {**rec, **figures}


def run_attention(job: dict, emit) -> None:
    size, cache = job["size"], {}
    for seq, impl, packed in job["grid"]:
        emit(
            suite_report.attention_name(seq, impl, packed),
            lambda s=seq, i=impl, p=packed: attention_unit(size, s, i, p, cache),
        )


# ---------------------------------------------------------------- train step


def load_model(size: dict) -> tuple[object, LlamaConfig]:
    """The section's training config and its model with ``size['model']`` overrides."""
    from oasst_jax.config import load_config, model_config  # ml_collections: a carried wheel

    cfg = load_config(os.path.join(benchlib.ROOT, size["config"]))
    return cfg, dataclasses.replace(model_config(cfg), **size.get("model", {}))


def single_device_layout(mb: int, remat: str) -> memory.Layout:
    return memory.Layout(dict.fromkeys(sharding.MESH_AXES, 1), mb, remat)


def guess_bytes(model_cfg: LlamaConfig, mb: int, seq: int) -> float:
    """The planner's memory model with flash attention's own terms: the cuDNN and Pallas
    kernels keep no ``seq x seq`` scores (the planner charges them to Pallas, as its
    ahead-of-time compile uses XLA attention).  Only a first guess: the compiler checks it."""
    flash = model_cfg.attention_impl != "xla"
    cfg = dataclasses.replace(model_cfg, attention_impl="cudnn") if flash else model_cfg
    layout = single_device_layout(mb, model_cfg.remat_policy)
    total = memory.jax_memory(cfg, layout, seq, max(mb, 1)).total
    if flash and model_cfg.remat_policy == "none":  # probabilities saved by XLA attention only
        total -= (
            memory.ATTN_SAVED_BYTES
            * mb
            * model_cfg.num_attention_heads
            * seq
            * seq
            * model_cfg.num_hidden_layers
        )
    return total


def compiled_bytes(compiled) -> int | None:
    """Arguments + outputs - donated + temporaries of a compiled program (its device peak
    by the compiler's buffer assignment); None where the backend gives no analysis."""
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    return int(
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        - ma.alias_size_in_bytes
        + ma.temp_size_in_bytes
    )


def _compile_step(cfg, model_cfg: LlamaConfig, mb: int, seq: int, mesh) -> dict:
    from oasst_jax import optim  # ml_collections: a carried wheel

    tx = optim.make_optimizer(cfg.optim, cfg.train_iters)
    rates = hidden_dropout_rates(model_cfg.num_hidden_layers, cfg.hidden_dropout, cfg.lima_dropout)
    step_cfg = StepConfig(1, mb, cfg.loss_normalization, cfg.seed)
    trainer = build_trainer(
        Llama(model_cfg), tx, optim.schedule(cfg.optim, cfg.train_iters), step_cfg, rates, mesh
    )
    batch = benchlib.random_packed_batch(1, mb, seq, model_cfg.vocab_size)
    abstract = {
        k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.batch_sharding)
        for k, x in batch.items()
    }
    start = time.perf_counter()
    compiled = trainer.step.lower(trainer.abstract_state, abstract).compile()
    return {
        "mb": mb,
        "trainer": trainer,
        "compiled": compiled,
        "batch": batch,
        "compile_s": time.perf_counter() - start,
        "bytes": compiled_bytes(compiled),
    }


def pick_micro_batch(model_cfg: LlamaConfig, seq: int, cap: int, limit: int | None) -> int:
    if limit is None:
        return cap
    fits = [mb for mb in range(1, cap + 1) if guess_bytes(model_cfg, mb, seq) <= FILL * limit]
    return fits[-1] if fits else 1


def _extrapolate(model_cfg: LlamaConfig, seq: int, probe: dict, limit: int, cap: int) -> int:
    """Micro batch filling ``FILL`` of ``limit``: compiled bytes are the planner's fixed part
    (state, gradients, casts) plus a per-row slope taken from the probe."""
    fixed = memory.jax_memory(model_cfg, single_device_layout(0, model_cfg.remat_policy), seq, 1)
    per_row = max((probe["bytes"] - fixed.total) / probe["mb"], 1.0)
    return int(max(1, min(cap, (FILL * limit - fixed.total) // per_row)))


def compile_largest(cfg, model_cfg, seq: int, cap: int, mesh, limit) -> tuple[dict, list]:
    """The compiled step for the largest micro batch that fits: the analytic guess, then at
    most one more compile, up (guess left over half the memory) or down (guess too big)."""
    first = _compile_step(cfg, model_cfg, pick_micro_batch(model_cfg, seq, cap, limit), seq, mesh)
    tried = [(first["mb"], first["bytes"], round(first["compile_s"], 1))]
    if limit is None or first["bytes"] is None:
        return first, tried
    over = first["bytes"] > HARD_FILL * limit
    room = first["bytes"] < 0.5 * limit and first["mb"] < cap
    if not (over and first["mb"] > 1) and not room:
        return first, tried
    target = _extrapolate(model_cfg, seq, first, limit, cap)
    if over:
        target = min(target, first["mb"] - 1)
    if target == first["mb"] or (room and target < first["mb"]):
        return first, tried
    second = _compile_step(cfg, model_cfg, target, seq, mesh)
    tried.append((second["mb"], second["bytes"], round(second["compile_s"], 1)))
    if second["bytes"] <= HARD_FILL * limit or over:
        return second, tried
    return first, tried


def _timed_steps(c: dict, size: dict) -> tuple[list[float], dict]:
    """Fresh state, one call plus ``warmup`` untimed steps, then ``steps`` timed ones."""
    trainer, step = c["trainer"], c["compiled"]
    state = trainer.init_random(jax.random.key(0))
    batch = {k: jax.device_put(x, trainer.batch_sharding) for k, x in c["batch"].items()}
    for _ in range(1 + size["warmup"]):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(size["steps"]):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times, {k: float(v) for k, v in metrics.items()}


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def train_unit(size: dict, impl: str, remat: str) -> dict:
    cfg, base = load_model(size)
    model_cfg = dataclasses.replace(base, attention_impl=impl, remat_policy=remat)
    seq = size["seq"]
    limit = memory_stats().get("bytes_limit") or size.get("memory_limit")
    rec = {"attention": impl, "remat": remat, "seq": seq, "params": model_cfg.num_params()}
    reason = available(impl)
    if reason:
        return {**rec, "ok": False, "skipped": True, "reason": reason}
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    with jax.set_mesh(mesh):
        c, tried = compile_largest(cfg, model_cfg, seq, size["max_mb"], mesh, limit)
        oom = None
        try:
            times, metrics = _timed_steps(c, size)
        except Exception as e:  # out of memory despite the compiler's figure: halve, once
            if not _is_oom(e) or c["mb"] == 1:
                raise
            oom = benchlib.error_line(e)
        if oom:  # outside the handler, so the failed attempt's arrays are freed first
            gc.collect()
            rec.update(oom_at_micro_batch=c["mb"], oom_error=oom, peak_includes_oom=True)
            c = _compile_step(cfg, model_cfg, c["mb"] // 2, seq, mesh)
            tried.append((c["mb"], c["bytes"], round(c["compile_s"], 1)))
            times, metrics = _timed_steps(c, size)
    dt = statistics.median(times)
    tokens = c["mb"] * seq
    loss = metrics["loss"]
    rec.update(
        micro_batch=c["mb"],
        tried=[{"micro_batch": m, "compiled_bytes": b, "compile_s": s} for m, b, s in tried],
        compile_s=round(c["compile_s"], 2),
        step_time_s=dt,
        step_times_s=[round(t, 5) for t in times],
        tokens_per_step=tokens,
        tokens_per_s=tokens / dt,
        mfu=model_cfg.flops_per_token(seq) * tokens / dt / cfg.peak_flops_per_device,
        peak_flops_per_device=cfg.peak_flops_per_device,
        peak_bytes=memory_stats().get("peak_bytes_in_use"),
        compiled_bytes=c["bytes"],
        bytes_limit=limit,
        loss=loss,
        grad_norm=metrics.get("grad_norm"),
        ok=math.isfinite(loss),
    )
    if not rec["ok"]:
        rec["error"] = f"non-finite loss {loss}"
    return rec


def run_train(job: dict, emit) -> None:
    size = job["size"]
    for impl, remat in job["grid"]:
        emit(f"{impl}/{remat}", lambda i=impl, r=remat: train_unit(size, i, r))


# ---------------------------------------------------------------- decode


def decode_unit(size: dict, batch: int, params, model_cfg: LlamaConfig) -> dict:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, model_cfg.vocab_size, (batch, size["prompt"])).tolist()
    sp = decode.SamplingParams(max_new_tokens=size["new_tokens"])
    runs, start = [], time.perf_counter()
    for _ in range(size["repeats"]):  # each call compiles (cached after the first), then times
        runs.append(decode.generate(params, model_cfg, prompts, sp, stop_ids=()))
        if len(runs) == 1:
            compile_s = time.perf_counter() - start - runs[0].seconds
    seconds = statistics.median(g.seconds for g in runs[1:] or runs)
    new = sum(len(r) for r in runs[-1].ids)
    return {
        "batch": batch,
        "prompt": size["prompt"],
        "new_tokens": size["new_tokens"],
        "generated": new,
        "seconds": seconds,
        "seconds_runs": [round(g.seconds, 4) for g in runs],
        "new_tokens_per_s": new / seconds,
        "ms_per_token_step": 1e3 * seconds / size["new_tokens"],
        "compile_s": round(compile_s, 2),
        "ok": new == batch * size["new_tokens"],
    }


def run_decode(job: dict, emit) -> None:
    size = job["size"]
    _, model_cfg = load_model(size)
    model_cfg = dataclasses.replace(model_cfg, attention_impl=size["attention"])
    model = Llama(decode.inference_config(model_cfg))
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
    params = nn.meta.unbox(init(jax.random.key(0)))
    for batch in size["batches"]:
        emit(f"batch{batch}", lambda b=batch: decode_unit(size, b, params, model_cfg))


# ---------------------------------------------------------------- planner check


def chip_for(kind: str, peak_flops: float, hbm: float | None) -> tuple[chips.Chip, str]:
    """The planner's chip for a device kind ('NVIDIA H200' -> h200); unknown kinds (the CPU
    of a smoke run) get a nominal chip with the config's peak and the measured limit."""
    for name in sorted(chips.CHIPS, key=len, reverse=True):
        if name in kind.lower().replace(" ", ""):
            return chips.CHIPS[name], name
    nominal = chips.Chip("nominal", "gpu", peak_flops, hbm or 16 * GIB, 1e11, 1e10, 1)
    return nominal, "nominal"


def plan_unit(size: dict, measured: dict | None, impl: str, remat: str) -> dict:
    cfg, base = load_model(size)
    model_cfg = dataclasses.replace(base, attention_impl=impl, remat_policy=remat)
    seq = size["seq"]
    rec = {"attention": impl, "remat": remat, "seq": seq}
    if not measured or not measured.get("ok"):
        why = (measured or {}).get("reason") or (measured or {}).get("error") or "not run"
        return {**rec, "ok": False, "skipped": True, "reason": f"no train measurement ({why})"}
    mb = measured["micro_batch"]
    kind = measured.get("device", "")
    chip, chip_name = chip_for(kind, cfg.peak_flops_per_device, measured.get("bytes_limit"))
    layout = single_device_layout(mb, remat)
    table = memory.param_table(model_cfg)
    mem = memory.jax_memory(model_cfg, layout, seq, mb, table)
    per_device = memory.sharded_elements(table, layout.mesh)
    t = timing.estimate_time(model_cfg, layout, chip, seq, mb, per_device)
    peak = measured.get("peak_bytes") or measured.get("compiled_bytes")
    step = measured["step_time_s"]
    hw_flops = timing.hardware_flops_per_token(model_cfg, seq, remat) * mb * seq
    err = lambda pred, meas: None if not meas else round(100.0 * (pred / meas - 1.0), 1)  # noqa: E731
    return {
        **rec,
        "device": kind,
        "chip": chip_name,
        "micro_batch": mb,
        "predicted_bytes": mem.total,
        "predicted": {k: v for k, v in dataclasses.asdict(mem).items() if k != "notes"},
        "measured_bytes": peak,
        "measured_from": "allocator peak" if measured.get("peak_bytes") else "compiler",
        "compiled_bytes": measured.get("compiled_bytes"),
        "memory_error_pct": err(mem.total, peak),
        "predicted_step_s": t.step_s,
        "measured_step_s": step,
        "time_error_pct": err(t.step_s, step),
        "planner_efficiency": timing.EFFICIENCY,
        # the efficiency (fraction of peak) at which the planner's time would match
        "implied_efficiency": hw_flops / (step * chip.peak_flops),
        "ok": True,
    }


def run_plan(job: dict, emit) -> None:
    size = job["size"]
    measured = {f"{r.get('attention')}/{r.get('remat')}": r for r in job.get("train", [])}
    for impl, remat in job["grid"]:
        name = f"{impl}/{remat}"
        emit(name, lambda i=impl, r=remat, n=name: plan_unit(size, measured.get(n), i, r))


SECTIONS = {
    "kernels": run_kernels,
    "attention": run_attention,
    "train": run_train,
    "decode": run_decode,
    "plan": run_plan,
}
