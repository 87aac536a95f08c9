"""Planner: analytic memory/time models (hand-computed cases), layout enumeration,
and AOT compiles of the tiny model for emulated CPU devices, abstract TPU devices and
abstract GPUs (XLA's GPU compiler, with the kernels a run on that GPU uses: Mosaic GPU on
H100/H200 with jax >= 0.11, the Triton kernels on A100 or older jax)."""

import dataclasses
import json
import math
import os
import types

import jax
import ml_collections
import pytest

from oasst_jax import sharding
from oasst_jax.config import load_config, model_config
from oasst_jax.model import LlamaConfig
from oasst_jax.planner import chips, lora, memory, search, timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_70b():
    return model_config(load_config(os.path.join(REPO, "configs", "pre10.py")))


def tiny_cfg():
    cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))
    cfg.seq_length = 64
    cfg.model.num_hidden_layers = 2
    return cfg


def mesh(**sizes):
    return {a: sizes.get(a, 1) for a in sharding.MESH_AXES}


def test_megatron_activation_bytes_llama70b():
    c = cfg_70b()
    h = c.hidden_size
    # norms 4h + attention (2h in, 2h q, 2*2*(h/8) k/v, 2h o-in) + MLP (2h in, 4f, 2f), f = 3.5h
    assert memory.megatron_bytes_per_token(c, "selective", False, 4096) == pytest.approx(33.5 * h)
    assert memory.megatron_bytes_per_token(c, "selective", True, 4096) == pytest.approx(35.5 * h)
    assert memory.megatron_bytes_per_token(c, "full", False, 4096) == 2 * h


