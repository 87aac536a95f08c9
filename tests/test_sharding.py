"""Mesh shapes: resolving the ``-1`` axis, axis names, device counts, layers per stage.

Every caller (the trainer's config validation, ``make_mesh``, the planner) goes
through :func:`sharding.resolve_mesh`, so its errors are the ones users see.
"""

from __future__ import annotations

import os

import pytest

from oasst_jax import sharding
from oasst_jax.config import load_config, validate
from oasst_jax.sharding import layers_per_stage, make_mesh, mesh_shape, resolve_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_fills_the_free_axis_and_orders_all_axes():
    sizes = resolve_mesh({"tensor": 8, "data": -1, "pipeline": 4}, 64)
    assert sizes == {"data": 2, "fsdp": 1, "pipeline": 4, "sequence": 1, "tensor": 8}
    assert list(sizes) == list(sharding.MESH_AXES)
    assert resolve_mesh({}, 1) == dict.fromkeys(sharding.MESH_AXES, 1)
    assert resolve_mesh(sharding.DEFAULT_MESH, 32)[sharding.DATA] == 32


def test_mesh_shape_keeps_the_free_axis():
    assert mesh_shape({"fsdp": -1}) == {**dict.fromkeys(sharding.MESH_AXES, 1), "fsdp": -1}


@pytest.mark.parametrize(
    "shape, devices, message",
    [
        ({"expert": 8}, 8, "unknown axis 'expert'"),
        ({"data": -1, "fsdp": -1}, 8, "at most one axis may be -1"),
        ({"tensor": 0}, 8, "axis sizes must be >= 1"),
        ({"data": -1, "tensor": 3}, 8, "8 devices are not divisible by the fixed axes' product 3"),
        ({"tensor": 2}, 8, "multiply to 2, but there are 8 devices"),
    ],
)
def test_resolve_errors(shape, devices, message):
    with pytest.raises(ValueError, match=message):
        resolve_mesh(shape, devices)


def test_stages_must_divide_layers():
    assert layers_per_stage(80, 4) == 20
    with pytest.raises(ValueError, match="num_hidden_layers=6 is not divisible by mesh.pipeline=4"):
        layers_per_stage(6, 4)
    assert resolve_mesh({"pipeline": 4, "data": -1}, 8, num_layers=80)["pipeline"] == 4
    with pytest.raises(ValueError, match="num_hidden_layers=6 is not divisible by mesh.pipeline=4"):
        resolve_mesh({"pipeline": 4, "data": -1}, 8, num_layers=6)
    cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))  # 4 layers
    cfg.mesh.update(data=1, fsdp=1, sequence=1, tensor=1, pipeline=8)
    with pytest.raises(ValueError, match="num_hidden_layers=4 is not divisible by mesh.pipeline=8"):
        validate(cfg, 8)


def test_axis_size_of_logical_names():
    sizes = resolve_mesh({"data": 2, "fsdp": 2, "pipeline": 2}, 8)
    assert sharding.axis_size(sizes, "batch") == 4  # data x fsdp
    assert sharding.axis_size(sizes, "stage") == 2
    assert sharding.axis_size(make_mesh(sizes), "batch") == 4


def test_make_mesh_fills_free_axis():
    mesh = make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "pipeline": 1, "sequence": 1, "tensor": 2}


@pytest.mark.parametrize(
    "shape, message",
    [
        ({"fsdp": 3}, "multiply to 3, but there are 8 devices"),
        ({"fsdp": 2, "tensor": 2}, "multiply to 4, but there are 8 devices"),
        ({"expert": 8}, "unknown axis 'expert'"),
    ],
)
def test_make_mesh_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(shape)
