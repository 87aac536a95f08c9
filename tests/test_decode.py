"""Decoding beyond one prompt: a chat's KV cache kept across turns, eval-time greedy replies
from the sharded training parameters, the eval prompt sets, and the decode benchmark."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import COMPILE_FLAGS, REPO, tiny_llama
from flax import linen as nn

from oasst_jax import decode, lora, sharding
from oasst_jax.chatml import prompt_ids
from oasst_jax.model import Llama
from oasst_jax.tokenizer import Tokenizer
from oasst_jax.train_step import model_params

TINY = tiny_llama(max_position_embeddings=128)
GREEDY = decode.SamplingParams(max_new_tokens=6)


def _boxed(cfg=TINY):
    return jax.jit(Llama(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def _chat(params, turns, stop_ids=(), **kw):
    notes: list[str] = []
    chat = decode.Chat(params, TINY, GREEDY, stop_ids, note=notes.append, **kw)
    return [list(chat.turn(t)) for t in turns], chat, notes


def test_chat_keeps_the_cache_and_equals_full_reprefill():
    """Each turn prefills only its own ids (plus the previous reply's last token, which a
    reply cut at max_new_tokens never fed); the replies equal re-prefilling the whole
    history every turn.  The 4th turn's padding slots (32 a turn) overflow the 128-slot
    cache: one note, one re-prefill of the history, same replies."""
    params = nn.meta.unbox(_boxed())
    turns = [[5, 17, 33, 2, 9, 41, 8], [12, 7, 90, 3, 4], [55, 6, 1, 70, 19, 23], [8, 9, 10, 11]]
    cached, chat, notes = _chat(params, turns)
    full, _, _ = _chat(params, turns, keep_cache=False)
    assert cached == full
    assert all(len(r) == GREEDY.max_new_tokens for r in cached)  # no stop ids: all cut at 6
    history_before_4 = sum(map(len, turns[:3])) + 3 * GREEDY.max_new_tokens
    assert chat.prefilled == [7, 5 + 1, 6 + 1, history_before_4 + len(turns[3])]
    assert len(notes) == 1 and "is full; re-reading the 40-token conversation" in notes[0]
    assert chat.history == [i for t, r in zip(turns, cached, strict=True) for i in (*t, *r)]
    # a stop id ends reply 2 early; all of that reply's ids were fed, so turn 3 prefills
    # exactly its own ids
    k = next(i for i, t in enumerate(cached[1]) if i and t not in cached[0] + cached[1][:i])
    stopped, chat, _ = _chat(params, turns[:3], stop_ids=(cached[1][k],))
    assert stopped[:2] == [cached[0], cached[1][:k]]
    assert chat.prefilled == [7, 5 + 1, 6]


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return Tokenizer(sp_model_path)


@pytest.mark.parametrize(
    "axes",
    [{"fsdp": 2, "sequence": 2, "tensor": 2}, {"pipeline": 2, "fsdp": 2, "tensor": 2}],
    ids=["tiny_mesh", "pipeline"],
)
def test_greedy_replies_from_sharded_training_params_equal_unsharded(tok, axes):
    """configs/tiny.py's mesh, and one with pipeline stages (the card's stage-1 layout has
    4; its layers are split over them), fp32 master params sharded by the training rules;
    5 prompts pad to a multiple of the batch shards (2)."""
    cfg = tiny_llama(vocab_size=tok.vocab_size, max_position_embeddings=128)
    boxed = _boxed(cfg)
    params = nn.meta.unbox(boxed)
    mesh = sharding.make_mesh(axes)
    sharded = jax.device_put(params, sharding.param_shardings(mesh, boxed))
    assert tuple(sharded["embedding"].sharding.spec) == ("tensor", "fsdp")
    prompts = decode.eval_prompts()[:5]
    replies = decode.greedy_replies(cfg, sharded, mesh, tok, prompts, max_new_tokens=8)
    ids = [prompt_ids(tok, [{"role": "user", "content": p}]) for p in prompts]
    stops = (tok.im_end_id, tok.eos_id)
    sp = decode.SamplingParams(max_new_tokens=8)
    reference = decode.generate(params, cfg, ids, sp, stops).ids
    assert replies == [tok.decode(r) for r in reference]
    assert any(replies)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4"])  # sub-byte: the layout case; int8 decodes alike
def test_greedy_replies_over_a_quantized_lora_base(tok, kind):
    """QLoRA's eval samples: the adapters merged into the qwix-quantized frozen base as the
    train state holds them (``train_step.model_params``), on a 4-device mesh: the replies'
    ids equal a step-by-step argmax of the full (uncached) forward over the same tree."""
    cfg = tiny_llama(
        vocab_size=tok.vocab_size,
        max_position_embeddings=128,
        lora_rank=4,
        lora_alpha=8.0,
        lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        lora_base_dtype=kind,
    )
    adapters, base = lora.split(nn.meta.unbox(_boxed(cfg)))
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(adapters))))
    adapters = jax.tree.map(lambda a: 0.3 * jax.random.normal(next(keys), a.shape), adapters)
    params = model_params(adapters, jax.jit(lambda b: lora.freeze(b, cfg))(base))
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    placed = jax.device_put(params, sharding.logical_sharding(mesh, ()))
    prompts = decode.eval_prompts()[:2]
    replies = decode.greedy_replies(cfg, placed, mesh, tok, prompts, max_new_tokens=6)
    model = Llama(decode.inference_config(cfg))
    # causal: the logits at t see tokens <= t only, so one right-padded length compiles once
    forward = jax.jit(lambda row: model.apply({"params": params}, row[None])[0])
    stops = (tok.im_end_id, tok.eos_id)
    for prompt, reply in zip(prompts, replies, strict=True):
        ids = prompt_ids(tok, [{"role": "user", "content": prompt}])
        want = []
        for _ in range(6):
            row = np.zeros(128, np.int32)
            row[: len(ids) + len(want)] = ids + want
            token = int(jnp.argmax(forward(row)[len(ids) + len(want) - 1]))
            if token in stops:
                break
            want.append(token)
        assert reply == tok.decode(want)


def test_eval_prompts(tmp_path):
    default = decode.eval_prompts()
    assert 4 <= len(default) <= 6 and all(isinstance(p, str) and p for p in default)
    path = tmp_path / "eval_prompts.jsonl"
    path.write_text('"plain string"\n\n{"prompt": "an object", "lang": "en"}\n')
    assert decode.eval_prompts(str(path)) == ["plain string", "an object"]
    path.write_text('"ok"\n["a list"]\n')
    with pytest.raises(ValueError, match=r"eval_prompts.jsonl:2: expected a JSON string"):
        decode.eval_prompts(str(path))


@pytest.mark.slow
def test_benchmark_smoke():
    """``benchmarks/decode.py --smoke``: a JSON line for batch 2, ours and transformers'
    greedy ids equal, every measured time positive.  (``step_ms`` is a difference of two
    times: with 4 toy tokens, noise can make it negative on a loaded machine.)"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": COMPILE_FLAGS}  # one device
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "decode.py"), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["batch"] for r in records] == [2]
    for r in records:
        assert r["same_ids"] is True
        for side in ("ours", "transformers"):
            assert r[side]["prefill_ms"] > 0 and r[side]["generate_ms"] > 0
            assert math.isfinite(r[side]["step_ms"]) and r[side]["new_tokens_per_s"] > 0
        assert r["speedup"]["generate"] > 0
