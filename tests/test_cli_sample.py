"""Decoding: KV cache == full recompute == transformers, batching, sharding, sampling, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_hf_llama, tiny_llama
from flax import linen as nn

from oasst_jax import checkpoint, decode
from oasst_jax.chatml import prompt_ids
from oasst_jax.cli import sample
from oasst_jax.hf.load import load_hf
from oasst_jax.model import Llama, LlamaConfig
from oasst_jax.sharding import make_mesh, tree_shardings
from oasst_jax.tokenizer import Tokenizer

# vocab 200 pads to 256, so padded logit columns are present (and must never be chosen).
TINY = tiny_llama(max_position_embeddings=128)
GREEDY = decode.SamplingParams(max_new_tokens=10)
SAMPLED = decode.SamplingParams(
    max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3
)


def _params(cfg: LlamaConfig = TINY, seed: int = 0):
    """Boxed params (``nn.get_partition_spec`` needs the boxes)."""
    init = jax.jit(Llama(cfg).init)
    return init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]


def _prompts(lengths=(5, 11, 3), vocab: int = TINY.vocab_size) -> list[list[int]]:
    rs = np.random.RandomState(0)
    return [rs.randint(0, vocab, n).tolist() for n in lengths]


def _greedy_by_recompute(params, cfg: LlamaConfig, prompt: list[int], n: int) -> list[int]:
    """Reference: the whole sequence through the plain forward for every new token.

    Right-padded to one length (causal: later slots cannot change earlier logits),
    so it compiles once.
    """
    apply = jax.jit(Llama(cfg).apply)
    tokens = np.zeros((1, len(prompt) + n), np.int32)
    tokens[0, : len(prompt)] = prompt
    for end in range(len(prompt), len(prompt) + n):
        logits = apply({"params": params}, tokens)
        tokens[0, end] = int(jnp.argmax(logits[0, end - 1]))
    return tokens[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def tiny():
    boxed = _params()
    return boxed, nn.meta.unbox(boxed)


@pytest.fixture(scope="module")
def greedy_batch(tiny):
    return decode.generate(tiny[1], TINY, _prompts(), GREEDY, stop_ids=()).ids


# ----------------------------------------------------------------------------- exactness


def test_cached_greedy_equals_full_recompute(tiny, greedy_batch):
    for prompt, out in zip(_prompts(), greedy_batch, strict=True):
        assert out == _greedy_by_recompute(tiny[1], TINY, prompt, GREEDY.max_new_tokens)


def test_left_padded_batch_equals_one_by_one_and_stream(tiny, greedy_batch):
    params = tiny[1]
    prompt = _prompts()[1]
    alone = decode.generate(params, TINY, [prompt], GREEDY, stop_ids=()).ids[0]
    assert alone == greedy_batch[1]
    assert list(decode.stream(params, TINY, prompt, GREEDY, stop_ids=())) == alone


def test_stop_token_ends_a_row_and_is_excluded(tiny, greedy_batch):
    stop = greedy_batch[0][4]
    first = greedy_batch[0].index(stop)
    out = decode.generate(tiny[1], TINY, _prompts(), GREEDY, stop_ids=(stop,)).ids
    assert out[0] == greedy_batch[0][:first]
    for got, full in zip(out, greedy_batch, strict=True):
        assert got == decode.trim(full, (stop,))


def _hf_model(path) -> str:
    """A random tiny GQA ``LlamaForCausalLM`` (std 0.1 weights: confident, tie-free argmax)."""
    return tiny_hf_llama(path, eos_token_id=2)


def test_greedy_equals_transformers_generate(tmp_path):
    hf_dir = _hf_model(tmp_path / "hf")
    params, cfg, _ = load_hf(hf_dir, dtype="float32")
    prompts = _prompts((7, 4), vocab=300)
    ours = decode.generate(params, cfg, prompts, GREEDY, stop_ids=(2,)).ids
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    for prompt, out in zip(prompts, ours, strict=True):
        with torch.no_grad():
            hf = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=GREEDY.max_new_tokens,
                eos_token_id=2,
                pad_token_id=0,
            )
        assert out == decode.trim(hf[0, len(prompt) :].tolist(), (2,))


def test_sharded_decoding_equals_unsharded(tiny, greedy_batch):
    boxed, params = tiny
    prompts = _prompts()[:2]
    mesh = make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    with jax.set_mesh(mesh):
        sharded = jax.device_put(params, tree_shardings(mesh, nn.get_partition_spec(boxed)))
    cache = decode.init_cache(TINY, 2, 64, mesh)
    assert cache.k[0].sharding.spec[1] == "tensor"  # a layer's [B, kv heads, slots, Dh]
    greedy = decode.generate(sharded, TINY, prompts, GREEDY, stop_ids=(), mesh=mesh).ids
    assert greedy == greedy_batch[:2]
    sampled = decode.generate(sharded, TINY, prompts, SAMPLED, stop_ids=(), seed=3, mesh=mesh).ids
    assert sampled == decode.generate(params, TINY, prompts, SAMPLED, stop_ids=(), seed=3).ids
    assert sampled != greedy  # it really sampled


# ----------------------------------------------------------------------------- logits processing


def test_repetition_penalty_matches_transformers():
    rs = np.random.RandomState(0)
    logits = rs.randn(2, 50).astype(np.float32)
    seen_ids = [[1, 7, 7, 30], [0, 49, 12, 3]]
    seen = np.zeros((2, 50), bool)
    for row, ids in enumerate(seen_ids):
        seen[row, ids] = True
    sp = decode.SamplingParams(repetition_penalty=1.5)
    ours = decode.process_logits(jnp.asarray(logits), jnp.asarray(seen), sp)
    hf = transformers.RepetitionPenaltyLogitsProcessor(1.5)(
        torch.tensor(seen_ids), torch.from_numpy(logits.copy())
    )
    np.testing.assert_allclose(np.asarray(ours), hf.numpy(), rtol=1e-6)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    seen = jnp.zeros((1, 4), bool)

    def kept(**kw):
        sp = decode.SamplingParams(temperature=1.0, **kw)
        return np.isfinite(np.asarray(decode.process_logits(logits, seen, sp)))[0].tolist()

    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(top_p=1.0) == [True] * 4
    top1 = decode.SamplingParams(temperature=1.0, top_k=1)
    keys = jax.random.split(jax.random.key(0), 5)
    assert [int(decode.choose(logits, seen, k, top1)[0]) for k in keys] == [0] * 5


def test_left_pad_layout():
    tokens, segments, positions = decode.left_pad([[5, 6, 7], [8]], multiple=4)
    assert tokens.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert segments.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert positions.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, sp_model_path):
    """A random tiny checkpoint whose vocabulary is the test tokenizer's."""
    tok = Tokenizer(sp_model_path)
    # room for the card's system prompt (~550 tokens with this 300-piece tokenizer)
    cfg = LlamaConfig(
        **{**TINY.__dict__, "vocab_size": tok.vocab_size, "max_position_embeddings": 1024}
    )
    params = nn.meta.unbox(_params(cfg))
    path = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    checkpoint.save_weights(path, params, cfg)
    return path, params, cfg, tok


