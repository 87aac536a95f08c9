"""Llama-2 decoder in Flax linen, annotated with logical axis names only.

Why linen rather than nnx: the trainer, the checkpointer, the pipeline schedule
and the ahead-of-time planner all want parameters as a plain pytree that can be
built abstractly (``jax.eval_shape``), sharded from a spec tree and passed into
one pure jitted function.  linen's ``init``/``apply`` give exactly that, and its
``nn.scan`` + ``nn.remat`` lift stacks the layers with a leading ``layers`` axis
so compile time does not grow with depth.

Shapes in names: ``B`` batch, ``L`` length, ``D`` embed, ``H`` heads, ``K`` kv
heads, ``Dh`` head dim, ``F`` mlp, ``V`` padded vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import linen as nn

from oasst_jax import sharding
from oasst_jax.attention import IMPLEMENTATIONS, dot_product_attention, xla
from oasst_jax.sharding import constrain

REMAT_POLICIES = ("none", "full", "selective")
# Logical axes of the residual stream between the layers' matmul blocks.
RESIDUAL = ("batch", "res_length", "act_embed")
# Logical axes of a layer's decoding KV cache ``[batch, kv_heads, slots, head_dim]``: kv
# heads only (GQA), tensor-parallel like k/v.
CACHE_KV_NAMES = ("batch", "act_kv_heads", None, None)
ATTENTION_BACKENDS = ("auto", "tpu", "gpu", "mosaic_gpu")  # gpu: Triton; mosaic_gpu: Hopper
# LoRA targets by their PEFT names (Llama's nn.Linear modules) -> (our module, kernel name,
# how many leading kernel axes are its input).  Adapters live beside their kernel:
# ``decoder/layers/attn/q_lora_a`` [layers, D, r] and ``q_lora_b`` [layers, r, H, Dh].
LORA_TARGETS: Mapping[str, tuple[str, str, int]] = {
    "q_proj": ("attn", "q", 1),
    "k_proj": ("attn", "k", 1),
    "v_proj": ("attn", "v", 1),
    "o_proj": ("attn", "o", 2),
    "gate_proj": ("mlp", "gate", 1),
    "up_proj": ("mlp", "up", 1),
    "down_proj": ("mlp", "down", 1),
}
# What the frozen base of a LoRA run is held in (``float32`` only for exactness tests).
LORA_BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture + numerics.  Field names follow Hugging Face's LlamaConfig."""

    vocab_size: int = 32002  # 32000 + <|im_start|>, <|im_end|>
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # linear position interpolation; the card uses 1.0
    rms_norm_eps: float = 1e-5
    vocab_pad_multiple: int = 128
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights
    remat_policy: str = "selective"
    attention_impl: str = "xla"
    # Which device the Pallas kernel is built for: 'auto' = the running platform (on a GPU:
    # Mosaic GPU on Hopper, else Triton); 'tpu' / 'gpu' (Triton) / 'mosaic_gpu' compile the
    # real (non-interpreted) kernel for that target even from a CPU host, as the planner's
    # ahead-of-time compile for a TPU topology needs.  Not part of the shape.
    attention_backend: str = "auto"
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    # LoRA (``oasst_jax/lora.py``): rank 0 = off.  ``lora_targets`` are PEFT module names,
    # comma-separated (a string, so the config stays hashable and JSON round-trips).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""
    lora_base_dtype: str = "bfloat16"
    # a reward model's scalar head ``score/kernel`` [hidden, 1] on the final normed hidden
    # state (HF ``LlamaForSequenceClassification``'s ``score``); off for a language model
    score_head: bool = False

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"model: remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}"
            )
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"model: attention_impl={self.attention_impl!r}; choose one of {IMPLEMENTATIONS}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"model: attention_backend={self.attention_backend!r}; "
                f"choose one of {ATTENTION_BACKENDS}"
            )
        if self.lora_rank < 0:
            raise ValueError(f"lora: rank={self.lora_rank} must be >= 0 (0 = off)")
        if self.lora_rank:
            bad = [t for t in self.lora_target_names if t not in LORA_TARGETS]
            if bad or not self.lora_target_names:
                raise ValueError(
                    f"lora: targets={self.lora_targets!r} names {bad[0] if bad else 'nothing'!r};"
                    f" choose from {','.join(LORA_TARGETS)}"
                )
            if not self.lora_alpha > 0:
                raise ValueError(f"lora: alpha={self.lora_alpha} must be > 0")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ValueError(f"lora: dropout={self.lora_dropout} not in [0, 1)")
            if self.lora_base_dtype not in LORA_BASE_DTYPES:
                raise ValueError(
                    f"lora: base_dtype={self.lora_base_dtype!r}; choose one of {LORA_BASE_DTYPES}"
                )

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def lora_kernels(self) -> frozenset[tuple[str, str]]:
        """``(module, kernel)`` pairs that carry an adapter (empty without LoRA)."""
        if not self.lora_rank:
            return frozenset()
        return frozenset(LORA_TARGETS[t][:2] for t in self.lora_target_names)

    @property
    def lora_scale(self) -> float:
        """PEFT's ``scaling``: the adapter's output is multiplied by ``alpha / rank``."""
        return self.lora_alpha / self.lora_rank

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> LlamaConfig:
        """Build from a ConfigDict/dict, rejecting unknown keys with the key's name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"model: unknown config field {unknown[0]!r}")
        return cls(**dict(cfg))

    def num_params(self, include_embedding: bool = True) -> int:
        d, f, h, k = self.hidden_size, self.intermediate_size, self.head_size, 0
        k = self.num_key_value_heads * h
        per_layer = d * self.num_attention_heads * h * 2 + d * k * 2 + 3 * d * f + 2 * d
        n = self.num_hidden_layers * per_layer + d
        if include_embedding:
            n += 2 * self.padded_vocab_size * d
        return n

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token (the MFU numerator): ``6 N`` for the matmul weights
        (embedding lookup excluded, LM head included) plus attention's ``QK^T`` and ``AV``:
        ``6 * 2 * layers * seq * heads * head_dim`` (full, non-causal count, as PaLM/MaxText)."""
        n = self.num_params(include_embedding=False) + self.hidden_size * self.padded_vocab_size
        attn = 12 * self.num_hidden_layers * seq_length * self.num_attention_heads * self.head_size
        return 6.0 * n + attn


