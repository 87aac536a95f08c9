"""LoRA export (oasst_jax/hf/peft.py, ``convert lora-to-peft``): peft's PeftModel on the
exported base gives our logits; the merged export is base + (alpha / r) B A per target.

Tolerance: fp32 on both sides; logits agree within 1e-4 (torch's and XLA's matmul and
softmax orders differ; the logits are O(1)); merged tensors within 1e-6.
"""

import os
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_llama
from flax import linen as nn
from safetensors.numpy import load_file
from test_train_step import _batch, _optim_cfg

from oasst_jax import checkpoint, lora, optim, sharding, weights
from oasst_jax.cli.convert import main as convert_main
from oasst_jax.hf.convert import orbax_to_hf
from oasst_jax.model import Llama
from oasst_jax.train_step import StepConfig, build_trainer

CFG = tiny_llama(
    lora_rank=4,
    lora_alpha=8.0,
    lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    lora_base_dtype="float32",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A random base saved as orbax, an adapter trained 4 steps on it (lr 1e-2, so B is
    far from 0), its checkpoint, and the base exported to HF in fp32."""
    root = tmp_path_factory.mktemp("peft")
    base_cfg = lora.base_model_config(CFG)
    base_params = nn.meta.unbox(
        Llama(base_cfg).init(jax.random.key(3), np.zeros((1, 8), np.int32))["params"]
    )
    base_dir = str(root / "base")
    checkpoint.save_weights(base_dir, jax.device_get(base_params), base_cfg)
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    tx = optim.make_optimizer(_optim_cfg(), 10)
    zero = np.zeros((CFG.num_hidden_layers,), np.float32)
    with jax.set_mesh(mesh):
        t = build_trainer(
            Llama(CFG), tx, optim.schedule(_optim_cfg(), 10), StepConfig(1, 4), zero, mesh
        )
        base = weights.load(base_dir, base_cfg, t.abstract_base)
        record = lora.base_record(base_dir, base, CFG.vocab_size)
        state = t.init_from_params(base)
        batch = {k: jax.device_put(v, t.batch_sharding) for k, v in _batch(1, 4).items()}
        for _ in range(4):
            state, _ = t.step(state, batch)
        state = jax.device_get(state)
    ckpt = checkpoint.TrainCheckpointer(str(root / "run"), async_save=False)
    ckpt.save(4, state, {lora.BASE_META: record}, CFG)
    ckpt.close()
    hf_base = str(root / "hf_base")
    orbax_to_hf(base_dir, hf_base, dtype="float32")
    return {
        "root": root,
        "base": base_dir,
        "hf_base": hf_base,
        "ckpt": str(root / "run"),
        "state": state,
    }


def _ours(state, tokens):
    params = lora.merge(state["params"], state["frozen"])
    return np.asarray(jax.jit(Llama(CFG).apply)({"params": params}, tokens))[..., : CFG.vocab_size]


def _torch_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def test_peft_loads_the_adapter_with_our_logits(trained, capsys):
    """``convert lora-to-peft`` writes an adapter that peft's PeftModel, on the exported
    base, runs to our logits (1e-4); without the adapter they are far off."""
    import peft
    import torch
    import transformers

    out = str(trained["root"] / "peft")
    convert_main(["lora-to-peft", "--ckpt", trained["ckpt"], "--out", out])
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "PEFT adapter" in capsys.readouterr().out
    base = transformers.LlamaForCausalLM.from_pretrained(trained["hf_base"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    tokens = _batch(1, 2, seed=9)["inputs"][0]
    theirs = _torch_logits(model, tokens)
    ours = _ours(trained["state"], tokens)
    assert np.max(np.abs(theirs - ours)) < 1e-4
    # the adapter matters: without it the logits are far from ours
    with model.disable_adapter():
        assert np.max(np.abs(_torch_logits(model, tokens) - ours)) > 1e-2


def test_merged_export_is_base_plus_scaled_ba(trained):
    """``lora-to-peft --merge``: every tensor is the base's plus (alpha / r) B A of the
    PEFT export (1e-6), and transformers runs it to our logits (1e-4)."""
    import torch
    import transformers

    out, peft_dir = str(trained["root"] / "merged"), str(trained["root"] / "peft2")
    convert_main(["lora-to-peft", "--ckpt", trained["ckpt"], "--out", peft_dir])
    convert_main(
        [
            "lora-to-peft",
            "--ckpt",
            trained["ckpt"],
            "--merge",
            "--base",
            trained["base"],
            "--out",
            out,
            "--dtype",
            "float32",
        ]
    )
    merged = load_file(os.path.join(out, "model.safetensors"))
    base = load_file(os.path.join(trained["hf_base"], "model.safetensors"))
    ad = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    scale = CFG.lora_alpha / CFG.lora_rank
    for name in base:
        key = f"base_model.model.{name[: -len('.weight')]}"
        if f"{key}.lora_A.weight" in ad:
            want = base[name] + scale * ad[f"{key}.lora_B.weight"] @ ad[f"{key}.lora_A.weight"]
        else:
            want = base[name]
        np.testing.assert_allclose(merged[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = _batch(1, 2, seed=9)["inputs"][0]
    assert np.max(np.abs(_torch_logits(model, tokens) - _ours(trained["state"], tokens))) < 1e-4


def test_merged_params_for_sampling(trained):
    """What the sampler calls: base weights + an adapter checkpoint -> a plain model's
    params whose logits are the adapted model's."""
    base_cfg = lora.base_model_config(CFG)
    base = trained["state"]["frozen"]  # the float32 base as loaded, on the host
    params = lora.merged_params(base, trained["ckpt"])
    tokens = _batch(1, 2, seed=9)["inputs"][0]
    plain = np.asarray(jax.jit(Llama(base_cfg).apply)({"params": params}, tokens))
    assert np.max(np.abs(plain[..., : CFG.vocab_size] - _ours(trained["state"], tokens))) < 1e-4


def test_export_refusals_are_one_line(trained, tmp_path):
    """A non-LoRA checkpoint, ``--merge`` without ``--base`` and a non-empty ``--out`` are
    refused in one line; the existing file is left alone."""
    with pytest.raises(SystemExit, match="not a LoRA checkpoint"):
        convert_main(["lora-to-peft", "--ckpt", trained["base"], "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--merge needs --base"):
        convert_main(["lora-to-peft", "--ckpt", trained["ckpt"], "--merge", "--out", str(tmp_path)])
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds 'keep.txt'"):
        convert_main(["lora-to-peft", "--ckpt", trained["ckpt"], "--out", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_sample_adapter_generates_what_peft_generates(trained, tmp_path):
    """``sample --adapter``'s loading path (orbax base or its HF export, adapters merged)
    decodes greedily the ids peft's ``generate`` gives; another base is refused."""
    import peft
    import torch
    import transformers

    from oasst_jax import decode, weights

    peft_dir = str(trained["root"] / "peft3")
    convert_main(["lora-to-peft", "--ckpt", trained["ckpt"], "--out", peft_dir])
    base = transformers.LlamaForCausalLM.from_pretrained(trained["hf_base"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    prompt = [int(t) for t in _batch(1, 2, seed=9)["inputs"][0, 0, :12]]
    new = 10
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    theirs = out[0, len(prompt) :].tolist()
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    sp = decode.SamplingParams(new, 0.0, 0, 1.0, 1.0)
    for source in (trained["base"], trained["hf_base"]):
        params, cfg = weights.load_for_inference(
            source, mesh, dtype="float32", adapter=trained["ckpt"]
        )
        ours = decode.generate(params, cfg, [prompt], sp, stop_ids=(), mesh=mesh)
        assert ours.ids[0] == theirs, source
    other = str(tmp_path / "other")
    base_cfg = lora.base_model_config(CFG)
    params = Llama(base_cfg).init(jax.random.key(4), np.zeros((1, 8), np.int32))["params"]
    checkpoint.save_weights(other, jax.device_get(nn.meta.unbox(params)), base_cfg)
    with pytest.raises(checkpoint.CheckpointError, match="trained on another base"):
        weights.load_for_inference(other, mesh, dtype="float32", adapter=trained["ckpt"])


def _random_base(path, seed: int):
    base_cfg = lora.base_model_config(CFG)
    params = Llama(base_cfg).init(jax.random.key(seed), np.zeros((1, 8), np.int32))["params"]
    checkpoint.save_weights(str(path), jax.device_get(nn.meta.unbox(params)), base_cfg)


def test_merge_refuses_a_base_the_adapters_were_not_trained_on(trained, tmp_path):
    """``--merge --base`` checks the base as a resume and ``sample --adapter`` do (the
    fingerprint the run recorded, here computed one layer at a time from the checkpoint):
    another base of the same shape is one line, nothing written."""
    reader = checkpoint.ParamReader(trained["base"])
    record = checkpoint.load_json_item(trained["ckpt"], "meta")[lora.BASE_META]
    assert lora.reader_fingerprint(reader, CFG, CFG.vocab_size) == record["fingerprint"]
    other, out = tmp_path / "other", tmp_path / "merged"
    _random_base(other, seed=4)
    argv = ["lora-to-peft", "--ckpt", trained["ckpt"], "--merge", "--base", str(other)]
    with pytest.raises(SystemExit) as err:
        convert_main([*argv, "--out", str(out)])
    line = err.value.code
    assert line.startswith(f"error: adapter {trained['ckpt']} was trained on another base: ")
    assert f"this run loads {other} (fingerprint " in line and "merge into that base" in line
    assert "\n" not in line and not out.exists()


@pytest.mark.slow  # a reward model exported twice (~10 s on 2 loaded cores)
def test_rm_to_hf_refuses_a_lora_reward_models_rewritten_base(tmp_path):
    """``rm-to-hf`` merges a LoRA reward model into the base its run recorded: exported
    while that base is the one trained on, refused in one line once it was rewritten."""
    import dataclasses

    from oasst_jax.hf.reward import reward_to_hf

    cfg = dataclasses.replace(CFG, score_head=True)
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(5), np.zeros((1, 8), np.int32)))
    trained_leaves, base = lora.split(jax.device_get(params["params"]))
    base_dir = tmp_path / "base"
    plain = dataclasses.replace(lora.base_model_config(cfg), score_head=False)
    checkpoint.save_weights(str(base_dir), base, plain)
    record = lora.base_record(str(base_dir), base, cfg.vocab_size)
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "run"), async_save=False)
    state = {"params": trained_leaves, "opt_state": {"count": np.zeros((), np.int32)}}
    ckpt.save(1, state, {lora.BASE_META: record}, cfg)
    ckpt.close()
    reward_to_hf(str(tmp_path / "run"), str(tmp_path / "rm"), dtype="float32")
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    _random_base(tmp_path / "other", seed=6)  # the recorded path now holds other weights
    shutil.rmtree(base_dir)
    shutil.copytree(tmp_path / "other", base_dir)
    with pytest.raises(checkpoint.CheckpointError, match="trained on another base") as err:
        reward_to_hf(str(tmp_path / "run"), str(tmp_path / "rm2"), dtype="float32")
    assert "restore that base at its path" in str(err.value)
    assert not (tmp_path / "rm2").exists()
