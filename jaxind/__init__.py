"""jaxind: independence tests for language models (Zhu et al., ICML 2025) in JAX/Flax."""

__version__ = "0.1.0"

from typing import Any  # noqa: E402

from jaxind.config import ModelConfig  # noqa: E402
from jaxind.errors import JaxindError  # noqa: E402

__all__ = ["JaxindError", "Model", "ModelConfig", "from_params", "load_model", "__version__"]

_LAZY = ("Model", "from_params", "load_model")


def __getattr__(name: str) -> Any:
    """``Model``, ``from_params`` and ``load_model`` import JAX on first use, so that the CLIs can
    reject bad flags and paths without paying for it."""
    if name in _LAZY:
        from jaxind import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'jaxind' has no attribute {name!r}")
