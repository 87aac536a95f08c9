"""Train config validation: unknown fields anywhere are one-line errors."""

import ast
import os

import pytest
from conftest import REPO

from oasst_jax.config import base_config, load_config, unknown_fields, validate


def _tiny():
    return load_config(os.path.join(REPO, "configs", "tiny.py"))


@pytest.mark.parametrize(
    "set_field, name",
    [
        (lambda c: setattr(c, "lr", 1e-4), "lr"),  # belongs in optim
        (lambda c: setattr(c.optim, "lr_warmup", 10), "optim.lr_warmup"),
        (lambda c: setattr(c.mesh, "expert", 2), "mesh.expert"),
        (lambda c: setattr(c.distributed, "port", 1234), "distributed.port"),
    ],
)
def test_unknown_field_anywhere_is_refused(set_field, name):
    cfg = _tiny()
    set_field(cfg)
    assert unknown_fields(cfg, base_config()) == [name]
    with pytest.raises(ValueError, match=f"config: unknown field '{name}'") as err:
        validate(cfg, 8)
    assert "\n" not in str(err.value)


def test_model_section_is_checked_by_the_model_config():
    cfg = _tiny()
    cfg.model.hiden_size = 8
    with pytest.raises(ValueError, match="model: unknown config field 'hiden_size'"):
        validate(cfg, 8)


def test_shipped_configs_have_only_known_fields():
    names = sorted(n for n in os.listdir(os.path.join(REPO, "configs")) if n.endswith(".py"))
    assert {"tiny.py", "pre10.py", "sft10.py", "sft10_qlora_70b.py", "dpo_oasst.py"} <= set(names)
    for name in names:
        cfg = load_config(os.path.join(REPO, "configs", name))
        assert unknown_fields(cfg, base_config()) == [], name


def _differences(cfg, ref, prefix: str = "") -> list[str]:
    """Dotted names whose value in ``cfg`` differs from ``ref`` (a section that ``ref``
    leaves empty, like ``model``, counts as one name)."""
    out = []
    for key in cfg.keys():
        value, default = cfg[key], ref.get(key)
        if hasattr(value, "keys") and hasattr(default, "keys") and len(default):
            out += _differences(value, default, f"{prefix}{key}.")
        elif key not in ref or value != default:
            out.append(f"{prefix}{key}")
    return out


@pytest.mark.parametrize("name", ["pre10.py", "sft10.py"])
def test_card_configs_are_megatron_and_list_every_difference(name):
    """The card's configs use Megatron's loss normalisation (the library keeps the
    token mean) and their docstrings name every field they change, as `field=`."""
    path = os.path.join(REPO, "configs", name)
    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    cfg = load_config(path)
    assert cfg.loss_normalization == "microbatch_mean"
    assert base_config().loss_normalization == "global_token_mean"
    assert not cfg.eval_full and "eval_full" in doc  # Megatron's eval; the option named
    model = load_config(os.path.join(REPO, "configs", "model", "llama2_70b.py"))
    changed = _differences(cfg, base_config()) + _differences(cfg.model, model, "model.")
    assert "model.attention_impl" in changed and "loss_normalization" in changed
    assert [n for n in changed if f"`{n}=" not in doc] == []


def test_loss_choices_are_the_ones_the_library_implements():
    """``config`` validates ``loss_on``/``loss_normalization`` without importing chatml or
    loss (no SentencePiece at config load); the names it accepts are the implemented ones."""
    import jax.numpy as jnp
    import numpy as np

    from oasst_jax.chatml import loss_mask
    from oasst_jax.config import LOSS_MODES, LOSS_NORMALIZATIONS
    from oasst_jax.loss import loss_sum_and_count

    nll, weights = jnp.ones((2, 3)), jnp.ones((2, 3))
    for name in LOSS_NORMALIZATIONS:
        num, den = loss_sum_and_count(nll, weights, normalization=name, micro_batch_size=1)
        assert float(num / den) == 1.0
    with pytest.raises(ValueError, match="global_token_mean or microbatch_mean"):
        loss_sum_and_count(nll, weights, normalization="mean", micro_batch_size=1)
    roles, tokens = np.array([1, 2, 2]), np.array([5, 6, 7])
    assert loss_mask(roles, tokens, None, LOSS_MODES[0]).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="needs the tokenizer"):
        loss_mask(roles, tokens, None, LOSS_MODES[1])


def test_config_errors_are_one_line():
    cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))
    cfg.micro_batch_size = 3
    with pytest.raises(
        ValueError, match="global_batch_size=8 is not divisible by micro_batch_size=3"
    ):
        validate(cfg, 8)
    cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))
    cfg.model.remat_policy = "sometimes"
    with pytest.raises(ValueError, match="remat_policy='sometimes'"):
        validate(cfg, 8)
    for name in ("pre10.py", "sft10.py"):
        c = load_config(os.path.join(REPO, "configs", name))
        validate(c, 32)  # the card's layouts validate for 32 devices
        assert (c.mesh.tensor, c.mesh.pipeline, c.seq_length, c.global_batch_size) == (
            8,
            4,
            4096,
            64,
        )
    sft = load_config(os.path.join(REPO, "configs", "sft10.py"))
    assert (sft.hidden_dropout, sft.lima_dropout, sft.train_iters, sft.save_interval) == (
        0.25,
        True,
        519,
        346,
    )


@pytest.mark.parametrize("name", ["tiny_rm.py", "tiny_dpo.py"])
def test_preference_objectives_take_pipeline_stages(name):
    """rm and dpo run through the pipeline schedule too: a pipelined mesh validates."""
    cfg = load_config(os.path.join(REPO, "configs", name))
    cfg.mesh.pipeline, cfg.mesh.data, cfg.mesh.fsdp = 2, 1, -1
    validate(cfg, 8)


def test_missing_eval_prompts_file_is_one_line(tmp_path):
    cfg = _tiny()
    cfg.eval_prompts = str(tmp_path / "prompts.jsonl")
    with pytest.raises(ValueError) as err:
        validate(cfg, 8)
    assert str(err.value) == (
        f"config: eval_prompts='{tmp_path / 'prompts.jsonl'}': no such file (a JSONL of "
        "prompts; 'default' for the shipped ones, '' for none)"
    )
    for off in ("", None, "default"):
        cfg.eval_prompts = off
        validate(cfg, 8)


def test_too_few_devices_says_how_to_emulate_them_on_a_cpu():
    """A new user's first run on a laptop (1 CPU device, a config for 8): the line says
    the XLA flag ``demo.sh`` sets; a mesh that fits no device count gets no such hint."""
    with pytest.raises(ValueError) as err:
        validate(_tiny(), 1)
    line = str(err.value)
    assert "multiply to 8, but there are 1 devices" in line and "\\n" not in line
    assert line.endswith(
        "; on a CPU, emulate 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 "
        "python -m oasst_jax.train ..."
    )
    with pytest.raises(ValueError) as err:
        validate(_tiny(), 12)
    assert "emulate" not in str(err.value)
