"""Autoregressive decoding with a preallocated KV cache: jitted prefill + on-device loop.

Prompts of different lengths are left-padded to one length ``P`` so every row's
last prompt token sits at slot ``P - 1`` and all rows advance one slot per step;
padding has segment id 0 (real tokens 1), which the model's cached attention
masks, and positions start at 0 at each row's first real token.  So a batched
prompt decodes exactly as it would alone.  The cache holds ``P + max_new_tokens``
slots of kv heads only (``model.CACHE_KV_NAMES``: tensor-parallel over kv heads).

:func:`generate` runs prefill and a ``lax.while_loop`` over decode steps in one
jitted call (reports, ``--json``); :func:`stream` runs the same prefill and step
functions from Python, one token at a time, for interactive printing.

Logits processing follows Hugging Face's order: repetition penalty (CTRL: a seen
token's logit is divided by the penalty when positive, multiplied when negative;
prompt tokens count as seen), temperature, top-k, top-p.  ``temperature == 0``
is greedy (argmax after the penalty).  A row stops at the first stop id
(``<|im_end|>``, EOS); the returned ids exclude it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from oasst_jax import sharding
from oasst_jax.chatml import prompt_ids
from oasst_jax.model import CACHE_KV_NAMES, DecoderLayer, KVCache, Llama, LlamaConfig
from oasst_jax.tokenizer import Tokenizer

PAD_ID = 0  # what fills left padding; masked, so any valid id works
PAD_MULTIPLE = 32  # prompt lengths are rounded up to this, so chats rarely recompile


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static (hashable) decoding settings; a change recompiles the loop."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling settings {self}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class DecodeState(NamedTuple):
    cache: Cache
    token_B: jax.Array  # last sampled token: the next step's input
    position_B: jax.Array  # its position
    seen_BV: jax.Array  # bool: ids in the prompt or sampled (repetition penalty)
    out_BN: jax.Array  # sampled ids, stop tokens included
    step: jax.Array  # how many tokens have been sampled
    done_B: jax.Array  # row has sampled a stop id


class Generation(NamedTuple):
    ids: list[list[int]]  # per prompt, stop token excluded
    seconds: float  # prefill + decode wall time, compilation excluded

    @property
    def tokens_per_second(self) -> float:
        return sum(len(r) for r in self.ids) / max(self.seconds, 1e-9)


def inference_config(cfg: LlamaConfig) -> LlamaConfig:
    """Training-only settings off: no rematerialisation, params in the compute dtype."""
    return dataclasses.replace(cfg, remat_policy="none", param_dtype=cfg.dtype)


def left_pad(
    prompts: Sequence[Sequence[int]], multiple: int = PAD_MULTIPLE
) -> tuple[np.ndarray, ...]:
    """``(tokens, segment_ids, positions)`` ``[B, P]``, rows right-aligned at ``P``."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), length), PAD_ID, np.int32)
    segments = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, length - len(p) :] = p
        segments[row, length - len(p) :] = 1
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
    return tokens, segments, positions


class Cache(NamedTuple):
    """The KV cache: one :class:`model.KVCache`'s keys and values per layer (separate
    arrays, so each layer's attention reads its own in place), and the slots' segment ids
    and next free slot, which all layers share."""

    k: tuple[jax.Array, ...]  # per layer [B, kv_heads, slots, Dh]
    v: tuple[jax.Array, ...]
    segment_ids: jax.Array  # [B, slots]: 0 = padding or empty, masked
    index: jax.Array  # the next call writes from this slot on


def init_cache(cfg: LlamaConfig, batch: int, length: int, mesh: Mesh | None = None) -> Cache:
    """A zero KV cache of ``length`` slots, sharded by its logical axes under ``mesh``
    (kv heads over ``tensor``, rows over the batch axes)."""
    kv_shape = (batch, cfg.num_key_value_heads, length, cfg.head_size)
    layers = cfg.num_hidden_layers
    abstract = Cache(
        k=(jax.ShapeDtypeStruct(kv_shape, jnp.dtype(cfg.dtype)),) * layers,
        v=(jax.ShapeDtypeStruct(kv_shape, jnp.dtype(cfg.dtype)),) * layers,
        segment_ids=jax.ShapeDtypeStruct((batch, length), jnp.int32),
        index=jax.ShapeDtypeStruct((), jnp.int32),
    )
    shardings = None
    if mesh is not None:
        kv = sharding.logical_sharding(mesh, CACHE_KV_NAMES)
        shardings = Cache(
            k=(kv,) * layers,
            v=(kv,) * layers,
            segment_ids=sharding.logical_sharding(mesh, ("batch", None)),
            index=sharding.logical_sharding(mesh, ()),
        )

    def zeros():
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)

    return jax.jit(zeros, out_shardings=shardings)()