def remat_policy(name: str):
    """The named rematerialisation policies.

    ``none``: keep every activation.  ``full``: keep only the layer input and
    recompute the whole layer in the backward pass.  ``selective``: keep the
    outputs of the weight matmuls (projections, MLP) but recompute attention
    scores/softmax and the elementwise ops (norms, RoPE, SwiGLU, dropout) -- the
    activations that are large but cheap to recompute, as in Megatron's
    selective recompute.  Attention einsums have batch dimensions (batch, heads)
    so ``dots_with_no_batch_dims_saveable`` leaves them out.
    """
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "selective":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"remat policy {name!r} has no checkpoint policy")


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 at each segment boundary of a packed row."""
    length = segment_ids.shape[-1]
    idx = jnp.arange(length)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=1,
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling: float) -> jax.Array:
    """Rotary embedding in Hugging Face's rotate-half layout, computed in fp32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    angles = (positions.astype(jnp.float32) / scaling)[..., None] * inv_freq  # [B, L, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def dropout(x: jax.Array, rate, rng: jax.Array) -> jax.Array:
    """Inverted dropout with a possibly traced rate (LIMA gives each layer its own)."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _init(cfg: LlamaConfig, names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), names)


def as_weight(w: Any, dtype: str) -> jax.Array:
    """A kernel in the compute dtype; a frozen QLoRA base kernel (a ``qwix.QArray``)
    is dequantized here, inside the scanned layer, so only one layer's dense copy lives."""
    if isinstance(w, qwix.QArray):
        w = qwix.dequantize(w)
    return w.astype(dtype)


