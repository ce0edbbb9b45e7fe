"""jaxind: independence tests for language models (Zhu et al., ICML 2025) in JAX/Flax.

Every test has one calling convention, ``TESTS[name](a, b, *, key, data=None, layers=None,
**options) -> TestResult``; models come from :func:`converters.sources.load_model` (any model
source) or :func:`from_params` (a param tree in memory). See docs/DESIGN.md §2 for the layout.
"""

__version__ = "0.1.0"

from jaxind.config import ModelConfig  # noqa: E402
from jaxind.errors import JaxindError  # noqa: E402
from jaxind.loading import Model, from_params  # noqa: E402
from jaxind.registry import TESTS, key_for  # noqa: E402
from jaxind.results import LayerResult, TestResult  # noqa: E402

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
