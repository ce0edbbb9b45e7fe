"""jaxind: independence tests for language models (Zhu et al., ICML 2025) in JAX/Flax.

Every test has one calling convention, ``TESTS[name](a, b, *, key, data=None, layers=None,
**options) -> TestResult``; models come from :func:`converters.sources.load_model` (any model
source) or :func:`from_params` (a param tree in memory). See docs/DESIGN.md §2 for the layout.
"""

__version__ = "0.1.0"

from typing import Any  # noqa: E402

from jaxind.config import ModelConfig  # noqa: E402
from jaxind.errors import JaxindError  # noqa: E402

__all__ = [
    "TESTS",
    "JaxindError",
    "LayerResult",
    "Model",
    "ModelConfig",
    "TestResult",
    "__version__",
    "from_params",
    "key_for",
]

# Imported on first use (they import JAX), so that the CLIs can reject bad flags and paths fast.
_LAZY = {
    "Model": "jaxind.loading",
    "from_params": "jaxind.loading",
    "TESTS": "jaxind.registry",
    "key_for": "jaxind.registry",
    "LayerResult": "jaxind.results",
    "TestResult": "jaxind.results",
}


def __getattr__(name: str) -> Any:
    """The heavy names of :data:`__all__`, imported when first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxind' has no attribute {name!r}")