def _lora_a_init(n_in: int):
    """PEFT's default for ``lora_A``: ``kaiming_uniform_(a=sqrt(5))``, i.e. U(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1
    )


def linear(
    module: nn.Module,
    name: str,
    x: jax.Array,
    shape: tuple[int, ...],
    names: tuple[str, ...],
    n_in: int,
    deterministic: bool = True,
) -> jax.Array:
    """``x @ W`` for kernel ``name`` of ``shape`` (its first ``n_in`` axes contract with
    ``x``'s last ``n_in``), plus ``(alpha / r) * dropout(x) @ A @ B`` when the kernel is a
    LoRA target.  A ``[*in, r]`` and B ``[r, *out]`` (PEFT's lora_A/lora_B, transposed)
    are sharded by the kernel's own logical names with the rank axis replicated."""
    cfg = module.cfg
    pd = jnp.dtype(cfg.param_dtype)
    w = as_weight(module.param(name, _init(cfg, names), shape, pd), cfg.dtype)
    ins, outs = "ijk"[:n_in], "mno"[: len(shape) - n_in]
    y = jnp.einsum(f"...{ins},{ins}{outs}->...{outs}", x, w)
    if (module.name, name) not in cfg.lora_kernels():
        return y
    r = cfg.lora_rank
    a = module.param(
        f"{name}_lora_a",
        nn.with_logical_partitioning(_lora_a_init(n_in), (*names[:n_in], "lora_rank")),
        (*shape[:n_in], r),
        pd,
    )
    b = module.param(
        f"{name}_lora_b",
        nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", *names[n_in:])),
        (r, *shape[n_in:]),
        pd,
    )
    if cfg.lora_dropout > 0 and not deterministic:
        x = dropout(x, cfg.lora_dropout, module.make_rng("dropout"))
    h = jnp.einsum(f"...{ins},{ins}r->...r", x, a.astype(cfg.dtype))
    delta = jnp.einsum(f"...r,r{outs}->...{outs}", h, b.astype(cfg.dtype))
    return y + (cfg.lora_scale * delta).astype(y.dtype)


class RMSNorm(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            jnp.dtype(self.cfg.param_dtype),
        )
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return (xf * scale.astype(jnp.float32)).astype(self.cfg.dtype)


class Attention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BLD, positions_BL, segment_ids_BL, deterministic: bool, kv=None):
        """The attention block's output ``[B, L, D]``; with a :class:`KVCache` ``kv``
        (decoding) also the cache with this call's keys and values written."""
        c = self.cfg
        d, h, k, dh = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_size

        def proj(name, x, shape, names, n_in):
            return linear(self, name, x, shape, names, n_in, deterministic)

        q_BLHD = constrain(
            proj("q", x_BLD, (d, h, dh), ("embed", "heads", "head_dim"), 1),
            ("batch", "length", "act_heads", None),
        )
        k_BLKD = constrain(
            proj("k", x_BLD, (d, k, dh), ("embed", "kv_heads", "head_dim"), 1),
            ("batch", "length", "act_kv_heads", None),
        )
        v_BLKD = constrain(
            proj("v", x_BLD, (d, k, dh), ("embed", "kv_heads", "head_dim"), 1),
            ("batch", "length", "act_kv_heads", None),
        )
        q_BLHD = rope(q_BLHD, positions_BL, c.rope_theta, c.rope_scaling_factor)
        k_BLKD = rope(k_BLKD, positions_BL, c.rope_theta, c.rope_scaling_factor)
        o_names = ("heads", "head_dim", "embed")
        if kv is not None:
            out_BLHD, kv = cached_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, kv)
            return proj("o", out_BLHD, (h, dh, d), o_names, 2), kv
        use_dropout = c.attention_dropout > 0.0 and not deterministic
        out_BLHD = dot_product_attention(
            q_BLHD,
            k_BLKD,
            v_BLKD,
            segment_ids=segment_ids_BL,
            causal=True,
            implementation=c.attention_impl,
            backend=None if c.attention_backend == "auto" else c.attention_backend,
            interpret=None if c.attention_backend == "auto" else False,
            dropout_rate=c.attention_dropout if use_dropout else 0.0,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
        )
        out_BLHD = constrain(out_BLHD, ("batch", "length", "act_heads", None))
        return proj("o", out_BLHD, (h, dh, d), o_names, 2)


class KVCache(NamedTuple):
    """One layer's decoding cache, as its attention reads and writes it
    (``oasst_jax.decode`` keeps one per layer)."""

    k: jax.Array  # [B, kv_heads, slots, Dh]: kv-head-major, see xla.cached_attention
    v: jax.Array
    segment_ids: jax.Array  # [B, slots], this call's written: 0 = padding or empty, masked
    index: jax.Array  # the first slot this call writes: its queries sit at slots index ..


def cached_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, kv: KVCache):
    """Write this call's keys/values at the cache index, attend to the cache:
    ``(out [B, L, H, Dh], kv)``.  Always the XLA reference: a few new queries against a
    cache gain nothing from flash tiling."""

    def write(cache, new_BLKD):
        new = jnp.swapaxes(new_BLKD, 1, 2).astype(cache.dtype)
        return constrain(
            jax.lax.dynamic_update_slice(cache, new, (0, 0, kv.index, 0)), CACHE_KV_NAMES
        )

    kv = kv._replace(k=write(kv.k, k_BLKD), v=write(kv.v, v_BLKD))
    out_BLHD = xla.cached_attention(
        q_BLHD,
        kv.k,
        kv.v,
        segment_ids=segment_ids_BL,
        kv_segment_ids=kv.segment_ids,
        q_offset=kv.index,
    )
    return constrain(out_BLHD, ("batch", "length", "act_heads", None)), kv


class MLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.cfg
        shape_in, shape_out = (
            (c.hidden_size, c.intermediate_size),
            (c.intermediate_size, c.hidden_size),
        )
        g_BLF = linear(self, "gate", x_BLD, shape_in, ("embed", "mlp"), 1, deterministic)
        u_BLF = linear(self, "up", x_BLD, shape_in, ("embed", "mlp"), 1, deterministic)
        h_BLF = constrain(nn.silu(g_BLF) * u_BLF, ("batch", "length", "act_mlp"))
        return linear(self, "down", h_BLF, shape_out, ("mlp", "embed"), 1, deterministic)


class DecoderLayer(nn.Module):
    """Pre-norm block.  Signature fits ``nn.scan``: ``(carry, per-layer input) -> (carry, None)``.

    The per-layer input is this layer's hidden-dropout rate, so LIMA dropout
    (a rate rising with depth) costs nothing extra inside the scan.  The carry is
    ``(x, positions, segment_ids)``; decoding (``oasst_jax.decode``) appends the layer's
    :class:`KVCache` and gets it back written.

    Megatron sequence parallelism: the residual stream, the norms, dropout and
    the residual adds work on ``res_length`` (the sequence split over the tensor
    axis too), so XLA all-gathers the normed input into each tensor-parallel
    matmul block and reduce-scatters its output, instead of all-reducing it and
    keeping tensor-many copies of every elementwise activation.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, carry, dropout_rate, deterministic: bool = True):
        x_BLD, positions_BL, segment_ids_BL, *kv = carry  # kv: [KVCache] when decoding
        x_BLD = constrain(x_BLD, RESIDUAL)
        h = Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="attn_norm")(x_BLD),
            positions_BL,
            segment_ids_BL,
            deterministic,
            *kv,
        )
        if kv:
            h, *kv = h
        h = constrain(h, RESIDUAL)
        if not deterministic:
            h = dropout(h, dropout_rate, self.make_rng("dropout"))
        x_BLD = x_BLD + h
        h = MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BLD), deterministic)
        h = constrain(h, RESIDUAL)
        if not deterministic:
            h = dropout(h, dropout_rate, self.make_rng("dropout"))
        x_BLD = constrain(x_BLD + h, RESIDUAL)
        return (x_BLD, positions_BL, segment_ids_BL, *kv), None


class DecoderStack(nn.Module):
    """All layers as one ``nn.scan`` over a leading ``layers`` parameter axis."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BLD, positions_BL, segment_ids_BL, dropout_rates, deterministic: bool):
        layer = DecoderLayer
        if self.cfg.remat_policy != "none":
            layer = nn.remat(
                layer,
                policy=remat_policy(self.cfg.remat_policy),
                static_argnums=(3,),
                prevent_cse=False,
            )
        stack = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast),
            length=self.cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        (x_BLD, _, _), _ = stack(self.cfg, name="layers")(
            (x_BLD, positions_BL, segment_ids_BL), dropout_rates, deterministic
        )
        return x_BLD


def hidden_dropout_rates(num_layers: int, hidden_dropout: float, lima: bool) -> np.ndarray:
    """Per-layer hidden-dropout rates.

    LIMA dropout (Megatron-LLM ``--lima_dropout``): ``linspace(0, p, L)``, i.e.
    layer ``i`` of ``L`` uses ``p * i / (L - 1)`` -- 0 at the first layer, ``p``
    at the last.  Without LIMA every layer uses ``p``.
    """
    if not lima:
        return np.full((num_layers,), hidden_dropout, np.float32)
    return np.linspace(0.0, hidden_dropout, num_layers, dtype=np.float32)