def test_megatron_card_layout_by_hand():
    c = cfg_70b()
    layout = memory.Layout(mesh(tensor=8, pipeline=4), 2, "selective")
    est = memory.megatron_memory(c, layout, 4096, 64)
    h, v = c.hidden_size, c.padded_vocab_size
    per_layer_params = 2 * h * h + 2 * h * (h // 8) + 3 * h * c.intermediate_size + 2 * h
    first = 80 * per_layer_params / 4 / 8 + v * h / 8
    acts = 33.5 * h * 4096 * 2 / 8 * 20 * 4  # 20 layers/stage x 4 micro-batches in flight
    assert est.params + est.grads + est.optimizer == pytest.approx(18 * first)
    assert est.activations == pytest.approx(acts)
    assert est.total < chips.CHIPS["h100"].hbm_bytes


def test_jax_params_sharded_by_rules():
    c = model_config(tiny_cfg())
    est = memory.jax_memory(c, memory.Layout(mesh(fsdp=2, tensor=2), 2, "full"), 64, 8)
    norms = 2 * c.num_hidden_layers * c.hidden_size + c.hidden_size
    elements = (c.num_params() - norms) / 4 + norms  # every weight split 4 ways, norms replicated
    assert est.params == 4 * elements
    assert est.optimizer == 8 * elements and est.grads == 8 * elements
    # full remat: 2Th/r per layer, the residual stream split r = tensor = 2 ways (Megatron SP)
    assert est.activations == 2 * c.hidden_size * 2 * 64 * c.num_hidden_layers / 2


def test_jax_selective_activations_by_hand():
    c = model_config(tiny_cfg())  # h 128, f 256, 2 kv heads x 32
    h, f, k, t = 128, 256, 64, 2
    got = memory.activation_bytes_per_token(c, "selective", t, t)
    assert got == 2 * (2 * h / t + (h + 2 * k + 2 * f) / t)  # layer input, o-proj; q k v gate up
    assert memory.residual_split(mesh(sequence=2, tensor=4)) == 8  # res_length: sequence x tensor


def test_gpu_memory_terms_by_hand():
    """XLA:GPU's layout of a step: no weight-cast copy or separate update tree (the TPU
    compiler's), one reused fp32 logits buffer plus a mask, and the logits or one layer's
    recompute at a time, not both."""
    cfg = tiny_cfg()
    cfg.model.attention_impl = "pallas"  # no L x L buffers
    c = model_config(cfg)
    layout = memory.Layout(mesh(fsdp=2, tensor=2), 2, "full")
    gpu = memory.jax_memory(c, layout, 64, 8, platform="gpu")
    tpu = memory.jax_memory(c, layout, 64, 8, platform="tpu")
    n = gpu.params / 4
    assert gpu.grads == tpu.grads == 8 * n
    logits = 2 * 64 * c.padded_vocab_size / 2 * 4  # rows x length x vocab / tensor, fp32
    recompute = memory.activation_bytes_per_token(c, "none", 2, 2) * 2 * 64
    assert gpu.transient == max(1.25 * logits, recompute)
    assert tpu.transient == 3 * logits + recompute + n * 4  # + update tree (fp32: no cast)
    h, f, k = 128, 256, 64
    assert memory.activation_bytes_per_token(c, "none", 1, 1) == 20 * h + 4 * h + 6 * k + 12 * f


def test_lora_trainable_params_match_peft_count_for_llama2_7b():
    # PEFT's print_trainable_parameters() for Llama-2-7B, r=16 on all seven projections:
    # "trainable params: 39,976,960"
    model = load_config(os.path.join(REPO, "configs", "model", "llama2_7b.py"))
    c = LlamaConfig.from_mapping(dict(model))
    spec = lora.LoraSpec(16, lora.TARGETS, "bfloat16")
    assert lora.adapter_params(c, spec) == 39_976_960


def test_lora_memory_by_hand():
    c = model_config(tiny_cfg())
    layout = memory.Layout(mesh(fsdp=2, tensor=2), 2, "selective")
    spec = lora.LoraSpec(4, ("q_proj", "down_proj"), "nf4")
    est = lora.lora_memory(c, layout, 64, 8, spec)
    full = memory.jax_memory(c, layout, 64, 8)
    d, heads, dh, f, layers = (
        c.hidden_size,
        c.num_attention_heads,
        c.head_size,
        c.intermediate_size,
        c.num_hidden_layers,
    )
    # q: A [d/fsdp, r], B [r, heads/tensor, dh]; down: A [f/tensor, r], B [r, d/fsdp]
    adapters = layers * (d / 2 * 4 + 4 * heads / 2 * dh + f / 2 * 4 + 4 * d / 2)
    targets = layers * (d * heads * dh + f * d) / 4
    everything = full.params / 4
    base = targets * (0.5 + 4 / 64) + (everything - targets) * 2
    assert est.params == pytest.approx(base + 4 * adapters)
    assert est.optimizer == pytest.approx(8 * adapters) and est.grads == pytest.approx(8 * adapters)
    # selective remat also keeps q_proj's adapter output (down_proj's is not needed)
    assert est.activations == full.activations + 2 * heads / 2 * dh * (2 * 64) * layers
    assert est.total < full.total


@pytest.mark.parametrize("chip,devices", [("h100", 8), ("v5p", 4)])
def test_qlora_70b_config_fits_one_host_where_full_training_cannot(chip, devices):
    """configs/sft10_qlora_70b.py on one 8-GPU host or a v5p-8 (4 chips), by the analytic
    model; the same layout training every weight does not fit."""
    cfg = load_config(os.path.join(REPO, "configs", "sft10_qlora_70b.py"))
    c = model_config(cfg)
    sizes = sharding.resolve_mesh(cfg.mesh, devices, num_layers=c.num_hidden_layers)
    layout = memory.Layout(sizes, cfg.micro_batch_size, c.remat_policy)
    hbm = chips.CHIPS[chip].hbm_bytes * search.HEADROOM
    platform = chips.CHIPS[chip].platform
    spec = lora.LoraSpec.from_config(cfg)
    qlora = lora.lora_memory(c, layout, 4096, 64, spec, platform=platform)
    full = memory.jax_memory(c, layout, 4096, 64, platform=platform)
    assert full.total > hbm > qlora.total
    assert qlora.params < 12 * 2**30  # ~69B x 0.56 B / devices + bf16 embeddings / devices


def test_lora_spec_from_config_and_errors():
    cfg = ml_collections.ConfigDict(
        {"lora": {"rank": 8, "targets": "q_proj, v_proj", "base_dtype": "int8"}}
    )
    assert lora.LoraSpec.from_config(cfg) == lora.LoraSpec(8, ("q_proj", "v_proj"), "int8")
    cfg.lora.rank = 0
    assert lora.LoraSpec.from_config(cfg) is None
    with pytest.raises(ValueError, match="lora.targets: unknown"):
        lora.LoraSpec(8, ("qkv",), "int8")
    with pytest.raises(ValueError, match="lora.base_dtype"):
        lora.LoraSpec(8, ("q_proj",), "int4")


def test_frozen_base_step_is_faster():
    c = cfg_70b()
    layout = memory.Layout(mesh(fsdp=8), 1, "full")
    chip = chips.CHIPS["h100"]
    full = timing.estimate_time(c, layout, chip, 4096, 64, 1e9)
    frozen = timing.estimate_time(c, layout, chip, 4096, 64, 1e9, frozen_base_bytes=0.6)
    assert frozen.compute_s < full.compute_s and frozen.step_s < full.step_s
    assert frozen.flops_per_step == full.flops_per_step  # the MFU numerator is unchanged


def test_ring_and_bubble():
    assert timing.ring(100.0, 4, 10.0) == pytest.approx(7.5)
    assert timing.ring(100.0, 4, 10.0, all_reduce=True) == pytest.approx(15.0)
    assert timing.ring(100.0, 1, 10.0) == 0.0
    c = cfg_70b()
    layout = memory.Layout(mesh(tensor=8, pipeline=4), 2, "selective")
    first, _ = memory.megatron_param_counts(c, 8, 4)
    t = timing.estimate_time(c, layout, chips.CHIPS["h100"], 4096, 64, first, "megatron")
    assert t.bubble_s / (t.step_s - t.fsdp_dp_exposed_s) == pytest.approx(3 / 35)  # (p-1)/(m+p-1)
    assert t.flops_per_step == pytest.approx(64 * 4096 * c.flops_per_token(4096))


def test_axis_bandwidth_nvlink_vs_infiniband():
    h100 = chips.CHIPS["h100"]
    m = mesh(tensor=8, pipeline=4)
    assert timing.axis_bandwidth(h100, m, "tensor") == h100.intra_bw
    assert timing.axis_bandwidth(h100, m, "pipeline") == h100.inter_bw
    assert (
        timing.axis_bandwidth(chips.chip("v5p:2x4x4"), m, "pipeline") == chips.CHIPS["v5p"].intra_bw
    )


def test_factorisations_and_enumeration():
    assert sum(1 for _ in search.factorisations(32, 5)) == 126  # C(5+4, 4)
    assert all(math.prod(f) == 12 for f in search.factorisations(12, 3))
    c = model_config(tiny_cfg())
    layouts = search.enumerate_layouts(c, 8, 64, 8, micro_batches=(1, 2), remats=("full",))
    assert layouts and all(lay.devices == 8 for lay in layouts)
    assert all(c.num_key_value_heads % lay.mesh["tensor"] == 0 for lay in layouts)
    assert all(8 % (lay.micro_batch_size * lay.data_parallel) == 0 for lay in layouts)
    assert memory.Layout(mesh(fsdp=2, sequence=2, tensor=2), 2, "full") in layouts


def test_search_ranks_fitting_layouts_first():
    c = model_config(tiny_cfg())
    layouts = search.enumerate_layouts(c, 8, 64, 8, micro_batches=(1,), remats=("full",))
    ranked = search.rank(c, layouts, chips.CHIPS["v5e"], 64, 8, 0.6)
    times = [r.time.step_s for r in ranked if r.fits]
    assert times == sorted(times)


def test_parse_oom_and_mesh():
    from oasst_jax.cli import plan
    from oasst_jax.planner import aot

    msg = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 107.02G of 95.74G hbm."
    assert aot.parse_oom(msg) == (int(107.02 * 2**30), int(95.74 * 2**30), False)
    msg = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (50.14G) exceeds available HBM (15.75G)."
    )
    assert aot.parse_oom(msg) == (int(50.14 * 2**30), int(15.75 * 2**30), True)
    assert aot.parse_oom("some other error") is None
    assert plan.parse_mesh("tensor=8,pipeline=4") == mesh(tensor=8, pipeline=4)
    assert plan.parse_mesh("data=-1,tensor=8") == mesh(data=-1, tensor=8)
    with pytest.raises(ValueError, match="bad --mesh 'tensr=8': mesh: unknown axis 'tensr'"):
        plan.parse_mesh("tensr=8")
    with pytest.raises(ValueError, match="bad --mesh item 'tensor'"):
        plan.parse_mesh("tensor")


