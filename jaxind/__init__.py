"""jaxind: independence tests for language models (Zhu et al., ICML 2025) in JAX/Flax.

The public face. Everything a user needs is a name here, imported on first use (the names that
load JAX are lazy, so the command lines reject bad flags before JAX starts)::

    import jaxind
    a = jaxind.load_model("path/or/hub-style/source")       # any model source (docs/DESIGN.md §4)
    b = jaxind.from_params(cfg, params)                     # a param tree in memory
    result = jaxind.TESTS["match"](a, b, key=0)             # -> TestResult
    doc = jaxind.run_pair(a, b, jaxind.Settings(tests=("csu", "match")))

Every test has one calling convention, ``TESTS[name](a, b, *, key, data=None, layers=None,
**options) -> TestResult``. The Flax module is :class:`Decoder`. The folders under ``jaxind/``
(``models``, ``parallel``, ``io``, ``stats``, ``pair``, ``many``, ``cli``) are described with a
picture in docs/DESIGN.md §2; old flat import paths (``jaxind.permtest``) still work for one release
with a ``DeprecationWarning`` (:mod:`jaxind._compat`).
"""

__version__ = "0.1.0"

import importlib  # noqa: E402
from typing import Any  # noqa: E402

from jaxind import _compat  # noqa: E402
from jaxind.errors import JaxindError  # noqa: E402
from jaxind.models.config import ModelConfig  # noqa: E402

_compat.install()

__all__ = [
    "TESTS",
    "Decoder",
    "JaxindError",
    "LayerResult",
    "Model",
    "ModelConfig",
    "Settings",
    "TestResult",
    "__version__",
    "forward",
    "from_params",
    "key_for",
    "load_model",
    "run_pair",
]

# Imported on first use (they import JAX), so that the CLIs can reject bad flags and paths fast. Module paths as
# strings, resolved by importlib: the face points at every floor of the package without an import-time edge.
_LAZY = {
    "Decoder": "jaxind.models.model",
    "forward": "jaxind.models.model",
    "Model": "jaxind.io.loaded_model",
    "from_params": "jaxind.io.loaded_model",
    "load_model": "converters.sources",
    "TESTS": "jaxind.pair.registry",
    "key_for": "jaxind.pair.registry",
    "Settings": "jaxind.pair.runner",
    "run_pair": "jaxind.pair.runner",
    "LayerResult": "jaxind.stats.results",
    "TestResult": "jaxind.stats.results",
}


def __getattr__(name: str) -> Any:
    """The heavy names of :data:`__all__`, imported when first used."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxind' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
