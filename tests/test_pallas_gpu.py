"""The Triton kernels' resources on an H100, without one: XLA's GPU compiler builds the
forward, dq and dk/dv kernels at the tiles ``pallas_gpu.default_blocks`` picks, for sm_90a
(the CUDA plugin's compile-only devices), and ``ptxas -v`` on the PTX it wrote must show no
spill, at most 255 registers and Hopper's ``wgmma`` in every kernel.  A kernel that spills
still computes the right numbers, so only this catches a tile that does not fit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from oasst_jax import sharding
from oasst_jax.attention import dot_product_attention, pallas_gpu, ptxas

needs_ptxas = pytest.mark.skipif(bool(ptxas.unavailable()), reason=ptxas.unavailable())

KERNELS = ("flash_fwd", "flash_dq", "flash_dkv")
SEQ = 512  # longer than every default tile; registers do not depend on the length
H100_SHARED_OPTIN = 232448  # bytes of shared memory one block may ask for (sm_90)


@pytest.fixture(scope="module")
def h100_mesh():
    from oasst_jax.planner import chips

    return sharding.make_mesh({"data": 1}, chips.gpu_devices("h100:1"))


def _kernel_resources(mesh, head_dim, heads, kv_heads, *, packed, causal=True, dtype=jnp.bfloat16):
    """ptxas figures of the three flash kernels of one fwd+bwd program compiled for sm_90a."""
    rep = NamedSharding(mesh, PartitionSpec())
    q = jax.ShapeDtypeStruct((1, SEQ, heads, head_dim), dtype, sharding=rep)
    kv = jax.ShapeDtypeStruct((1, SEQ, kv_heads, head_dim), dtype, sharding=rep)
    seg = jax.ShapeDtypeStruct((1, SEQ), jnp.int32, sharding=rep) if packed else None

    def loss(q, k, v, seg):
        out = dot_product_attention(
            q, k, v, segment_ids=seg, causal=causal, implementation="pallas", backend="gpu",
            interpret=False,
        )  # fmt: skip
        return out.astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower()
    _, kernels = ptxas.compile_with_resources(lowered, KERNELS)
    return {r.kernel: r for r in kernels}


# (head dim, query heads, kv heads, packed, causal, dtype): every padded head dim the chooser
# takes, GQA with packed rows (the training path: bounds and segment operands, the most
# registers) and dense multi-head rows; 64 is TinyLlama's head dim and 128 Llama-2's (8 query
# heads to 1 kv head: 70B under tensor parallelism 8); fp32 at its worst head dim.
CASES = [
    pytest.param(16, 8, 2, True, True, jnp.bfloat16, id="d16-gqa-packed"),
    pytest.param(32, 8, 2, True, True, jnp.bfloat16, id="d32-gqa-packed"),
    pytest.param(64, 8, 2, True, True, jnp.bfloat16, id="d64-gqa-packed"),
    pytest.param(64, 8, 8, False, True, jnp.bfloat16, id="d64-mha"),
    pytest.param(128, 8, 1, True, True, jnp.bfloat16, id="d128-gqa-packed"),
    pytest.param(128, 8, 8, False, False, jnp.bfloat16, id="d128-mha-full"),
    pytest.param(128, 8, 2, True, True, jnp.float32, id="d128-gqa-packed-fp32"),
]


@needs_ptxas
@pytest.mark.parametrize("head_dim,heads,kv_heads,packed,causal,dtype", CASES)
def test_default_tiles_fit_registers_without_spills(
    h100_mesh, head_dim, heads, kv_heads, packed, causal, dtype
):
    """No spill, <= 255 registers, shared memory within the block limit; bf16 dots on
    wgmma (fp32 ones are IEEE on FMA units by design: ``blocks.mm``)."""
    kernels = _kernel_resources(
        h100_mesh, head_dim, heads, kv_heads, packed=packed, causal=causal, dtype=dtype
    )
    assert set(kernels) == set(KERNELS)
    problems = {name: r.problems() for name, r in kernels.items() if r.problems()}
    assert not problems, problems
    assert all(0 < r.shared_bytes <= H100_SHARED_OPTIN for r in kernels.values()), kernels
    wgmma = {name: r.wgmma for name, r in kernels.items()}
    assert all(wgmma.values()) if dtype == jnp.bfloat16 else not any(wgmma.values()), wgmma


def test_head_dims_over_128_are_refused():
    """At 256 the dk/dv kernel spills at any wgmma tile: the chooser admits no such shape."""
    assert pallas_gpu.padded_head_dim(80) == 128
    with pytest.raises(ValueError, match="head dim 256 > 128"):
        pallas_gpu.default_blocks(256)
    q = jnp.zeros((1, 32, 2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="attention_impl='xla'"):
        dot_product_attention(q, q, q, implementation="pallas", backend="gpu")