def test_cpu_compile_tiny_last_line_json(capsys):
    from oasst_jax.cli import plan

    plan.run(
        tiny_cfg(),
        mesh(fsdp=2, sequence=2, tensor=2),
        "",
        "h100",
        do_search=False,
        efficiency=0.6,
        compile_top=1,
        json_only=False,
        devices_hint=8,
    )
    out = capsys.readouterr().out.strip().splitlines()
    rec = json.loads(out[-1])
    for key in (
        "peak_bytes_per_device",
        "param_bytes_per_device",
        "optimizer_bytes_per_device",
        "temp_bytes_per_device",
        "flops_per_step",
        "mesh",
    ):
        assert key in rec
    assert rec["backend"] == "cpu" and rec["memory_predictive"] is False
    assert "NOT PREDICTIVE" in "\n".join(out)
    assert rec["param_bytes_per_device"] == pytest.approx(rec["analytic"]["params"])


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype", ["bfloat16", "nf4"])
def test_lora_compile_state_bytes_match_the_analytic_model(capsys, base_dtype):
    """A LoRA step compiles (frozen base + adapters as the state) and its state's bytes per
    device are what the analytic LoRA model says (qwix's scales: one per 64 inputs)."""
    from oasst_jax.cli import plan

    cfg = tiny_cfg()
    cfg.model.hidden_size, cfg.model.intermediate_size = 128, 256  # 64-input blocks
    cfg.lora.rank, cfg.lora.base_dtype = 4, base_dtype
    rec = plan.run(
        cfg,
        mesh(fsdp=2, sequence=2, tensor=2),
        "",
        "h100",
        do_search=False,
        efficiency=0.6,
        compile_top=1,
        json_only=True,
        devices_hint=8,
    )
    capsys.readouterr()
    assert not rec["compile_error"]
    analytic = rec["analytic"]
    assert rec["param_bytes_per_device"] == pytest.approx(analytic["params"], rel=0.02)
    assert rec["optimizer_bytes_per_device"] == pytest.approx(analytic["optimizer"], rel=0.02)
    assert "frozen base" in rec["notes"][0]


