"""A loaded model: :class:`Model` (config, params, provenance) and :func:`from_params`.

Reading a model from disk is :func:`converters.sources.load_model`; it lives with the readers so
that :mod:`jaxind` never imports :mod:`converters` (the dependency runs one way, docs/DESIGN.md §3).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxind.errors import JaxindError
from jaxind.models import model
from jaxind.models.config import ModelConfig
from jaxind.models.layers import normalize_layers
from jaxind.parallel import sharding


@dataclasses.dataclass
class Model:
    """A loaded model: config, param tree, and where it came from.

    Attributes:
      config: the :class:`ModelConfig`.
      params: the param pytree (jax arrays; layout in :mod:`jaxind.models.model`).
      meta: source path, format ("hf", "gguf", "jaxind", "memory"), tokenizer location.
    """

    config: ModelConfig
    params: Any
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def _check_tokens(self, tokens: Any) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise JaxindError(
                f"tokens must be an integer array of shape (batch, seq), got {tokens.dtype} {tokens.shape}"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise JaxindError(
                f"token ids must lie in [0, {self.config.vocab_size}), got range [{tokens.min()}, {tokens.max()}]"
            )
        return tokens

    def _placed(self, tokens: Any) -> tuple[jax.Array, Any]:
        """Checked tokens on the params' devices (split over the mesh's batch axes when the params are sharded)
        and the residual stream's sharding (None on one device)."""
        checked = self._check_tokens(tokens)
        layout = sharding.layout_of(self.params)
        if layout is None:
            return jnp.asarray(checked, jnp.int32), None
        batch, seq = checked.shape
        return layout.batch(checked.astype(np.int32)), layout.activations(batch, seq, self.config.d_model)

    def logits(self, tokens: Any) -> jax.Array:
        """``tokens (B, T)`` int -> logits ``(B, T, vocab)`` float32 (sharded like the tokens on a mesh)."""
        placed, x_sharding = self._placed(tokens)
        return model.forward_jit(self.params, self.config, placed, x_sharding=x_sharding)[0]

    def mlp_activations(self, tokens: Any, layers: Iterable[int] | None = None) -> dict[int, dict[str, jax.Array]]:
        """``{layer: {"gate": (B, T, h), "up": (B, T, h)}}`` from one forward pass (no LM head); a mixture of
        experts also gives every expert's ``expert_gate``/``expert_up`` ``(B, T, E, he)`` on all tokens and the
        ``router_logits`` ``(B, T, E)`` (see :func:`jaxind.models.model.forward`).

        ``layers``: indices (negative allowed) or None for every layer.
        """
        collect = normalize_layers(self.config, layers)
        placed, x_sharding = self._placed(tokens)
        return model.forward_jit(self.params, self.config, placed, collect, False, x_sharding=x_sharding)[1]

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The source's transformers tokenizer (raises JaxindError where there is none)."""
        from jaxind.io.tokenizer import load_tokenizer

        spec = self.meta.get("tokenizer")
        if not spec:
            why = self.meta.get("tokenizer_missing")
            raise JaxindError(
                f"model {self.meta.get('source', '?')} has no tokenizer{f' ({why})' if why else ''}; use --data=random"
            )
        return load_tokenizer(spec)

    def summary(self) -> dict[str, Any]:
        """What was loaded, for printing and for the results JSON."""
        c = self.config
        leaves = jax.tree.leaves(self.params)
        return {
            "source": self.meta.get("source"),
            "format": self.meta.get("format"),
            "family": c.family,
            "layers": c.n_layers,
            "d_model": c.d_model,
            "d_ff": c.d_ff,
            "heads": c.n_heads,
            "kv_heads": c.n_kv_heads,
            "vocab": c.vocab_size,
            "params": int(sum(int(np.prod(x.shape)) for x in leaves)),
            "dtype": str(leaves[0].dtype),
            # config keys of the source that cannot change the function, and why (see
            # jaxind.io.hf_config.parse_hf_config)
            "ignored_config_keys": dict(self.meta.get("ignored_config_keys") or {}),
            # a mixture of experts: routed experts per layer, their width, experts per token
            **(
                {"experts": c.n_experts, "d_expert": c.d_expert, "experts_per_token": c.experts_per_token}
                if c.moe
                else {}
            ),
        }


def from_params(cfg: ModelConfig, params: Any, name: str = "memory", layout: sharding.Layout | None = None) -> Model:
    """Wraps an in-memory param tree (tests, the demo zoo) as a :class:`Model`; with a ``layout`` the params are
    placed on its mesh (:meth:`jaxind.parallel.sharding.Layout.place`)."""
    if layout is not None:
        params = layout.place(params, cfg)
    return Model(config=cfg, params=params, meta={"source": name, "format": "memory"})