@pytest.mark.slow  # a CLI process start
def test_cli_json_lines(tiny_ckpt, sp_model_path):
    path, params, cfg, tok = tiny_ckpt
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    messages = ["hello world", "please explain python"]
    cmd = [sys.executable, "-m", "oasst_jax.sample", "--ckpt", path, "--tokenizer"]
    cmd += [str(sp_model_path), "--json", "--temperature", "0", "--max-new-tokens", "8"]
    cmd += [a for m in messages for a in ("--prompt", m)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in lines] == messages
    for line, message in zip(lines, messages, strict=True):
        expected = prompt_ids(tok, [{"role": "user", "content": message}], sample.SYSTEM_PROMPT)
        assert line["prompt_ids"] == expected
        assert line["text"] == tok.decode(line["output_ids"])
        stops = sample.stop_ids(tok)
        ref = decode.generate(params, cfg, [expected], GREEDY, stop_ids=stops).ids[0]
        assert line["output_ids"] == ref[: len(line["output_ids"])]
        assert not set(line["output_ids"]) & set(stops)


def test_sampling_report(tiny_ckpt, sp_model_path, tmp_path):
    path, *_ = tiny_ckpt
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"hello world"\n{"prompt": "what is this"}\n')
    out = tmp_path / "report.json"
    out.write_text("an older report, replaced whole")
    sample.main(
        ["--ckpt", path, "--tokenizer", str(sp_model_path), "--prompts", str(prompts)]
        + ["--out", str(out), "--num-samples", "2", "--max-new-tokens", "6", "--system", ""]
        + ["--temperature", "0.8", "--top-k", "20", "--model-name", "tiny"]
    )
    report = json.loads(out.read_text())
    assert sorted(os.listdir(tmp_path)) == ["prompts.jsonl", "report.json"]  # no temporaries
    assert report["model_name"] == "tiny" and report["date"] and report["args"]["seed"] == 0
    assert [p["prompt"] for p in report["prompts"]] == ["hello world", "what is this"]
    assert report["tokens_per_second"] > 0
    for entry in report["prompts"]:
        (result,) = entry["results"]
        assert result["sampling_config"] == "t0.8_k20_p0.9"
        assert result["sampling_params"]["temperature"] == 0.8
        assert len(result["outputs"]) == len(result["output_ids"]) == 2
        assert all(len(ids) <= 6 for ids in result["output_ids"])