@pytest.mark.slow
def test_tpu_topology_compile_tiny():
    pytest.importorskip("libtpu", reason="libtpu missing: pip install -e '.[plan]'")
    from oasst_jax.planner import aot

    devices = aot.tpu_devices("v5e:2x2")
    layout = memory.Layout(mesh(fsdp=2, tensor=2), 2, "full")
    r = aot.compile_step(tiny_cfg(), layout, devices)
    assert r.backend == "tpu" and r.fits is None and r.error == ""
    assert r.peak_bytes >= r.param_bytes + r.optimizer_bytes > 0


@pytest.mark.slow
def test_tpu_topology_compile_tiny_pallas_builds_mosaic_kernel():
    pytest.importorskip("libtpu", reason="libtpu missing: pip install -e '.[plan]'")
    from oasst_jax.planner import aot

    cfg = tiny_cfg()
    cfg.model.attention_impl = "pallas"
    layout = memory.Layout(mesh(fsdp=2, tensor=2), 2, "full")
    r = aot.compile_step(cfg, layout, aot.tpu_devices("v5e:2x2"))
    assert r.backend == "tpu" and r.error == "" and r.attention_impl == "pallas"
    assert sum(r.kernel_calls.values()) > 0  # tpu_custom_call in the compiled HLO, not XLA


def _device(platform, capability=""):
    return types.SimpleNamespace(platform=platform, compute_capability=capability)


