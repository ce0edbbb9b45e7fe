"""Type aliases shared across jaxind (one definition each).

``Params`` is the param pytree of :mod:`jaxind.models.model` (layout in its module docstring);
``LayerPair`` is ``(layer of A, layer of B)``. Enumerations of the model config (family,
activation, norm) live with :class:`jaxind.models.config.ModelConfig`; test names with the registry
(:data:`jaxind.pair.registry.TestName`).
"""

from __future__ import annotations

from typing import Any

# A model's parameters: {"embed", "layers": {"q": (L, ...), ...} (stacked), "final_norm", ...} of jax or numpy arrays.
Params = dict[str, Any]
# Layer i of model A against layer j of model B.
LayerPair = tuple[int, int]
