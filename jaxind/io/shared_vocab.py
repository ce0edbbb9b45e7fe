"""Tokens two vocabularies share by string, not by id (docs/DESIGN.md §5.16).

``csu_aligned`` (:mod:`jaxind.stats.csu_aligned`) fits the map between two models' residual streams on the
embedding rows of tokens both vocabularies hold. A token is identified by its vocabulary string, with the
two common word-boundary markers made equal: a leading ``Ġ`` (byte-level BPE: GPT-2, Llama 3, SmolLM2) or
``▁`` (sentencepiece: Llama 2, Gemma, Mistral) becomes a space, so ``Ġthe`` and ``▁the`` are one token. A
string that two ids of one vocabulary map to after that is dropped (it names no single row). Ids at or past a
model's embedding rows (tokenizer entries the checkpoint has no row for) are dropped too. Two identical
tokenizers share every id; models without a tokenizer (in-memory trees, the demo's byte models) are matched
id for id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxind.errors import JaxindError

__all__ = ["SharedTokens", "shared_tokens", "shared_by_string", "shared_by_id", "vocabulary", "token_key"]

_MARKERS = ("Ġ", "▁")  # byte-level BPE's and sentencepiece's "a space before this word"


@dataclasses.dataclass(frozen=True)
class SharedTokens:
    """Index pairs of shared tokens: ``ids_a[i]`` of model A and ``ids_b[i]`` of model B are one token.

    Attributes:
      ids_a, ids_b: ``(n,)`` int64, sorted by ``ids_a``.
      by: ``"string"`` (vocabulary strings compared) or ``"id"`` (ids taken for strings: no tokenizer).
    """

    ids_a: np.ndarray
    ids_b: np.ndarray
    by: str

    def __len__(self) -> int:
        return int(self.ids_a.size)


def token_key(token: str) -> str:
    """The string a token is compared by: a leading word-boundary marker (``Ġ``, ``▁``) becomes a space."""
    return " " + token[1:] if token[:1] in _MARKERS else token


def _keyed(vocab: Mapping[str, int], size: int) -> dict[str, int]:
    """``{key: id}`` for the ids below ``size`` whose key no other such id has."""
    out: dict[str, int] = {}
    ambiguous: set[str] = set()
    for token, i in vocab.items():
        if not 0 <= int(i) < size:
            continue
        key = token_key(token)
        if key in out and out[key] != int(i):
            ambiguous.add(key)
        out[key] = int(i)
    return {k: v for k, v in out.items() if k not in ambiguous}


def shared_by_string(vocab_a: Mapping[str, int], vocab_b: Mapping[str, int], size_a: int, size_b: int) -> SharedTokens:
    """The tokens ``vocab_a`` and ``vocab_b`` (``{string: id}``, e.g. ``tokenizer.get_vocab()``) share, with ids
    below ``size_a`` / ``size_b`` (the models' embedding rows)."""
    keyed_a, keyed_b = _keyed(vocab_a, size_a), _keyed(vocab_b, size_b)
    pairs = sorted((keyed_a[k], keyed_b[k]) for k in keyed_a.keys() & keyed_b.keys())
    ids = np.asarray(pairs, np.int64).reshape(-1, 2)
    return SharedTokens(ids[:, 0].copy(), ids[:, 1].copy(), "string")


def shared_by_id(size_a: int, size_b: int) -> SharedTokens:
    """Ids taken for strings (models without a tokenizer): ``0 .. min(size_a, size_b) - 1`` on both sides."""
    ids = np.arange(min(size_a, size_b), dtype=np.int64)
    return SharedTokens(ids, ids.copy(), "id")


def vocabulary(tokenizer: Any) -> dict[str, int]:
    """A transformers tokenizer's ``{string: id}`` (added tokens included).

    Raises:
      JaxindError: the tokenizer lists no vocabulary.
    """
    try:
        return dict(tokenizer.get_vocab())
    except (AttributeError, NotImplementedError) as e:
        raise JaxindError(
            f"the tokenizer {type(tokenizer).__name__} lists no vocabulary ({e}), so the tokens two models share "
            "cannot be found by string: ship a tokenizer.json with the model"
        ) from None


def shared_tokens(tok_a: Any, tok_b: Any, size_a: int, size_b: int) -> SharedTokens:
    """The tokens two models share: by string where both have a tokenizer, else by id (one of them is None)."""
    if tok_a is None or tok_b is None:
        return shared_by_id(size_a, size_b)
    return shared_by_string(vocabulary(tok_a), vocabulary(tok_b), size_a, size_b)