# the jax that has the Mosaic GPU kernels' API (oasst_jax.attention.mosaic_gpu.MIN_JAX)
MOSAIC_JAX = jax.__version_info__ >= (0, 11)
TRITON_KERNELS = {"flash_fwd", "flash_dq", "flash_dkv"}
MOSAIC_KERNELS = {"mosaic_flash_fwd", "mosaic_flash_dq", "mosaic_flash_dkv"}


def test_target_model_config_picks_the_gpu_kernels_a_run_would():
    """A TPU compile builds Mosaic; a GPU compile the kernels a run there picks (Mosaic GPU
    on Hopper with jax >= 0.11 at head dim <= 128 in bf16/fp16, else Triton); a CPU
    compile XLA's attention."""
    from oasst_jax.planner import aot

    c = LlamaConfig(attention_impl="pallas", dtype="bfloat16")  # head dim 128
    hopper = "mosaic_gpu" if MOSAIC_JAX else "gpu"
    assert aot.target_model_config(c, _device("tpu")).attention_backend == "tpu"
    assert aot.target_model_config(c, _device("gpu", "9.0")).attention_backend == hopper
    assert aot.target_model_config(c, _device("gpu", "8.0")).attention_backend == "gpu"  # A100
    fp32 = dataclasses.replace(c, dtype="float32")
    assert aot.target_model_config(fp32, _device("gpu", "9.0")).attention_backend == "gpu"
    assert aot.target_model_config(c, _device("cpu")).attention_impl == "xla"
    xla = dataclasses.replace(c, attention_impl="xla")
    assert aot.target_model_config(xla, _device("gpu", "9.0")) == xla
    stored = {k: v for k, v in c.__dict__.items() if k != "attention_backend"}
    assert LlamaConfig.from_mapping(stored).attention_backend == "auto"  # old checkpoints load


def test_kernel_calls_name_triton_and_mosaic_gpu_kernels():
    """Compiled-HLO lines of both GPU kernel families (abridged from a program compiled for
    an abstract H100 at head dim 128: Mosaic GPU forward and dq, Triton dk/dv): a Triton
    call names its kernel in its config, a Mosaic GPU call in its serialized module's kernel
    function -- whether or not the ``op_name`` keeps the scope (it does not when jax keeps
    one frame per location), and in a lowering's text too."""
    from oasst_jax.planner import aot

    def module(kernel: str) -> str:  # the string table's neighbours, as jax 0.11.2 writes them
        return (
            'module = "ML\\EFR\\01MLIR24.0.0git\\00\\11builtin\\00stable_mosaic_gpu\\00llvm'
            f"\\00mosaic_gpu.dump_basename\\00{kernel}_0\\00stable_mosaic_gpu.version\\00"
            f'llvm.emit_c_interface\\00{kernel}_mosaic_gpu\\00order"'
        )

    program = "\n".join(
        [
            '%mpmd_map.7 = (bf16[1,512,4,64]) custom-call(%q.1), custom_call_target="mosaic_gpu_'
            'v2", metadata={op_name="jit(step)/jvp()/mosaic_flash_fwd/mpmd_map" scheduling_'
            f'name="mpmd_map.7"}}, backend_config={{kernel_hash = "x", '
            f"{module('mosaic_flash_fwd')}}}",
            '%mpmd_map.10 = bf16[1,512,4,64] custom-call(%q.1), custom_call_target="mosaic_gpu_'
            'v2", metadata={op_name="mpmd_map" scheduling_name="mpmd_map.10"}, backend_config='
            f'{{kernel_hash = "y", {module("mosaic_flash_dq")}}}',
            '%triton.3 = bf16[1,512,2,64] custom-call(%q.1), custom_call_target="__gpu$xla.gpu.'
            'triton", backend_config={name = "flash_dkv", ir = "..."}',
            '%fusion.2 = f32[8] fusion(%p), kind=kLoop, metadata={op_name="jit(step)/add"}',
        ]
    )
    calls = aot.kernel_calls(program, "gpu")
    assert calls == {"mosaic_flash_fwd": 1, "mosaic_flash_dq": 1, "flash_dkv": 1}
    assert aot.kernel_kinds(program, "gpu") == ("Mosaic GPU", "Triton")
    assert aot.kernel_calls(program, "tpu") == {} and aot.kernel_kinds(program, "cpu") == ()
    lowered = (
        '%1 = stablehlo.custom_call @mosaic_gpu_v2(%0) {backend_config = "", mhlo.backend_'
        f'config = {{kernel_hash = "z", {module("mosaic_flash_dkv")}}}}}'
    )
    assert aot.kernel_calls(lowered, "gpu") == {"mosaic_flash_dkv": 1}
    unnamed = "stablehlo.custom_call @mosaic_gpu_v2(%0) {mhlo.backend_config = {}}"
    assert aot.kernel_calls(unnamed, "gpu") == {"mosaic_gpu_v2": 1}  # the target stands in


