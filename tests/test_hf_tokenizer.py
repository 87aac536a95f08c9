"""``oasst_jax.hf.tokenizer``: exported tokenizer files + chat template reproduce
oasst_jax's chatml ids."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers
from conftest import tiny_llama
from flax import linen as nn

from oasst_jax import checkpoint, convert, decode, sample
from oasst_jax.chatml import prompt_ids
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
    hf_params, hf_cfg = sample.load_params(out, mesh, dtype="float32")
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
