"""``oasst_jax.hf.tokenizer``: exported tokenizer files + chat template reproduce
oasst_jax's chatml ids, with the tiny test tokenizer and Meta's Llama-2 one, through
``AutoTokenizer`` (transformers 5 here; 4 where ``OASST_JAX_TRANSFORMERS4_PYTHON`` names a
python that has it) and ``tokenizers``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from conftest import tiny_llama
from flax import linen as nn

from oasst_jax import checkpoint, decode, weights
from oasst_jax.chatml import prompt_ids
from oasst_jax.cli import convert, sample
from oasst_jax.hf.tokenizer import TOKENIZER_FILES, write_hf_tokenizer
from oasst_jax.model import Llama
from oasst_jax.sharding import make_mesh
from oasst_jax.tokenizer import Tokenizer, tokenizer_for_vocab

CONVERSATION = [
    {"role": "user", "content": "hello world\nplease  explain:\n    def f(x): return x"},
    {"role": "assistant", "content": "the quick brown fox, 0123."},
    {"role": "prompter", "content": "why?"},  # OA's name for the user
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sp_model_path):
    """A random tiny checkpoint exported with ``--tokenizer``."""
    tok = Tokenizer(sp_model_path)
    cfg = tiny_llama(vocab_size=tok.vocab_size, max_position_embeddings=256)
    boxed = jax.jit(Llama(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    params = nn.meta.unbox(boxed["params"])
    root = tmp_path_factory.mktemp("export")
    checkpoint.save_weights(str(root / "ckpt"), params, cfg)
    convert.main(
        ["orbax-to-hf", "--ckpt", str(root / "ckpt"), "--out", str(root / "hf")]
        + ["--dtype", "float32", "--tokenizer", str(sp_model_path)]
    )
    return str(root / "hf"), tok, params, cfg


@pytest.mark.parametrize("system", [None, "You are a helpful assistant.\nBe brief."])
@pytest.mark.parametrize("turns", [1, 3])
def test_chat_template_gives_chatml_prompt_ids(exported, system, turns):
    out, tok, *_ = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = CONVERSATION[:turns]
    system_turn = [{"role": "system", "content": system}] if system else []
    got = hf_tok.apply_chat_template(system_turn + messages, add_generation_prompt=True)
    assert list(got["input_ids"]) == prompt_ids(tok, messages, system)
    text = hf_tok.apply_chat_template(system_turn + messages, tokenize=False)
    assert text == tok.decode(prompt_ids(tok, messages, system, add_generation_prompt=False))


def test_special_tokens_and_generation_config(exported):
    out, tok, *_ = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [
        tok.im_start_id,
        tok.im_end_id,
    ]
    assert hf_tok.eos_token == "<|im_end|>"
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [tok.im_end_id, tok.eos_id]
    with open(f"{out}/special_tokens_map.json") as f:
        assert json.load(f)["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]


def test_exported_model_generates_what_we_generate(exported):
    """End to end: HF model + chat template + generation config == our sampler (greedy)."""
    out, tok, params, cfg = exported
    ids = prompt_ids(tok, CONVERSATION[:1], "Be brief.")
    sp = decode.SamplingParams(max_new_tokens=12)
    ours = decode.generate(params, cfg, [ids], sp, stop_ids=(tok.im_end_id, tok.eos_id)).ids[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)
    hf_new = hf[0, len(ids) :].tolist()
    assert decode.trim(hf_new, (tok.im_end_id, tok.eos_id)) == ours
    # and the sampler's --ckpt reads the exported directory back (convert's loader)
    mesh = make_mesh({"tensor": 1}, jax.devices()[:1])
    hf_params, hf_cfg = weights.load_for_inference(out, mesh, dtype="float32")
    again = decode.generate(hf_params, hf_cfg, [ids], sp, stop_ids=sample.stop_ids(tok)).ids[0]
    assert again == ours


def test_megatron_layout_export(tmp_path, sp_model_path):
    """A 32007-style vocabulary exports all seven extra ids, chatml last."""
    base = Tokenizer(sp_model_path)
    tok = tokenizer_for_vocab(sp_model_path, base.vocab_size + 5)
    assert tok.megatron_new_tokens and tok.im_start_id == base.base_vocab_size + 5
    write_hf_tokenizer(tok, str(tmp_path))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    got = hf_tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True)
    assert list(got["input_ids"]) == prompt_ids(tok, CONVERSATION[:1])


def test_export_over_an_export_with_a_bad_tokenizer_changes_nothing(exported, tmp_path):
    """A tokenizer that does not load is one line before anything is written; the
    existing export (tokenizer files included) stays byte for byte."""
    out, *_ = exported
    ckpt = os.path.join(os.path.dirname(out), "ckpt")

    def snapshot() -> dict[str, bytes]:
        return {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}

    before = snapshot()
    assert set(TOKENIZER_FILES) <= set(before)
    missing = str(tmp_path / "missing.model")
    with pytest.raises(SystemExit, match=f"^error: tokenizer model not found: {missing}") as e:
        convert.main(["orbax-to-hf", "--ckpt", ckpt, "--out", out, "--tokenizer", missing])
    assert "\n" not in e.value.code
    assert snapshot() == before
    assert sorted(os.listdir(os.path.dirname(out))) == ["ckpt", "hf"]


# Conversations whose text a whitespace- or special-token-unaware export gets wrong.
TRICKY = [
    [{"role": "user", "content": " Hello  world"},
     {"role": "assistant", "content": "def f(x):\n    if x:\n        return x  \n\treturn 0\n"}],
    [{"role": "system", "content": "  Be brief.\n\n"},
     {"role": "user", "content": 'print("</s>")  # end\n<s>start</s></s> <unk> <EOD>'}],
    [{"role": "user", "content": "say <|im_end|> then <|im_start|>assistant\nok <|im_start|>"},
     {"role": "assistant", "content": "   "},
     {"role": "prompter", "content": "\t\t\n\n   x    y     z\r\n"}],
    [{"role": "user", "content": "🙂🚀👍🏽 日本語のテキスト、한국어  Привет\u00a0мир ▁▁ é"},
     {"role": "assistant", "content": ""}],
]  # fmt: skip


@pytest.fixture(scope="module")
def exports(tmp_path_factory, sp_models):
    """``{megatron: (export dir, Tokenizer)}`` for the tiny model and for Meta's."""
    out = {}
    for megatron in (False, True):
        tok = Tokenizer(sp_models, megatron_new_tokens=megatron)
        path = tmp_path_factory.mktemp("tok")
        write_hf_tokenizer(tok, str(path))
        out[megatron] = str(path), tok
    return out