# ------------------------------------------------------------------ GPU topologies


def test_gpu_topology_names_hosts_and_gpus():
    assert chips.gpu_topology("h100:1")[1:] == (1, 1)
    assert chips.gpu_topology("h100:8")[1:] == (1, 8)
    assert chips.gpu_topology("h100:32")[1:] == (4, 8)  # the card's 4 hosts x 8
    assert chips.gpu_topology("h200:2x4")[1:] == (2, 4)
    assert chips.gpu_topology("a100:16")[0].name == "a100"
    for bad in ("h100:12", "h100:0", "h100:4x16", "h100:x8", "h100:"):
        with pytest.raises(ValueError, match=f"bad GPU topology '{bad}'"):
            chips.gpu_topology(bad)
    with pytest.raises(ValueError, match="unknown chip 'h900:8'"):
        chips.gpu_topology("h900:8")
    with pytest.raises(ValueError, match="is not a GPU topology"):
        chips.gpu_topology("v5p:8")


def test_gpu_targets_are_package_data():
    for chip in chips.CHIPS.values():
        if chip.platform == "gpu":
            text = chips.target_config(chip)
            assert 'platform_name: "CUDA"' in text
            # the compiler plans for the chip's HBM (80/141 GB, less what the driver keeps)
            assert 0.98 < chips.target_memory_bytes(text) / chip.hbm_bytes < 1.1


def test_cuda_plugin_check_names_the_extra():
    jax_version = "0.10.2"
    ok = {"jax-cuda12-plugin": "0.10.2", "jax-cuda12-pjrt": "0.10.2"}
    assert chips.check_cuda_plugin(ok, jax_version) == "jax-cuda12-plugin"
    with pytest.raises(ValueError, match=r"needs jax's CUDA plugin .*\.\[gpu-aot\]"):
        chips.check_cuda_plugin({}, jax_version)
    old = {"jax-cuda12-plugin": "0.10.1", "jax-cuda12-pjrt": "0.10.1"}
    with pytest.raises(ValueError, match=r"jax-cuda12-plugin 0\.10\.1, .*\.\[gpu-aot\]"):
        chips.check_cuda_plugin(old, jax_version)
    half = {"jax-cuda12-plugin": "0.10.2"}
    with pytest.raises(ValueError, match="jax-cuda12-pjrt missing"):
        chips.check_cuda_plugin(half, jax_version)


def plan_run(cfg, topology="", mesh_sizes=None, devices_hint=8, search=False):
    from oasst_jax.cli import plan

    return plan.run(
        cfg,
        mesh_sizes,
        topology,
        "",
        do_search=search,
        efficiency=0.6,
        compile_top=1,
        json_only=True,
        devices_hint=devices_hint,
    )


def test_plan_bad_input_is_one_error(monkeypatch):
    """Unknown chip, bad topology, no CUDA plugin, a batch the mesh cannot split: each a
    ValueError (``cli_main`` prints it as one ``error:`` line), before any compile."""
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="unknown chip 'h900:8'"):
        plan_run(cfg, "h900:8")
    with pytest.raises(ValueError, match="bad GPU topology 'h100:12'"):
        plan_run(cfg, "h100:12")
    monkeypatch.setattr(chips, "installed_version", lambda dist: None)
    with pytest.raises(ValueError, match=r"\.\[gpu-aot\]"):
        plan_run(cfg, "h100:1")
    monkeypatch.undo()
    # a one-GPU config planned for the default 32 devices: zero micro-batches per step
    cfg.mesh.fsdp = cfg.mesh.sequence = cfg.mesh.tensor = 1
    cfg.mesh.data = -1
    with pytest.raises(ValueError, match="global_batch_size=8 is not divisible .* 32 devices"):
        plan_run(cfg, devices_hint=32)