class Llama(nn.Module):
    """The decoder: embedding, layer stack and :meth:`head`.  ``setup`` rather than
    ``nn.compact`` so the tail is a method of its own; parameter names and their
    initial values are those ``nn.compact`` gave."""

    cfg: LlamaConfig

    def setup(self):
        c = self.cfg
        self.embedding = self.param(
            "embedding",
            _init(c, ("vocab", "embed")),
            (c.padded_vocab_size, c.hidden_size),
            jnp.dtype(c.param_dtype),
        )
        self.decoder = DecoderStack(c)
        self.final_norm = RMSNorm(c)
        self.lm_head = self.param(
            "lm_head",
            _init(c, ("embed", "vocab")),
            (c.hidden_size, c.padded_vocab_size),
            jnp.dtype(c.param_dtype),
        )
        if c.score_head:
            self.score = nn.Dense(
                1,
                use_bias=False,
                dtype=jnp.float32,  # one column: fp32 scores cost nothing
                param_dtype=jnp.dtype(c.param_dtype),
                kernel_init=_init(c, ("embed", "score")),
                name="score",
            )

    def __call__(
        self,
        tokens_BL: jax.Array,
        *,
        positions_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        dropout_rates: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Logits ``[B, L, V]`` (fp32; padded vocab columns set to -inf-like): :meth:`head`
        of :meth:`decode`.

        With ``segment_ids`` the row is a pack of samples: attention stays inside
        each segment and, unless given, positions restart at 0 per segment.
        """
        x_BLD = self.decode(
            tokens_BL,
            positions_BL=positions_BL,
            segment_ids_BL=segment_ids_BL,
            dropout_rates=dropout_rates,
            deterministic=deterministic,
        )
        if self.cfg.score_head and self.is_initializing():
            self.score(self.final_norm(x_BLD))  # creates the head's kernel
        return self.head(x_BLD)

    def decode(
        self,
        tokens_BL: jax.Array,
        *,
        positions_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        dropout_rates: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """The decoder stack's outputs ``[B, L, D]`` (before the final norm): what
        :meth:`head` (language model) and :meth:`hidden` (reward model) start from."""
        c = self.cfg
        if positions_BL is None:
            if segment_ids_BL is None:
                positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
            else:
                positions_BL = positions_from_segments(segment_ids_BL)
        if dropout_rates is None:
            dropout_rates = jnp.zeros((c.num_hidden_layers,), jnp.float32)
        x_BLD = embed_tokens(c, self.embedding, tokens_BL)
        return self.decoder(x_BLD, positions_BL, segment_ids_BL, dropout_rates, deterministic)

    def hidden(self, tokens_BL: jax.Array, **kwargs) -> jax.Array:
        """The final normed hidden states ``[B, L, D]`` (:meth:`decode`'s keyword
        arguments): what a reward model's score head reads at each reply's last token."""
        return self.final_norm(self.decode(tokens_BL, **kwargs))

    def scores(self, hidden_ND: jax.Array) -> jax.Array:
        """The score head on final normed hidden states: fp32 rewards ``[N]``."""
        return self.score(hidden_ND)[..., 0].astype(jnp.float32)

    def head(self, x_BLD: jax.Array) -> jax.Array:
        """The model's tail: fp32 logits ``[B, L, V]`` of decoder outputs (final norm, LM
        head, padded vocab columns set to -inf-like).  The pipelined train and eval steps
        apply it alone to the last stage's outputs (``apply(..., method=Llama.head)``)."""
        c = self.cfg
        x_BLD = self.final_norm(x_BLD)
        logits_BLV = jnp.einsum(
            "bld,dv->blv",
            x_BLD,
            self.lm_head.astype(c.dtype),
            preferred_element_type=jnp.float32,
        )
        logits_BLV = constrain(logits_BLV, ("batch", "length", "act_vocab"))
        if c.padded_vocab_size != c.vocab_size:
            valid = jnp.arange(c.padded_vocab_size) < c.vocab_size
            logits_BLV = jnp.where(valid, logits_BLV, jnp.finfo(jnp.float32).min)
        return logits_BLV


def embed_tokens(cfg: LlamaConfig, embedding_VD: jax.Array, tokens_BL: jax.Array) -> jax.Array:
    """Token embeddings ``[B, L, D]``; a function so the pipeline schedule can embed
    one micro-batch at a time with the same code as :class:`Llama`.

    One-hot matmul instead of a gather: with the table sharded over vocab
    (tensor) and embed (fsdp) a gather makes XLA replicate the table, the
    matmul becomes a vocab-parallel lookup + all-reduce (Megatron's
    VocabParallelEmbedding), for < 0.2% of the model's FLOPs.
    """
    onehot_BLV = jax.nn.one_hot(tokens_BL, cfg.padded_vocab_size, dtype=cfg.dtype)
    onehot_BLV = constrain(onehot_BLV, ("batch", "length", "act_vocab"))
    x_BLD = jnp.einsum("blv,vd->bld", onehot_BLV, embedding_VD.astype(cfg.dtype))
    return constrain(x_BLD, ("batch", "length", "act_embed"))


def init_rows() -> int:
    """Rows of the dummy batch ``model.init`` traces: one per batch shard of the current
    mesh, since the Pallas attention runs under ``shard_map``, which needs the batch to
    divide evenly over its shards (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else sharding.axis_size(mesh, "batch")


def abstract_params(model: Llama, length: int = 8) -> Any:
    """Boxed (logically partitioned) parameter shapes, traced abstractly: nothing allocated.

    ``nn.get_partition_spec`` of the result gives the logical specs, ``nn.meta.unbox``
    the plain ``ShapeDtypeStruct`` tree.
    """
    tokens = jax.ShapeDtypeStruct((init_rows(), length), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]