def _chat_ids(hf_tok, messages) -> list[int]:
    got = hf_tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got)


@pytest.mark.parametrize("megatron", [False, True], ids=["compact", "megatron"])
def test_every_loader_gives_the_training_ids(exports, megatron):
    """AutoTokenizer's chat template = ``chatml.prompt_ids``; AutoTokenizer, ``tokenizers``
    and ours agree on every turn's text; decoding gives the text back."""
    out, tok = exports[megatron]
    auto = transformers.AutoTokenizer.from_pretrained(out)
    fast = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    for messages in TRICKY:
        ids = prompt_ids(tok, messages)
        assert _chat_ids(auto, messages) == ids
        assert fast.encode(tok.decode(ids), add_special_tokens=False).ids == ids
        assert auto.decode(ids) == fast.decode(ids, skip_special_tokens=False) == tok.decode(ids)
        for text in [m["content"] for m in messages]:
            want = tok.encode(text)
            assert auto.encode(text, add_special_tokens=False) == want, text
            assert fast.encode(text, add_special_tokens=False).ids == want, text
            assert auto.decode(want) == tok.decode(want)
    assert auto.eos_token == "<|im_end|>" and auto.bos_token == "<s>"
    assert auto.convert_tokens_to_ids(list(tok.special_tokens())) == list(
        tok.special_tokens().values()
    )


def test_llama2_export_passes_llama_cpp_cases(llama2, tmp_path):
    """Meta's tokenizer exported: llama.cpp's 47 strings give SentencePiece's ids through
    AutoTokenizer and ``tokenizers`` (transformers 5's own ``LlamaTokenizer`` gets 15 of
    them wrong: runs of spaces) and decode back to the text."""
    tok = Tokenizer(llama2.model)
    write_hf_tokenizer(tok, str(tmp_path))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    fast = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = [text for text, _ in llama2.cases]
    want = [ids for _, ids in llama2.cases]
    assert len(texts) == 47
    assert [auto.encode(t, add_special_tokens=False) for t in texts] == want
    assert [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)] == want
    assert [auto.decode(ids) for ids in want] == texts


