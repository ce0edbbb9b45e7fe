"""A loaded model: :class:`Model` (config, params, provenance) and :func:`from_params`.

Reading a model from disk is :func:`converters.sources.load_model`; it lives with the readers so
that :mod:`jaxind` never imports :mod:`converters` (the dependency runs one way, docs/DESIGN.md §3).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxind.errors import JaxindError
from jaxind.models import model
from jaxind.models.config import ModelConfig
from jaxind.models.layer_selection import normalize_layers
from jaxind.parallel import sharding

__all__ = ["Model", "from_params"]


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

    def _check_mask(self, attention_mask: Any, shape: tuple[int, ...]) -> np.ndarray:
        mask = np.asarray(attention_mask)
        if mask.shape != shape:
            raise JaxindError(
                f"attention_mask must have the tokens' shape {shape} (1 = real token, 0 = padding), got {mask.shape}"
            )
        if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)) or not np.isin(mask, (0, 1)).all():
            raise JaxindError("attention_mask must hold only 1 (real token) and 0 (padding), or True/False")
        return mask.astype(np.int32)

    def _placed(self, tokens: Any, attention_mask: Any = None) -> tuple[jax.Array, jax.Array | None, Any]:
        """Checked tokens and attention mask on the params' devices (split over the mesh's batch axes when the
        params are sharded) and the residual stream's sharding (None on one device)."""
        checked = self._check_tokens(tokens).astype(np.int32)
        mask = None if attention_mask is None else self._check_mask(attention_mask, checked.shape)
        layout = sharding.layout_of(self.params)
        if layout is None:
            return jnp.asarray(checked), None if mask is None else jnp.asarray(mask), None
        batch, seq = checked.shape
        placed_mask = None if mask is None else layout.batch(mask)
        return layout.batch(checked), placed_mask, layout.activations(batch, seq, self.config.d_model)

    def logits(self, tokens: Any, attention_mask: Any = None) -> jax.Array:
        """``tokens (B, T)`` int -> logits ``(B, T, vocab)`` float32 (sharded like the tokens on a mesh).

        ``attention_mask``: ``(B, T)`` 1 = real token, 0 = padding (left or right); each real token's logits are
        those of its unpadded sequence, to float rounding (:func:`jaxind.models.model.forward`)."""
        placed, mask, x_sharding = self._placed(tokens, attention_mask)
        return model.forward_jit(self.params, self.config, placed, x_sharding=x_sharding, attention_mask=mask)[0]

    def mlp_activations(
        self, tokens: Any, layers: Iterable[int] | None = None, attention_mask: Any = None
    ) -> dict[int, dict[str, jax.Array]]:
        """``{layer: {"gate": (B, T, h), "up": (B, T, h)}}`` from one forward pass (no LM head); a mixture of
        experts also gives every expert's ``expert_gate``/``expert_up`` ``(B, T, E, he)`` on all tokens and the
        ``router_logits`` ``(B, T, E)`` (see :func:`jaxind.models.model.forward`).

        ``layers``: indices or None for every layer; negative indices count from the end and are normalised,
        so the keys of ``layers=[0, -1]`` are ``0`` and ``L - 1``. ``attention_mask``: as in :meth:`Model.logits`.
        """
        return self.intermediates(tokens, (), layers, attention_mask)

    def intermediates(
        self,
        tokens: Any,
        names: Sequence[str] = ("resid",),
        layers: Iterable[int] | None = None,
        attention_mask: Any = None,
    ) -> dict[int, dict[str, jax.Array]]:
        """``{layer: {name: (B, T, ...)}}``: the named intermediates of each layer from one forward pass (no LM
        head; the pass stops after the last chosen layer).

        ``names``: from :func:`jaxind.models.model.intermediate_names` (``"resid"`` the residual stream after the
        layer, ``"attn_out"``, ``"mlp_in"``, ``"gate"``, ``"up"``, ``"hidden"``;
        :data:`jaxind.models.model.INTERMEDIATES` says what each is); empty: :meth:`Model.mlp_activations`'s.
        ``layers``: indices or None for every layer, negative ones normalised (keys ``0`` and ``L - 1`` for
        ``[0, -1]``). ``attention_mask``: as in :meth:`Model.logits`.

        Raises:
          JaxindError: an unknown name, a layer out of range, bad tokens or a bad mask.
        """
        names = model.check_intermediates(self.config, names)
        collect = normalize_layers(self.config, layers)
        placed, mask, x_sharding = self._placed(tokens, attention_mask)
        return model.forward_jit(
            self.params,
            self.config,
            placed,
            collect,
            False,
            x_sharding=x_sharding,
            attention_mask=mask,
            intermediates=names,
        )[1]

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
    placed on its mesh (:meth:`jaxind.parallel.sharding.Layout.place`). Turns the compilation cache on, unless the
    program chose (:func:`jaxind.io.caching.enable_for_library`)."""
    from jaxind.io import caching

    caching.enable_for_library()
    if layout is not None:
        params = layout.place(params, cfg)
    return Model(config=cfg, params=params, meta={"source": name, "format": "memory"})
