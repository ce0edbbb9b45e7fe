"""The package's public face (docs/DESIGN.md §2): curated lazy names on ``jaxind``, old flat import
paths kept for one release with a DeprecationWarning, ``python -m jaxind.main``/``.sweep`` unchanged."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
from helpers import REPO, cli_env

import jaxind
from jaxind import _compat


def test_every_public_name_resolves_and_is_the_object_at_its_home():
    from converters.sources import load_model
    from jaxind.io.loaded_model import Model
    from jaxind.models.model import Decoder
    from jaxind.pair.runner import run_pair

    assert jaxind.load_model is load_model  # removed in an earlier release, back on the face
    assert jaxind.Model is Model and jaxind.Decoder is Decoder and jaxind.run_pair is run_pair
    for name in jaxind.__all__:
        assert getattr(jaxind, name) is not None, name
    assert set(jaxind.__all__) <= set(dir(jaxind))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jaxind.nope  # noqa: B018


def test_importing_the_face_loads_no_jax():
    code = "import sys, jaxind; print(sorted(m for m in ('jax', 'flax', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=cli_env())
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("old", sorted(_compat.MOVED))
def test_an_old_module_path_is_the_new_module_with_a_warning(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {_compat.MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(_compat.MOVED[old])


def test_old_from_imports_and_moved_names_still_work():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from jaxind import permtest  # type: ignore[attr-defined]
        from jaxind.config import from_hf_config  # type: ignore[attr-defined]
        from jaxind.main import run  # type: ignore[attr-defined]
        from jaxind.sweep import preflight, run_sweep  # type: ignore[attr-defined]
    from jaxind.cli import main, sweep
    from jaxind.io import hf_config
    from jaxind.many import sweep as sweep_work
    from jaxind.stats import permtest as new_permtest

    assert permtest is new_permtest and from_hf_config is hf_config.from_hf_config
    assert run is main.run and preflight is sweep.preflight and run_sweep is sweep_work.run_sweep
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    for moved in ("jaxind.main.run", "jaxind.sweep.preflight", "jaxind.sweep.run_sweep", "from_hf_config"):
        assert any(moved in m for m in messages), (moved, messages)
    with pytest.raises(ImportError, match="nope"):
        from jaxind.config import nope  # type: ignore[attr-defined]  # noqa: F401