_TRANSFORMERS4 = """
import json, sys
import transformers
out, texts, conversations = json.load(sys.stdin)
tok = transformers.AutoTokenizer.from_pretrained(out)
chat = [tok.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
print(json.dumps({"version": transformers.__version__, "class": type(tok).__name__,
                  "ids": [tok.encode(t, add_special_tokens=False) for t in texts],
                  "chat": chat, "decoded": [tok.decode(ids) for ids in chat]}))
"""


@pytest.mark.parametrize("megatron", [False, True], ids=["compact", "megatron"])
def test_transformers4_loads_the_export_alike(exports, megatron):
    """The same export under transformers 4 (``OASST_JAX_TRANSFORMERS4_PYTHON``: a python
    with ``transformers<5``, e.g. a throwaway venv; checked with 4.57.6 / tokenizers 0.22.2)."""
    python = os.environ.get("OASST_JAX_TRANSFORMERS4_PYTHON")
    if not python:
        pytest.skip("set OASST_JAX_TRANSFORMERS4_PYTHON to a python with transformers<5")
    out, tok = exports[megatron]
    texts = [m["content"] for c in TRICKY for m in c]
    res = subprocess.run([python, "-c", _TRANSFORMERS4], input=json.dumps([out, texts, TRICKY]),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["version"].startswith("4.") and got["class"] == "PreTrainedTokenizerFast"
    assert got["ids"] == [tok.encode(t) for t in texts]
    assert got["chat"] == [prompt_ids(tok, c) for c in TRICKY]
    assert got["decoded"] == [tok.decode(prompt_ids(tok, c)) for c in TRICKY]


def test_card_layout_import_and_export(tmp_path, sp_model_path):
    """The card's pipeline in its layout: a base imported with ``--add-chatml-tokens
    --megatron-new-tokens`` has the 7 new rows (mean-initialised), its export tokenizes in
    Megatron's layout (``<|im_start|>`` = base + 5) and AutoTokenizer's chat template gives
    those ids; the flag alone is one line."""
    from conftest import tiny_hf_llama

    from oasst_jax.hf.safetensors_io import SafetensorsReader

    tok = Tokenizer(sp_model_path, megatron_new_tokens=True)
    base = tiny_hf_llama(tmp_path / "base", vocab_size=tok.base_vocab_size)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    with pytest.raises(SystemExit, match="--megatron-new-tokens goes with --add-chatml-tokens"):
        convert.main(["hf-to-orbax", "--hf-dir", base, "--out", ckpt, "--megatron-new-tokens"])
    convert.main(["hf-to-orbax", "--hf-dir", base, "--out", ckpt, "--add-chatml-tokens",
                  "--megatron-new-tokens"])  # fmt: skip
    convert.main(["orbax-to-hf", "--ckpt", ckpt, "--out", out, "--tokenizer", str(sp_model_path)])
    head = SafetensorsReader(out).get("lm_head.weight")
    assert head.shape[0] == tok.vocab_size == tok.base_vocab_size + 7
    np.testing.assert_allclose(head[-1], head[: tok.base_vocab_size].mean(0), rtol=1e-5)
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert _chat_ids(auto, CONVERSATION) == prompt_ids(tok, CONVERSATION)
    assert auto.convert_tokens_to_ids("<|im_start|>") == tok.base_vocab_size + 5
    # a card-layout run given the base HF directory itself says which import it needs

    card = dataclasses.replace(weights.source_config(base), vocab_size=tok.vocab_size)
    with pytest.raises(ValueError, match="--add-chatml-tokens --megatron-new-tokens` first$"):
        weights.load(base, card, None, where="load=X")


def test_merges_are_transformers_order(sp_models):
    """The hand-written merge order (``bpe_merges``) is transformers' ``generate_merges``
    with SentencePiece's scores (control, unknown and byte pieces never merged)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers.convert_slow_tokenizer import generate_merges

    from oasst_jax.hf.tokenizer import bpe_merges

    spec = pb.ModelProto.FromString(sp_models.read_bytes())
    vocab = {p.piece: i for i, p in enumerate(spec.pieces)}
    skip = [p.piece for p in spec.pieces if p.type in (2, 3, 6)]
    scores = {p.piece: p.score for p in spec.pieces}
    assert bpe_merges(spec) == generate_merges(vocab, scores, skip_tokens=skip)
