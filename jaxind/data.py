"""Token batches that both models see: random tokens, a plain-text file, or JSONL.

``--data=random`` draws uniform token ids from the vocabulary both models share (the prefix
``[0, min(V_A, V_B))``). ``--data=text:PATH`` and ``--data=jsonl:PATH`` (a ``text`` field per
line) are tokenised with model A's tokenizer; model B's tokenizer must turn the whole data into
the same ids (every token is compared), else the run stops with an error naming the first
difference. Sequences are windows of ``seq_len`` tokens at seeded random offsets into the
tokenised corpus.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np

from jaxind import tokenizer
from jaxind.errors import JaxindError


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What tokens to use.

    Attributes:
      kind: "random", "text" or "jsonl".
      path: the file for text/jsonl.
      num_sequences, seq_len: the token array is ``(num_sequences, seq_len)``.
      seed: seeds the random tokens / window offsets.
    """

    kind: str = "random"
    path: str | None = None
    num_sequences: int = 64
    seq_len: int = 128
    seed: int = 0

    @classmethod
    def parse(cls, flag: str, **kwargs) -> "DataSpec":
        """``random`` | ``text:PATH`` | ``jsonl:PATH`` -> DataSpec."""
        kind, _, path = flag.partition(":")
        if kind == "random" and not path:
            spec = cls(kind="random", **kwargs)
        elif kind in ("text", "jsonl") and path:
            spec = cls(kind=kind, path=path, **kwargs)
        else:
            raise JaxindError(f"--data={flag!r} not understood: use random, text:PATH or jsonl:PATH")
        if spec.num_sequences < 1 or spec.seq_len < 2:
            raise JaxindError("--num_sequences must be >= 1 and --seq_len >= 2")
        if spec.path is not None and not os.path.isfile(spec.path):
            raise JaxindError(f"data file {spec.path} does not exist")
        return spec

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_texts(spec: DataSpec) -> list[str]:
    """The documents of a text (whole file) or JSONL (one ``text`` field per line) source."""
    with open(spec.path, encoding="utf-8") as f:
        if spec.kind == "text":
            return [f.read()]
        texts = []
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise JaxindError(f"{spec.path} line {number}: expected a JSON object with a 'text' field") from None
        return texts


def windows(ids: np.ndarray, spec: DataSpec) -> np.ndarray:
    """``(num_sequences, seq_len)`` windows at seeded random offsets into ``ids (n,)``.

    Raises:
      JaxindError: fewer tokens than one window.
    """
    n = ids.shape[0]
    if n < spec.seq_len:
        raise JaxindError(f"{spec.path} has only {n} tokens; need at least --seq_len={spec.seq_len}")
    starts = np.random.default_rng(spec.seed).integers(0, n - spec.seq_len + 1, spec.num_sequences)
    return np.stack([ids[s : s + spec.seq_len] for s in starts]).astype(np.int32)


def make_tokens(spec: DataSpec, vocab_a: int, vocab_b: int, tokenizer_a: Any = None, tokenizer_b: Any = None) -> np.ndarray:
    """The ``(num_sequences, seq_len)`` int32 token array both models are run on.

    Raises:
      JaxindError: a text source without tokenizers, tokenizers that disagree, or ids outside
        the shared vocabulary.
    """
    shared = min(vocab_a, vocab_b)
    if spec.kind == "random":
        rng = np.random.default_rng(spec.seed)
        return rng.integers(0, shared, (spec.num_sequences, spec.seq_len)).astype(np.int32)
    if tokenizer_a is None:
        raise JaxindError("text data needs model A's tokenizer, and it has none: use --data=random")
    texts = read_texts(spec)
    eos = getattr(tokenizer_a, "eos_token_id", None)
    separate = eos is not None and len(texts) > 1
    encoded = tokenizer.encode(tokenizer_a, texts)
    if tokenizer_b is not None and tokenizer_b is not tokenizer_a:  # B must see exactly A's ids, all of them
        tokenizer.check_same_tokens(texts, encoded, tokenizer_a, tokenizer_b, separator=separate)
    pieces = []
    for ids in encoded:
        pieces.append(np.asarray(ids, np.int64))
        if separate:
            pieces.append(np.asarray([eos], np.int64))
    ids = np.concatenate(pieces)
    if ids.max(initial=0) >= shared:
        raise JaxindError(f"the tokenised data uses ids up to {ids.max()}, outside the shared vocabulary of {shared}")
    return windows(ids, spec)


def batches(tokens: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(tokens (B, T), mask (B, T))`` for consecutive slices of ``B = min(batch_size, N)`` rows.

    Every batch has the same shape (one compilation); the last is padded with copies of the
    first rows, masked out (mask 0), so that no token counts twice.
    """
    n = tokens.shape[0]
    size = min(batch_size, n)
    for start in range(0, n, size):
        chunk = tokens[start : start + size]
        mask = np.ones(tokens.shape[1:], np.float32)[None].repeat(size, 0)
        if chunk.shape[0] < size:
            mask[chunk.shape[0] :] = 0.0
            chunk = np.concatenate([chunk, tokens[: size - chunk.shape[0]]])
        yield chunk, mask
