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


# --- the array-level kernels: (params_a, cfg_a, params_b, cfg_b, [data,] *, key, layers=None, **options) ----------

TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 8)).astype(np.int32)


def _same(x, y):
    assert x.pvalue == y.pvalue and x.statistic == y.statistic
    assert [(r.layer_a, r.layer_b, r.pvalue) for r in x.layers] == [(r.layer_a, r.layer_b, r.pvalue) for r in y.layers]


def _forms(kernel: str, pa, pb, key):
    """(old call form, new call form) of one kernel, on the same models and key."""
    from jaxind.stats import constrained, localized, match, permtest

    return {
        "csu": (
            lambda: constrained.csu(pa, CFG, pb, CFG, key, [1]),
            lambda: constrained.csu(pa, CFG, pb, CFG, key=key, layers=[1]),
        ),
        "csu_all": (
            lambda: constrained.csu_all(pa, CFG, pb, CFG, key),
            lambda: constrained.csu_all(pa, CFG, pb, CFG, key=key),
        ),
        "permtest": (
            lambda: permtest.permtest(pa, pb, CFG, key, num_perms=7, layers=[0]),
            lambda: permtest.permtest(pa, CFG, pb, CFG, key=key, num_perms=7, layers=[0]),
        ),
        "match": (
            lambda: match.match_test(pa, CFG, pb, CFG, [TOKENS], key=key, layer_pairs=[(0, 1)]),
            lambda: match.match_test(pa, CFG, pb, CFG, [TOKENS], key=key, layers=[(0, 1)]),
        ),
        "localized": (
            lambda: localized.localized_test(pa, CFG, pb, CFG, [TOKENS], key=key, layers_a=[0, 1], layers_b=[1]),
            lambda: localized.localized_test(pa, CFG, pb, CFG, [TOKENS], key=key, layers=[(0, 1), (1, 1)]),
        ),
    }[kernel]


@pytest.mark.parametrize("kernel", ["csu", "csu_all", "permtest", "match", "localized"])
def test_every_kernel_takes_the_one_form_and_the_old_forms_warn_naming_it(pair, kernel):
    old, new = _forms(kernel, pair[0].params, pair[1].params, jax.random.key(5))
    with pytest.warns(DeprecationWarning, match=r"deprecated .*(call|pass) .*(key|layers)"):
        before = old()
    _same(before, new())


def test_kernels_refuse_a_key_that_is_not_a_key_and_mixed_forms(pair):
    from jaxind.stats import constrained, match, permtest

    pa, pb = pair[0].params, pair[1].params
    with pytest.raises(jaxind.JaxindError, match=r"constrained.csu: key must be one PRNG key"):
        constrained.csu(pa, CFG, pb, CFG, key=0)
    with pytest.raises(jaxind.JaxindError, match=r"permtest.permtest: key must be one PRNG key"):
        permtest.permtest(pa, CFG, pb, CFG, key=np.zeros(2, np.float32))
    with pytest.raises(jaxind.JaxindError, match=r"match.match_test: give layers= only"):
        match.match_test(pa, CFG, pb, CFG, [TOKENS], key=jax.random.key(0), layers=[0], layer_pairs=[0])
    with pytest.raises(jaxind.JaxindError, match="same architecture and config"):
        permtest.permtest(pa, CFG, pb, CFG.replace(d_ff=48), key=jax.random.key(0))


# --- the compilation cache for library users ----------------------------------------------------------------------


@pytest.fixture
def fresh_cache_choice(monkeypatch):
    """This process as if jaxind had not been used yet (no cache chosen); JAX's cache setting restored after."""
    from jax.experimental.compilation_cache import compilation_cache

    from jaxind.io import caching

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setattr(caching, "_library", [])
    jax.config.update("jax_compilation_cache_dir", None)
    yield caching
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


def test_first_use_turns_the_compilation_cache_on(fresh_cache_choice, monkeypatch, tmp_path):
    monkeypatch.setenv("JAXIND_COMPILATION_CACHE", str(tmp_path / "jax"))
    jaxind.from_params(CFG, numpy_params(CFG, 2))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
    jax.jit(lambda x: x * 3 + 1)(np.arange(7, dtype=np.float32)).block_until_ready()  # a kernel new to the process
    assert list((tmp_path / "jax").iterdir()), "the compilation was not cached"


def test_the_compilation_cache_opt_out_and_a_programs_own_choice(fresh_cache_choice, monkeypatch, tmp_path):
    monkeypatch.setenv("JAXIND_COMPILATION_CACHE", "off")
    jaxind.from_params(CFG, numpy_params(CFG, 2))
    assert jax.config.jax_compilation_cache_dir is None
    fresh_cache_choice._library.clear()
    monkeypatch.delenv("JAXIND_COMPILATION_CACHE")
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert fresh_cache_choice.enable_for_library() == str(tmp_path / "mine")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")


# --- __all__ in every submodule ----------------------------------------------------------------------------------

FLOORS = ("models", "parallel", "io", "stats", "pair", "many")


def _submodules() -> list[str]:
    import importlib
    import pkgutil

    names = []
    for floor in FLOORS:
        package = importlib.import_module(f"jaxind.{floor}")
        names += [f"jaxind.{floor}.{m.name}" for m in pkgutil.iter_modules(package.__path__) if not m.ispkg]
    return sorted(names)


def test_every_submodule_lists_its_public_names():
    import importlib
    import inspect

    modules = _submodules()
    assert "jaxind.stats.constrained" in modules and "jaxind.many.scan" in modules
    for name in modules:
        module = importlib.import_module(name)
        listed = getattr(module, "__all__", None)
        assert listed is not None, f"{name} has no __all__"
        assert len(listed) == len(set(listed)) and all(not n.startswith("_") for n in listed), name
        missing = [n for n in listed if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names what it lacks: {missing}"
        defined = [  # the module's own public functions and classes
            n
            for n, v in vars(module).items()
            if not n.startswith("_")
            and (inspect.isfunction(v) or inspect.isclass(v))
            and getattr(v, "__module__", None) == name
        ]
        unlisted = [n for n in defined if n not in listed]
        assert not unlisted, f"{name}.__all__ leaves out its public {unlisted}"
    from jaxind.stats import constrained, match, permtest

    assert {"csu", "csu_all"} <= set(constrained.__all__) and "permtest" in permtest.__all__
    assert "match_test" in match.__all__ and "mesh_sizes" in sharding.__all__
