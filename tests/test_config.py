"""Train config validation: unknown fields anywhere are one-line errors."""

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
    for name in ("tiny.py", "pre10.py", "sft10.py", "bench_tinyllama.py"):
        cfg = load_config(os.path.join(REPO, "configs", name))
        assert unknown_fields(cfg, base_config()) == []