def split_layers(params: Any) -> list[Any]:
    """The decoder's stacked ``[layers, ...]`` weights as one tree per layer.

    Decoding runs its layers unrolled on these rather than scanning the stacked weights:
    a scan slices (copies) every layer's weights out of the stack at every step, which
    took as long as the step's matmuls on CPU.  Splitting inside a jitted generation is
    loop-invariant, so it happens once per call, at the cost of a second copy of the
    decoder weights while the call runs.
    """
    stacked = params["decoder"]["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)]


def forward(
    model: Llama,
    params: Any,
    layers: Sequence[Any],
    cache: Cache,
    tokens_BL: jax.Array,
    positions_BL: jax.Array,
    segment_ids_BL: jax.Array,
) -> tuple[jax.Array, Cache]:
    """``(fp32 logits [B, V] of the last position, the cache with this call written)``.

    ``Llama.__call__``'s values with three inference shortcuts.  The layers run unrolled
    on :func:`split_layers`' weights, carrying each layer's :class:`model.KVCache`.  The
    LM head runs on the last position only (a prompt's other logits are never read; over
    the whole prompt the head cost as much as all of a small model's layers).  The
    embedding is a row gather rather than training's one-hot matmul (an exact lookup
    either way; the matmul reads the whole table for every token).
    """
    c = model.cfg
    # the table gathered whole first (what the lookup needs anyway): a gather from the
    # fsdp x tensor-sharded table into batch-sharded rows is one XLA cannot partition
    table_VD = sharding.constrain(params["embedding"], (None, None))
    x_BLD = jnp.take(table_VD, tokens_BL, axis=0).astype(c.dtype)
    x_BLD = sharding.constrain(x_BLD, ("batch", "length", "act_embed"))
    segments = jax.lax.dynamic_update_slice(
        cache.segment_ids, segment_ids_BL.astype(jnp.int32), (0, cache.index)
    )
    layer = DecoderLayer(c)
    ks, vs = [], []
    for layer_params, k, v in zip(layers, cache.k, cache.v, strict=True):
        kv = KVCache(k=k, v=v, segment_ids=segments, index=cache.index)
        carry = (x_BLD, positions_BL, segment_ids_BL, kv)
        (x_BLD, _, _, kv), _ = layer.apply({"params": layer_params}, carry, 0.0, True)
        ks.append(kv.k)
        vs.append(kv.v)
    logits_BV = model.apply({"params": params}, x_BLD[:, -1:], method=Llama.head)[:, 0]
    index = cache.index + tokens_BL.shape[1]
    return logits_BV, Cache(tuple(ks), tuple(vs), segments, index)


def seen_mask(tokens_BP: jax.Array, segments_BP: jax.Array, vocab: int) -> jax.Array:
    """``[B, vocab]`` bool: the ids a row's real (segment != 0) tokens hold."""
    rows = jnp.arange(tokens_BP.shape[0])[:, None]
    counts = jnp.zeros((tokens_BP.shape[0], vocab), jnp.int32)
    return counts.at[rows, tokens_BP].add(segments_BP) > 0


def process_logits(logits_BV: jax.Array, seen_BV: jax.Array, sp: SamplingParams) -> jax.Array:
    """Penalty, temperature, top-k, top-p; removed tokens get ``-inf``."""
    if sp.repetition_penalty != 1.0:
        penalised = jnp.where(
            logits_BV < 0, logits_BV * sp.repetition_penalty, logits_BV / sp.repetition_penalty
        )
        logits_BV = jnp.where(seen_BV, penalised, logits_BV)
    if sp.temperature == 0.0:
        return logits_BV
    logits_BV = logits_BV / sp.temperature
    if sp.top_k:
        kth = jax.lax.top_k(logits_BV, sp.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    if sp.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # the smallest logit whose preceding mass is still below top_p (the first always is)
        cutoff = jnp.min(jnp.where(mass_before < sp.top_p, sorted_BV, jnp.inf), axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff[:, None], -jnp.inf, logits_BV)
    return logits_BV


def choose(
    logits_BV: jax.Array, seen_BV: jax.Array, key: jax.Array, sp: SamplingParams
) -> jax.Array:
    """Next ids ``[B]``: argmax when greedy, else a sample from the processed logits."""
    logits_BV = process_logits(logits_BV, seen_BV, sp)
    if sp.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _record(state: DecodeState, token_B: jax.Array, stop_ids: tuple[int, ...]) -> DecodeState:
    """Append ``token_B`` to the output and mark rows that hit a stop id."""
    rows = jnp.arange(token_B.shape[0])
    return state._replace(
        token_B=token_B,
        position_B=state.position_B + 1,
        seen_BV=state.seen_BV.at[rows, token_B].set(True),
        out_BN=state.out_BN.at[:, state.step].set(token_B),
        step=state.step + 1,
        done_B=state.done_B | jnp.isin(token_B, jnp.asarray(stop_ids, jnp.int32)),
    )


def prefill(
    model: Llama,
    sp: SamplingParams,
    stop_ids: tuple[int, ...],
    params: Any,
    layers: Sequence[Any],
    cache: Cache,
    tokens_BP: jax.Array,
    segments_BP: jax.Array,
    positions_BP: jax.Array,
    seen_BV: jax.Array,
    key: jax.Array,
) -> DecodeState:
    """Run the prompt through the model, filling the cache from its index on, and sample
    the first token.  ``layers``: :func:`split_layers` of ``params``; ``seen_BV``: the ids
    the repetition penalty counts as seen."""
    logits_BV, cache = forward(model, params, layers, cache, tokens_BP, positions_BP, segments_BP)
    batch = tokens_BP.shape[0]
    state = DecodeState(
        cache=cache,
        token_B=tokens_BP[:, -1],
        position_B=positions_BP[:, -1],
        seen_BV=seen_BV,
        out_BN=jnp.zeros((batch, sp.max_new_tokens), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        done_B=jnp.zeros((batch,), bool),
    )
    token = choose(logits_BV, seen_BV, jax.random.fold_in(key, 0), sp)
    return _record(state, token, stop_ids)


def decode_step(
    model: Llama,
    sp: SamplingParams,
    stop_ids: tuple[int, ...],
    params: Any,
    layers: Sequence[Any],
    state: DecodeState,
    key: jax.Array,
) -> DecodeState:
    """Feed the last token through the cached model and sample the next one."""
    logits_BV, cache = forward(
        model,
        params,
        layers,
        state.cache,
        state.token_B[:, None],
        state.position_B[:, None],
        jnp.ones_like(state.token_B)[:, None],
    )
    token = choose(logits_BV, state.seen_BV, jax.random.fold_in(key, state.step), sp)
    return _record(state._replace(cache=cache), token, stop_ids)


def _generate(model, sp, stop_ids, params, cache, tokens, segments, positions, key):
    seen = seen_mask(tokens, segments, model.cfg.padded_vocab_size)
    layers = split_layers(params)
    state = prefill(
        model, sp, stop_ids, params, layers, cache, tokens, segments, positions, seen, key
    )
    state = jax.lax.while_loop(
        lambda s: (s.step < sp.max_new_tokens) & ~jnp.all(s.done_B),
        lambda s: decode_step(model, sp, stop_ids, params, layers, s, key),
        state,
    )
    return sharding.constrain(state.out_BN, (None, None))  # replicated: every host reads it


_STATIC = ("model", "sp", "stop_ids")
_generate_jit = jax.jit(_generate, static_argnames=_STATIC)
_prefill_jit = jax.jit(prefill, static_argnames=_STATIC, donate_argnames=("cache",))
_step_jit = jax.jit(decode_step, static_argnames=_STATIC, donate_argnames=("state",))
_split_jit = jax.jit(split_layers)


def on_mesh(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """``jax.set_mesh(mesh)``, or nothing without a mesh (single-device decoding)."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def trim(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """Ids before the first stop id."""
    out = []
    for i in ids:
        if int(i) in stop_ids:
            break
        out.append(int(i))
    return out


def _setup(cfg, prompts, sp, mesh, seed):
    """Model, zero cache, the jitted functions' array arguments, and ``sp`` with
    ``max_new_tokens`` cut to what the context window leaves after the longest prompt."""
    model = Llama(inference_config(cfg))
    tokens, segments, positions = left_pad(prompts)
    room = cfg.max_position_embeddings - max(len(p) for p in prompts)
    if room < 1:
        n, longest = max(enumerate(prompts), key=lambda item: len(item[1]))
        raise ValueError(
            f"prompts[{n}] ({len(longest)} tokens) fills the context window "
            f"(max_position_embeddings={cfg.max_position_embeddings}), leaving no room to generate"
        )
    sp = dataclasses.replace(sp, max_new_tokens=min(sp.max_new_tokens, room))
    cache = init_cache(model.cfg, len(prompts), tokens.shape[1] + sp.max_new_tokens, mesh)
    return model, sp, cache, (tokens, segments, positions, jax.random.key(seed))


def generate(
    params: Any,
    cfg: LlamaConfig,
    prompts: Sequence[Sequence[int]],
    sp: SamplingParams,
    stop_ids: Sequence[int],
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> Generation:
    """Generated ids per prompt (stop token excluded), the whole loop on device.

    At most ``sp.max_new_tokens`` per prompt, fewer where the longest prompt plus
    that would pass ``max_position_embeddings``.

    ``params`` must already sit on ``mesh`` (see ``weights.load_for_inference``); with a
    mesh the cache is sharded by its logical axes (kv heads over ``tensor``).
    Compiled ahead of the timed run, so ``seconds`` excludes compilation.
    """
    model, sp, cache, args = _setup(cfg, prompts, sp, mesh, seed)
    stop = tuple(sorted({int(s) for s in stop_ids}))
    with on_mesh(mesh):
        compiled = _generate_jit.lower(model, sp, stop, params, cache, *args).compile()
        start = time.perf_counter()
        out = np.asarray(compiled(params, cache, *args))
        seconds = time.perf_counter() - start
    return Generation([trim(row, stop) for row in out], seconds)


def stream(
    params: Any,
    cfg: LlamaConfig,
    prompt: Sequence[int],
    sp: SamplingParams,
    stop_ids: Sequence[int],
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> Iterator[int]:
    """Yield one prompt's generated ids as they decode (stop token excluded)."""
    capacity = _round_up(len(prompt)) + sp.max_new_tokens
    chat = Chat(params, cfg, sp, stop_ids, seed=seed, mesh=mesh, capacity=capacity)
    yield from chat.turn(prompt)


def _round_up(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


class Chat:
    """One conversation's KV cache, kept across turns, so a turn prefills only the ids the
    cache does not hold yet (the new user turn, the assistant header, and whatever of the
    previous reply was never fed: its closing ``<|im_end|>``, or its last token when the
    reply was cut at ``max_new_tokens``) rather than the whole history.

    The cache has ``capacity`` slots (default: the context window, so a conversation fits
    and the decode step compiles once for all of it, rather than once per size of a
    growing cache); each turn's new ids are left-padded to :data:`PAD_MULTIPLE` masked
    slots, so prefill compiles for few lengths.  Only when those padding slots leave no
    room for the next turn is the whole history prefilled into a fresh cache (``note``
    says so).  Results are those of re-prefilling the whole token history every turn
    (``keep_cache=False``), repetition penalty included: the penalty's seen ids are the
    whole history's.

    ``history`` is the conversation's ids (prompts, replies, closing tokens) in the order
    the model reads them; ``prefilled`` the ids each turn prefilled.  The chat keeps its
    own per-layer copy of the decoder weights (:func:`split_layers`), made once.
    """

    def __init__(
        self,
        params: Any,
        cfg: LlamaConfig,
        sp: SamplingParams,
        stop_ids: Sequence[int],
        *,
        seed: int = 0,
        mesh: Mesh | None = None,
        capacity: int | None = None,
        keep_cache: bool = True,
        note: Callable[[str], None] | None = None,
    ):
        self.params, self.cfg, self.sp, self.mesh = params, cfg, sp, mesh
        self.model = Llama(inference_config(cfg))
        with on_mesh(mesh):
            self.layers = _split_jit(params)
        self.stop = tuple(sorted({int(s) for s in stop_ids}))
        self.key = jax.random.key(seed)
        self.capacity = capacity or _round_up(cfg.max_position_embeddings)
        self.keep_cache, self.note = keep_cache, note
        self.history: list[int] = []
        self.prefilled: list[int] = []
        self._state: DecodeState | None = None
        self._cached = 0  # how many ids of history the cache holds
        self._slots = 0  # the cache's index: cached ids plus padding slots

    def turn(self, new_ids: Sequence[int]) -> Iterator[int]:
        """Append ``new_ids`` to the conversation and yield the reply's ids as they decode
        (stop token excluded).  At most ``sp.max_new_tokens``, fewer where the context
        window ends first."""
        if not new_ids:
            raise ValueError("a turn needs at least one token")
        self.history.extend(int(i) for i in new_ids)
        window = self.cfg.max_position_embeddings
        room = window - len(self.history)
        if room < 1:
            raise ValueError(
                f"the conversation is {len(self.history)} tokens; the context window "
                f"(max_position_embeddings) is {window}, leaving no room to generate"
            )
        limit = min(self.sp.max_new_tokens, room)
        todo = self.history[self._cached :]
        if self._state is None or not self.keep_cache or not self._fits(len(todo), limit):
            if self._state is not None and self.keep_cache and self.note:
                self.note(
                    f"the KV cache ({self.capacity} slots) is full; re-reading the "
                    f"{len(self.history)}-token conversation into a fresh cache"
                )
            self._state, self._cached, self._slots, todo = None, 0, 0, self.history
            if not self._fits(len(todo), limit):
                raise ValueError(
                    f"a {len(todo)}-token prompt and {limit} new tokens do not fit a "
                    f"{self.capacity}-slot KV cache"
                )
            cache = init_cache(self.model.cfg, 1, self.capacity, self.mesh)
        else:
            cache, self._state = self._state.cache, None  # donated to prefill
        tokens, segments, positions = left_pad([todo])
        seen = np.zeros((1, self.cfg.padded_vocab_size), bool)
        seen[0, self.history] = True
        args = (tokens, segments, positions + self._cached, seen, self.key)
        self.prefilled.append(len(todo))
        with on_mesh(self.mesh):
            state = _prefill_jit(
                self.model, self.sp, self.stop, self.params, self.layers, cache, *args
            )
            self._slots += tokens.shape[1]
            self._cached += len(todo)
            for n in range(1, limit + 1):
                token = int(state.token_B[0])
                if token in self.stop:
                    break
                self.history.append(token)
                yield token
                if n == limit:
                    break
                state = _step_jit(
                    self.model, self.sp, self.stop, self.params, self.layers, state, self.key
                )
                self._slots += 1
                self._cached += 1
        self._state = state

    def _fits(self, new: int, limit: int) -> bool:
        """Whether ``new`` ids (padded) and a ``limit``-token reply fit the cache's free
        slots (the reply's last token is never fed)."""
        return self._slots + _round_up(new) + limit - 1 <= self.capacity


# ----------------------------------------------------------------------------- eval samples


def read_prompts(path: str) -> list[str]:
    """Prompts from a JSON-lines file: strings or objects with ``"prompt"`` (Open-Assistant's
    ``prompt_lottery`` lines); one-line ``ValueError`` naming the line that is neither."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            prompt = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(prompt, str):
                raise ValueError(
                    f'{path}:{number}: expected a JSON string or {{"prompt": string}}, '
                    f"got {line.strip()[:60]}"
                )
            prompts.append(prompt)
    return prompts


def eval_prompts(path: str | None = None) -> list[str]:
    """The eval-time sample prompts: ``path`` (an ``eval_prompts`` JSONL file), or the
    small default set shipped with the package (``resources/eval_prompts.jsonl``)."""
    if path:
        return read_prompts(path)
    default = importlib.resources.files("oasst_jax") / "resources" / "eval_prompts.jsonl"
    with importlib.resources.as_file(default) as file:
        return read_prompts(str(file))


def greedy_replies(
    model_cfg: LlamaConfig,
    params: Any,
    mesh: Mesh,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    system: str | None = None,
) -> list[str]:
    """Greedy replies to ``prompts`` (user turns in chatml) from the training parameters
    as they are, so the trainer can log generation samples without a checkpoint round trip.

    ``params`` are the train state's (fp32 master weights, sharded by the training rules
    on ``mesh``): never gathered onto one host, but split per layer once per call
    (:func:`split_layers`), so a second copy of the decoder weights, sharded alike, lives
    while the replies decode (less than the gradients the train step frees meanwhile).
    The prompts decode as one left-padded batch, padded to a multiple of the mesh's batch
    shards with repeats of the first prompt (dropped from the result), and the generated
    ids come back replicated, so every process of a multi-host job gets all replies.
    """
    if not prompts:
        return []
    ids = [prompt_ids(tokenizer, [{"role": "user", "content": p}], system) for p in prompts]
    rows = sharding.axis_size(mesh, "batch")
    batch = ids + [ids[0]] * (-len(ids) % rows)
    sp = SamplingParams(max_new_tokens=max_new_tokens)
    stop = (tokenizer.im_end_id, tokenizer.eos_id)
    model, sp, cache, args = _setup(model_cfg, batch, sp, mesh, seed=0)
    with jax.set_mesh(mesh):
        # a plain jitted call, not generate's ahead-of-time compiled one (which times the
        # run alone): that one refuses a QLoRA base's sub-byte (nf4) kernels in the
        # unpacked layout the CPU client reports for them, a jitted call takes them
        out = np.asarray(_generate_jit(model, sp, stop, params, cache, *args))
    return [tokenizer.decode(trim(o, stop)) for o in out[: len(prompts)]]
