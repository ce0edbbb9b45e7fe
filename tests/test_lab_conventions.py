"""Issue 17 points 4 and 5, as a lab would meet them through jaxind's public names: one calling convention for
the tests and the kernels, errors that name the fix (unknown options, a key that is not a key), meshes in one form,
the compilation cache for library users, ``__all__`` in every submodule (docs/DESIGN.md §5.3)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import numpy_params

import jaxind
from jaxind.parallel import sharding

CFG = jaxind.ModelConfig(
    family="llama", vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
)


@pytest.fixture(scope="module")
def pair():
    a = jaxind.from_params(CFG, numpy_params(CFG, 0), "a")
    b = jaxind.from_params(CFG, numpy_params(CFG, 1), "b")
    return a, b


# --- TESTS[name](a, b, *, key, ...) -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, option, listed",
    [("l2", "num_perm", "num_perms"), ("csu", "num_perms", "none"), ("generalized", "step", "steps")],
)
def test_an_unknown_option_is_an_error_naming_the_valid_ones(pair, name, option, listed):
    with pytest.raises(jaxind.JaxindError, match=rf"TESTS\['{name}'\] takes no option '{option}'.*{listed}"):
        jaxind.TESTS[name](*pair, key=jax.random.key(0), **{option: 99})


def test_options_are_read_off_the_signatures():
    assert jaxind.TESTS["l2"].options() == ("num_perms", "layer_shards")
    assert "steps" in jaxind.TESTS["generalized"].options() and "key" not in jaxind.TESTS["generalized"].options()
    assert jaxind.TESTS["csu"].options() == ()


@pytest.mark.parametrize(
    "key",
    [None, 1.5, np.zeros(2, np.float32), jax.random.split(jax.random.key(0), 2), np.zeros(3, np.uint32), "0"],
    ids=["none", "float", "float-array", "batch-of-keys", "wrong-shape", "str"],
)
def test_a_key_that_is_not_a_key_is_an_error_naming_the_fix(pair, key):
    with pytest.raises(jaxind.JaxindError, match=r"TESTS\['csu'\]: key must be one PRNG key, e.g. key=jax.random"):
        jaxind.TESTS["csu"](*pair, key=key)


def test_an_int_seed_is_the_key_run_pair_uses(pair):
    by_seed = jaxind.TESTS["csu"](*pair, key=3)
    by_key = jaxind.TESTS["csu"](*pair, key=jaxind.key_for(3, "csu"))
    raw = jaxind.TESTS["csu"](*pair, key=jax.random.key_data(jaxind.key_for(3, "csu")))  # a raw uint32[2] key
    assert by_seed.pvalue == by_key.pvalue == raw.pvalue
    assert [r.pvalue for r in by_seed.layers] == [r.pvalue for r in by_key.layers]


# --- meshes in one form ---------------------------------------------------------------------------------------------


def test_param_bytes_per_device_takes_every_mesh_form():
    full = sharding.param_bytes_per_device(CFG, "fsdp:1")
    by_str = sharding.param_bytes_per_device(CFG, "fsdp:4")  # was AttributeError: 'str' object has no attribute 'get'
    mesh = sharding.make_mesh("data:2,fsdp:4")  # the 8 fake CPU devices (conftest)
    assert by_str == sharding.param_bytes_per_device(CFG, {"fsdp": 4}) < full
    assert sharding.param_bytes_per_device(CFG, mesh) == sharding.param_bytes_per_device(CFG, "data:2,fsdp:4")
    assert sharding.make_mesh(mesh) is mesh and dict(sharding.make_mesh({"fsdp": -1}).shape)["fsdp"] == 8


@pytest.mark.parametrize(
    "mesh, message",
    [("fsdp:-1", "-1 needs a device count"), ("tensor:4", "tensor"), ({"fsdp": 0}, "sizes >= 1"), (4, "spec string")],
)
def test_a_bad_mesh_is_one_error(mesh, message):
    with pytest.raises(jaxind.JaxindError, match=message):
        sharding.param_bytes_per_device(CFG, mesh)
