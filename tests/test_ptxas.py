"""oasst_jax.attention.ptxas: ptxas' report and XLA's launch dump read into per-kernel figures,
and the verdict on them (the compiles that feed it are in tests/test_pallas_gpu.py)."""

from __future__ import annotations

from oasst_jax.attention import ptxas

# ptxas -v (CUDA 13) on a module of two entries and a callee; the second entry spills.
REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for __nv_helper
    16 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads
ptxas info    : Compiling entry function 'flash_fwd' for 'sm_90a'
ptxas info    : Function properties for flash_fwd
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 236 registers, used 1 barriers
ptxas info    : Compiling entry function 'flash_dkv' for 'sm_90a'
ptxas info    : Function properties for flash_dkv
    72 bytes stack frame, 80 bytes spill stores, 96 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
"""
PTX = """\
.version 8.8
.target sm_90a
.visible .entry flash_fwd(
  .param .u64 p0
)
{
  wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;
}
.visible .entry flash_dkv(
  .param .u64 p0
)
{
  mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
}
"""
THUNKS = """\
005: kCustomKernel [prev=004 (1) | next=006 (1)] flash_fwd grid: [4, 1, 8] threads: [128, 1, 1]  shared_memory: 66560 bytes
012: kCustomKernel [prev=011 (1) | next=013 (1)] flash_dkv grid: [4, 2, 4] threads: [256, 1, 1]  shared_memory: 58112 bytes
"""  # noqa: E501


def test_report_entries_and_launches_parse():
    report = ptxas.parse_ptxas(REPORT)
    assert set(report) == {"flash_fwd", "flash_dkv"}  # the callee is no entry
    assert report["flash_fwd"] == {
        "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0, "registers": 236,
        "static_shared": 0,
    }  # fmt: skip
    assert report["flash_dkv"]["spill_loads"] == 96 and report["flash_dkv"]["static_shared"] == 1024
    entries = ptxas.ptx_entries(PTX)
    assert list(entries) == ["flash_fwd", "flash_dkv"]
    assert "wgmma" in entries["flash_fwd"] and "wgmma" not in entries["flash_dkv"]
    assert ptxas.launches(THUNKS) == {
        "flash_fwd": {"threads": 128, "shared_bytes": 66560},
        "flash_dkv": {"threads": 256, "shared_bytes": 58112},
    }


def test_problems_name_spills_and_registers_over_the_limit():
    fits = ptxas.KernelResources("flash_fwd", 236, 0, 0, 0, 66560, 128, True)
    assert fits.problems() == []
    spills = ptxas.KernelResources("flash_dkv", 255, 80, 96, 72, 59136, 256, False)
    assert spills.spills == 176
    assert spills.problems() == ["spills 80 B stored, 96 B loaded"]
    assert fits.problems(register_limit=200) == ["236 registers > 200"]