def test_cli_chat_keeps_the_kv_cache(tiny_ckpt, sp_model_path, monkeypatch, capsys):
    """Turn 2 prefills only its own ids (the reply's closing, the user turn, the assistant
    header; plus the reply's last id when it was cut at --max-new-tokens), and prints what
    re-prefilling the whole token history prints."""
    path, params, cfg, tok = tiny_ckpt
    inputs = iter(["hello world", "please explain python", ""])
    monkeypatch.setattr("builtins.input", lambda _: next(inputs))
    chats, real = [], decode.Chat
    monkeypatch.setattr(decode, "Chat", lambda *a, **k: chats.append(real(*a, **k)) or chats[-1])
    sample.main(
        ["--ckpt", path, "--tokenizer", str(sp_model_path), "--chat", "--system", ""]
        + ["--temperature", "0", "--max-new-tokens", "6"]
    )
    printed = capsys.readouterr().out.splitlines()
    first = prompt_ids(tok, [{"role": "user", "content": "hello world"}])
    second = sample.next_turn_ids(tok, "please explain python")
    sp = decode.SamplingParams(6, 0.0, 0, 0.9, 1.0)  # the CLI's, so compiled code is reused
    ref = real(params, cfg, sp, sample.stop_ids(tok), keep_cache=False)
    replies = [list(ref.turn(first)), list(ref.turn(second))]
    assert printed == ["assistant> " + "".join(sample.incremental_text(tok, r)) for r in replies]
    (chat,) = chats
    assert chat.prefilled == [len(first), len(second) + (len(replies[0]) == 6)]
    history = [
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": tok.decode(replies[0])},
        {"role": "user", "content": "please explain python"},
    ]
    assert prompt_ids(tok, history)[-len(second) :] == second  # the same ids as a re-sent history


# ----------------------------------------------------------------------------- failures


def test_decode_names_the_prompt_that_fills_the_window():
    prompts = [[1] * 5, [2] * TINY.max_position_embeddings]
    with pytest.raises(ValueError, match=r"prompts\[1\] \(128 tokens\) fills the context window"):
        decode.generate(None, TINY, prompts, GREEDY, stop_ids=())  # before params are touched


def test_cli_prompt_longer_than_context_window_is_one_line(tiny_ckpt, sp_model_path):
    """Checked for every prompt before any decoding: exit 1, one line, no JSON printed."""
    path, *_ = tiny_ckpt
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "oasst_jax.sample", "--ckpt", path, "--tokenizer"]
    cmd += [str(sp_model_path), "--json", "--system", "", "--max-new-tokens", "2"]
    cmd += ["--prompt", "hello", "--prompt", "hello world " * 600]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("error: prompt 2 ('hello world hello world") and "Traceback" not in line
    assert "context window (max_position_embeddings) is 1024" in line


def _exit_line(argv) -> str:
    """The one line ``sample.main`` exits with (status 1)."""
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


def test_chat_past_the_context_window_is_one_line(tiny_ckpt, sp_model_path, monkeypatch, capsys):
    path, *_ = tiny_ckpt
    monkeypatch.setattr("builtins.input", lambda _: "hello world " * 600)
    line = _exit_line(["--ckpt", path, "--tokenizer", str(sp_model_path), "--chat"])
    assert line.startswith("error: the prompt is ") and "--system '' leaves it out" in line


@pytest.mark.parametrize(
    "lines, extra, message",
    [
        ('"ok"\n{"prompt": \n', [], r"prompts.jsonl:2: not JSON"),
        ('"ok"\n{"text": "x"}\n', [], r'prompts.jsonl:2: expected a JSON string or \{"prompt"'),
        ('"ok"\n', ["--out", "/nonexistent/dir/report.json"], r"/nonexistent/dir: no such dir"),
        ('"ok"\n', ["--json", "--chat"], r"--chat and --json are alternatives"),
        ('"ok"\n', ["--batch-size", "0"], r"--batch-size must be >= 1"),
        ('"ok"\n', ["--ckpt", "/nonexistent/ckpt"], r"/nonexistent/ckpt"),
    ],
)
def test_bad_input_is_one_line(tmp_path, sp_model_path, lines, extra, message):
    """Bad flags, prompt files and paths fail before (or instead of) loading the model."""
    (tmp_path / "prompts.jsonl").write_text(lines)
    argv = ["--ckpt", str(tmp_path / "no-ckpt"), "--prompts", str(tmp_path / "prompts.jsonl")]
    line = _exit_line(argv + extra)
    assert re.search(message, line), line
    assert line.startswith("error: ")


