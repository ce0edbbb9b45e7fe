"""What the data-driven tests read: :class:`TokenData`, token ids plus the one-pass statistics
computed on them, cached per model pair.

CSH and MATCH on the same layer pairs need the same pass over the data (:mod:`jaxind.stats.grams`);
the registry's tests receive one ``TokenData`` per model pair (docs/DESIGN.md §5.3), so whichever
runs first pays for the pass and the other reuses it. Every test also accepts a plain token array
``(N, T)`` as ``data``.

When both models have a fingerprint on these tokens (:meth:`TokenData.add_fingerprint`, see
:mod:`jaxind.stats.fingerprint`), the statistics come from the two fingerprints by one matmul per layer
pair and neither model runs (docs/DESIGN.md §5.10).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxind.errors import JaxindError
from jaxind.io import token_source as data_lib
from jaxind.models.config import ModelConfig
from jaxind.stats import experts, fingerprint, grams
from jaxind.types import LayerPair, Params

__all__ = ["PassStats", "TokenData"]

PassStats = grams.PassStats | experts.ExpertPass


@dataclasses.dataclass(eq=False)
class TokenData:
    """Token ids both models see, in batches, and the pass statistics already computed on them.

    Attributes:
      tokens: ``(N, T)`` int token ids (in both models' shared vocabulary).
      batch_size: sequences per forward pass.
      aligned: for models with different tokenizers, a :class:`jaxind.io.alignment.AlignedTokens` (``tokens``
        are then A's).
      mask: ``(N, T)`` or None: 1 for a real token, 0 for padding (on either side of a sequence, as a tokenizer's
        ``attention_mask``). CSH, MATCH and localized testing run the models with it as the attention mask and
        count real tokens only, so their statistics are those of the unpadded sequences; tests that feed the
        token ids to the models without a mask (``mc``, ``jsd``) refuse padded data.
    """

    tokens: np.ndarray
    batch_size: int = 8
    aligned: Any = None
    mask: np.ndarray | None = None
    _passes: dict[tuple[int, int, tuple[LayerPair, ...]], tuple[Params, Params, PassStats]] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )
    _fingerprints: dict[int, tuple[Params, fingerprint.Fingerprint]] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens)
        if self.tokens.ndim != 2 or not np.issubdtype(self.tokens.dtype, np.integer) or self.tokens.size == 0:
            raise JaxindError(
                f"data must be integer token ids of shape (N, T), got {self.tokens.dtype} {self.tokens.shape}"
            )
        if self.batch_size < 1:
            raise JaxindError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.mask is not None:
            self.mask = np.asarray(self.mask)
            if self.mask.shape != self.tokens.shape or self.aligned is not None:
                raise JaxindError(
                    f"a padding mask must have the tokens' shape {self.tokens.shape} (1 = real token, 0 = padding), "
                    f"got {self.mask.shape}" + (" and aligned text of two tokenizers" if self.aligned else "")
                )
            real = self.mask != 0
            if not real.any(axis=1).all():
                raise JaxindError("every sequence needs at least one real token (mask 1); drop the empty rows")
            if real.all():
                self.mask = None  # no padding: the unpadded computation, bit for bit

    @classmethod
    def of(cls, data: TokenData | Any, test: str) -> TokenData:
        """``data`` as TokenData (a token array is wrapped).

        Raises:
          JaxindError: no data, or not a 2-D integer array.
        """
        if data is None:
            raise JaxindError(f"{test} runs the models on tokens: pass data= token ids of shape (N, T)")
        return data if isinstance(data, TokenData) else cls.wrap(data)

    @classmethod
    def wrap(cls, data: Any, batch_size: int = 8) -> TokenData:
        """A token array ``(N, T)``; a tokenizer's padded output (a mapping with ``input_ids`` and
        ``attention_mask``, e.g. ``tokenizer(texts, padding=True, return_tensors="np")``); or the aligned tokens
        of two tokenizers (:mod:`jaxind.io.alignment`)."""
        if hasattr(data, "tokens_a"):
            return cls(data.tokens_a, batch_size, aligned=data)
        if isinstance(data, Mapping) and "input_ids" in data:
            return cls(np.asarray(data["input_ids"]), batch_size, mask=data.get("attention_mask"))
        return cls(np.asarray(data), batch_size)

    def batches(self) -> Any:
        """``(tokens (B, T), mask (B, T))`` batches of equal shape (see
        :func:`jaxind.io.token_source.batches`; with a padding ``mask``, the batch's mask is 0 on padding
        too); for models with different tokenizers, :class:`jaxind.io.alignment.AlignedBatches`."""
        if self.aligned is not None:
            return self.aligned.batches(self.batch_size)
        out = list(data_lib.batches(self.tokens, self.batch_size))
        if self.mask is None:
            return out
        masks = (chunk for chunk, _ in data_lib.batches(self.mask.astype(np.float32), self.batch_size))
        return [(tokens, rows * padding) for (tokens, rows), padding in zip(out, masks, strict=True)]

    def require_unpadded(self, test: str) -> None:
        """Refuses a test that runs the models on the token ids without an attention mask.

        Raises:
          JaxindError: the data has padding.
        """
        if self.mask is not None:
            raise JaxindError(
                f"{test} runs the models on whole sequences and takes no padding mask: pass unpadded token ids "
                "(N, T) (e.g. windows of one length), or use csh/match/localized, which read the mask"
            )

    def require_shared_tokens(self, test: str) -> None:
        """Refuses a test that feeds one token array to both models when the two tokenizers differ.

        Raises:
          JaxindError: the data is aligned text of two tokenizers.
        """
        if self.aligned is not None:
            raise JaxindError(
                f"{test} feeds the same token ids to both models, and models A and B have different tokenizers: "
                "run it with --data=random (ids both vocabularies share), or use match/csh/localized on text"
            )

    def add_fingerprint(self, params: Params, fp: fingerprint.Fingerprint) -> None:
        """Lets the model with param tree ``params`` use its fingerprint ``fp`` instead of a pass.

        Raises:
          IncomparableError: ``fp`` was made on other tokens than these.
        """
        if fp.token_hash != fingerprint.token_hash(self.tokens):
            raise fingerprint.IncomparableError(
                f"the fingerprint of {fp.meta.get('name', fp.model_key)} was made on other tokens ({fp.describe()}) "
                f"than this data ({self.tokens.shape[0]}x{self.tokens.shape[1]}, hash "
                f"{fingerprint.token_hash(self.tokens)[:12]}): they are incomparable; fingerprint it on these tokens"
            )
        self._fingerprints[id(params)] = (params, fp)

    def _fingerprint_of(
        self, params: Params, cfg: ModelConfig, layers: Sequence[int]
    ) -> fingerprint.Fingerprint | None:
        held = self._fingerprints.get(id(params))
        if held is None or held[0] is not params or held[1].config != cfg or not set(layers) <= set(held[1].layers):
            return None
        return held[1]

    def pass_stats(
        self, params_a: Params, cfg_a: ModelConfig, params_b: Params, cfg_b: ModelConfig, pairs: Sequence[LayerPair]
    ) -> PassStats:
        """The one-pass statistics of ``pairs`` for these two models: from their fingerprints when
        both have one covering the pairs' layers, else computed by one pass on first use (for mixtures of
        experts, always by a pass: the input Grams of :mod:`jaxind.stats.experts`)."""
        pairs = tuple(pairs)
        key = (id(params_a), id(params_b), pairs)
        cached = self._passes.get(key)
        moe = cfg_a.moe or cfg_b.moe
        if moe and self.aligned is not None:
            raise JaxindError(
                "mixtures of experts on text of two different tokenizers are not supported yet: use --data=random"
            )
        own_pass = moe or self.aligned is not None or self.mask is not None  # fingerprints read unpadded tokens
        fp_a = None if own_pass else self._fingerprint_of(params_a, cfg_a, [a for a, _ in pairs])
        fp_b = None if own_pass else self._fingerprint_of(params_b, cfg_b, [b for _, b in pairs])
        if (cached is None or cached[0] is not params_a or cached[1] is not params_b) and fp_a and fp_b:
            cached = (params_a, params_b, fingerprint.pass_stats(fp_a, params_a, fp_b, params_b, pairs))
            self._passes[key] = cached
        if cached is None or cached[0] is not params_a or cached[1] is not params_b:
            layers_a = tuple(sorted({a for a, _ in pairs}))
            layers_b = tuple(sorted({b for _, b in pairs}))
            pair_index = tuple((layers_a.index(a), layers_b.index(b)) for a, b in pairs)
            accumulate = experts.accumulate if moe else grams.accumulate
            stats = accumulate(
                params_a,
                cfg_a,
                params_b,
                cfg_b,
                self.batches(),
                layers_a=layers_a,
                layers_b=layers_b,
                pair_index=pair_index,
            )
            cached = (params_a, params_b, stats)  # the param trees are held, so their ids stay unique
            self._passes[key] = cached
        return cached[2]