def test_refused_topology_is_one_line_and_analytic_figures(monkeypatch, capsys):
    """Where the compile-only client refuses a topology, one line says what it refused and
    the figures that follow are the analytic model's, labelled so."""
    from oasst_jax.cli import plan

    def refuse(topology):
        raise chips.CompileRefused(f"the CUDA compile-only client refused {topology}: test")

    monkeypatch.setattr(chips, "gpu_devices", refuse)
    cfg = tiny_cfg()
    rec = plan.run(
        cfg,
        mesh(fsdp=2, sequence=2, tensor=2),
        "h100:8",
        "",
        do_search=False,
        efficiency=0.6,
        compile_top=1,
        json_only=False,
        devices_hint=8,
    )
    out = capsys.readouterr().out
    assert "backend" not in rec and rec["fits_by"] == "analytic model"
    assert rec["compile_refused"] == "the CUDA compile-only client refused h100:8: test"
    lines = out.splitlines()[:-1]  # the last is the JSON record
    assert sum("refused h100:8" in line for line in lines) == 2  # plan's head, layout block
    assert "figures are ANALYTIC" in out


def gpu_cfg():
    """A small model as a GPU trains it: bf16 compute, the Pallas attention at head dim 64
    with GQA, seq 2048, Llama's 32000-word vocabulary (the logits, the largest transient,
    as in the real runs): small enough to compile fast, large enough that the compiler's
    fixed workspaces do not dominate its peak."""
    cfg = tiny_cfg()
    cfg.seq_length = 2048
    cfg.model.update(
        dtype="bfloat16",
        attention_impl="pallas",
        remat_policy="selective",
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    return cfg


# XLA's GPU compiler through jax's CUDA plugin (compile-only: no GPU, no driver); the
# plugin is the gpu-aot extra (CUDA 12) or jax-cuda13-plugin (the CI's Python 3.12 stage)
needs_cuda_plugin = pytest.mark.skipif(
    not any(chips.installed_version(d) for ds in chips.CUDA_PLUGINS.values() for d in ds),
    reason="no jax CUDA plugin: pip install -e '.[gpu-aot]'",
)


@needs_cuda_plugin
def test_gpu_devices_for_several_hosts_and_each_chip():
    """The compile-only client gives the card's 4 hosts x 8 GPUs as one topology (process
    indices 0-3), and every GPU chip of the table has a target it accepts."""
    devices = chips.gpu_devices("h100:32")
    assert len(devices) == 32 and {d.process_index for d in devices} == {0, 1, 2, 3}
    assert {d.platform for d in devices} == {"gpu"}
    assert "H200" in chips.gpu_devices("h200:1")[0].device_kind
    assert "A100" in chips.gpu_devices("a100:2")[0].device_kind
    # each compiles the kernels a run on it picks, by the capability its target reports
    from oasst_jax.planner import aot

    c = model_config(gpu_cfg())
    hopper = "mosaic_gpu" if MOSAIC_JAX else "gpu"
    for topology, backend in (("h100:1", hopper), ("h200:1", hopper), ("a100:1", "gpu")):
        device = chips.gpu_devices(topology)[0]
        assert aot.target_model_config(c, device).attention_backend == backend, topology


def gpu_kernels(topology: str, head_dim: int = 64) -> set[str]:
    """The attention kernels a run on the topology's GPU uses: Mosaic GPU's on Hopper with
    jax >= 0.11 (dk/dv Triton's at head dim 128, where Mosaic GPU's spills), else Triton's."""
    if not (MOSAIC_JAX and topology[:4] in ("h100", "h200")):
        return TRITON_KERNELS
    if head_dim <= 64:
        return MOSAIC_KERNELS
    return {"mosaic_flash_fwd", "mosaic_flash_dq", "flash_dkv"}


@pytest.mark.slow
@needs_cuda_plugin
@pytest.mark.parametrize(
    "topology,kind,heads", [("h100:1", "H100", 8), ("a100:1", "A100", 8), ("h100:1", "H100", 4)]
)
def test_gpu_compile_one_gpu_builds_the_kernels_a_run_uses(topology, kind, heads):
    """One abstract GPU: the step compiles with XLA's GPU compiler, the forward and both
    backward kernels in the program are the ones a run there uses (Mosaic GPU on an H100
    with jax >= 0.11 -- at head dim 128 beside Triton's dk/dv --, Triton on an A100 or
    older jax), the state is the arguments, and the analytic GPU model is within 15 % of
    the compiled peak."""
    from oasst_jax.planner import aot

    devices = chips.gpu_devices(topology)
    assert devices[0].platform == "gpu" and kind in devices[0].device_kind
    cfg = gpu_cfg()
    cfg.model.update(num_attention_heads=heads, num_key_value_heads=heads // 2)
    head_dim = cfg.model.hidden_size // heads
    layout = memory.Layout(mesh(), 2, "selective")
    r = aot.compile_step(cfg, layout, devices)
    assert r.backend == "gpu" and r.attention_impl == "pallas"
    expected = gpu_kernels(topology, head_dim)
    assert set(r.kernel_calls) == expected, r.kernel_calls
    kinds = {"Mosaic GPU" if k.startswith("mosaic") else "Triton" for k in expected}
    assert r.kernel_kinds == tuple(sorted(kinds))
    assert r.argument_bytes >= r.param_bytes + r.optimizer_bytes > 0
    est = memory.jax_memory(model_config(cfg), layout, 2048, 8, platform="gpu")
    assert est.total == pytest.approx(r.peak_bytes, rel=0.15), (est, r)


@pytest.mark.slow
@needs_cuda_plugin
def test_plan_topology_h100_8_compiled_verdict(capsys):
    """``plan --topology h100:8`` (FSDP 8): the compiler's per-GPU figures decide the
    verdict, the report names the kernels a run uses (Mosaic GPU with jax >= 0.11, else
    Triton), and the analytic model is within 15 % of the peak (the gathered weights are
    not modelled)."""
    from oasst_jax.cli import plan

    cfg = gpu_cfg()
    cfg.global_batch_size = 32  # 2 rows x fsdp 8 x 2 micro-batches
    rec = plan_run(cfg, "h100:8", mesh(fsdp=8))
    assert rec["backend"] == "gpu" and rec["memory_predictive"] is True
    assert rec["fits_by"] == "GPU compiler" and rec["fits"] is True
    assert rec["compiler_capacity_bytes"] == chips.target_memory_bytes(
        chips.target_config(chips.CHIPS["h100"])
    )
    assert set(rec["kernel_calls"]) == gpu_kernels("h100")
    assert abs(rec["analytic_error"]) < 0.15, rec["analytic_error"]
    text = "\n".join(plan.describe(rec))
    label = "Mosaic GPU kernel calls: mosaic_" if MOSAIC_JAX else "Triton kernel calls: "
    assert label + "flash_dkv x1" in text, text
    assert "(GPU compiler)" in text
    capsys.readouterr()


@pytest.mark.slow
@needs_cuda_plugin
def test_search_topology_h100_8_compiles_its_best_layout(capsys):
    """``plan --search --topology h100:8``: the analytic ranking's best layout is compiled
    with XLA's GPU compiler (as ``--search`` does for a TPU topology), so the winner's
    verdict is the compiler's, with the kernels a run uses in its program."""
    cfg = gpu_cfg()
    cfg.global_batch_size = 32
    rec = plan_run(cfg, "h100:8", search=True)
    assert rec["backend"] == "gpu" and rec["fits_by"] == "GPU compiler", rec
    assert rec["fits"] is True and rec["peak_bytes_per_device"] > 0
    assert set(rec["kernel_calls"]) == gpu_kernels("h100"), rec["kernel_calls"]
    assert abs(rec["analytic_error"]) < 0.15, rec["analytic_error"]
    assert "search:" not in capsys.readouterr().out  # json_only: JSON lines alone