def test_failed_report_keeps_the_previous_report(tiny_ckpt, sp_model_path, tmp_path, monkeypatch):
    """The report is written to a temporary name and renamed: a run that dies while
    generating leaves the old report byte for byte, and no temporary behind."""
    path, *_ = tiny_ckpt
    out = tmp_path / "report.json"
    out.write_text('{"previous": "report"}\n')
    generate, calls = decode.generate, []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return generate(*args, **kwargs)

    monkeypatch.setattr(decode, "generate", dies_on_second_batch)
    argv = ["--ckpt", path, "--tokenizer", str(sp_model_path), "--out", str(out)]
    argv += ["--prompt", "hello", "--prompt", "world", "--batch-size", "1", "--system", ""]
    argv += ["--max-new-tokens", "2"]
    with pytest.raises(RuntimeError, match="device lost"):
        sample.main(argv)
    assert out.read_text() == '{"previous": "report"}\n'
    assert os.listdir(tmp_path) == ["report.json"]  # test_sampling_report: success replaces


def test_hf_dir_samples_with_its_own_tokenizer_and_refuses_another(
    tiny_ckpt, sp_model_path, tmp_path, capsys
):
    """An export's own tokenizer files serve by default; a ``--tokenizer`` that tokenizes
    differently (one piece rescored) is one line before anything is generated."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from oasst_jax.cli import convert

    path, _, _, tok = tiny_ckpt
    hf = tmp_path / "hf"
    convert.main(["orbax-to-hf", "--ckpt", path, "--out", str(hf), "--dtype", "float32",
                  "--tokenizer", str(sp_model_path)])  # fmt: skip
    capsys.readouterr()
    argv = ["--ckpt", str(hf), "--prompt", "hello world", "--json", "--system", ""]
    sample.main(argv + ["--temperature", "0", "--max-new-tokens", "1"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt_ids"] == prompt_ids(tok, [{"role": "user", "content": "hello world"}])
    proto = pb.ModelProto.FromString(open(sp_model_path, "rb").read())
    proto.pieces[-1].score = 10.0
    other = tmp_path / "other.model"
    other.write_bytes(proto.SerializeToString())
    assert _exit_line([*argv, "--tokenizer", str(other)]).startswith(
        f"error: --tokenizer {other} tokenizes differently from {hf}/tokenizer.model, the "
        f"tokenizer {hf} holds; leave out --tokenizer to use it"
    )


def test_report_is_named_after_its_run_and_adapter():
    """A report's default model_name: the run, not its ``checkpoints`` folder, with the
    adapter's run after a ``+``, so ``sample compare`` columns of a base with and without
    adapters differ."""
    assert sample.run_name("runs/pre10/checkpoints") == "pre10"
    assert sample.run_name("runs/pre10/checkpoints/40/") == "pre10"
    assert sample.run_name("exports/llama-hf") == "llama-hf"
    assert sample.report_name("runs/pre10/checkpoints", None) == "pre10"
    named = sample.report_name("runs/pre10/checkpoints", "runs/sft10_qlora/checkpoints")
    assert named == "pre10 + sft10_qlora"


def test_reply_cut_by_the_context_window_says_so(tiny_ckpt, sp_model_path, capsys):
    """A reply that stops because the prompt leaves too little of the window (not at a
    stop token, not at --max-new-tokens) is one note on stderr; one that does not, none."""
    path, _, cfg, tok = tiny_ckpt

    def length(words: int) -> int:
        return len(prompt_ids(tok, [{"role": "user", "content": "hello world " * words}]))

    words = 1
    while length(words + 1) <= cfg.max_position_embeddings - 2:  # leaves room for 2 to 8
        words += 1
    text = "hello world " * words
    room = cfg.max_position_embeddings - len(prompt_ids(tok, [{"role": "user", "content": text}]))
    argv = ["--ckpt", path, "--tokenizer", str(sp_model_path), "--json", "--system", ""]
    sample.main([*argv, "--temperature", "0", "--max-new-tokens", "40", "--prompt", text])
    captured = capsys.readouterr()
    (line,) = [json.loads(x) for x in captured.out.splitlines() if x.startswith("{")]
    if len(line["output_ids"]) < room:
        pytest.skip("the random model stopped on a stop token first")
    (note,) = captured.err.strip().splitlines()
    assert note.startswith("note: the reply to 'hello world") and note.endswith(
        f"stopped at the context window (max_position_embeddings 1024) after {room} new "
        "tokens; --max-new-tokens asked 40"
    )
    sample.main([*argv, "--temperature", "0", "--max-new-tokens", "2", "--prompt", text])
    assert capsys.readouterr().err == ""
