"""jaxind: independence tests for language models (Zhu et al., ICML 2025) in JAX/Flax."""

__version__ = "0.1.0"

from jaxind.config import ModelConfig  # noqa: E402
from jaxind.errors import JaxindError  # noqa: E402
from jaxind.loading import Model, from_params, load_model  # noqa: E402

__all__ = ["JaxindError", "Model", "ModelConfig", "from_params", "load_model", "__version__"]
