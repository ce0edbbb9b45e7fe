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
import functools
import json
import os
from collections.abc import Iterator
from typing import Any

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
    def parse(cls, flag: str, **kwargs) -> DataSpec:
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
        if spec.path is not None and os.path.isdir(spec.path):
            raise JaxindError(f"data file {spec.path} is a directory: pass a {kind} file (--data={kind}:FILE)")
        if spec.path is not None and not os.path.isfile(spec.path):
            raise JaxindError(f"data file {spec.path} does not exist: check the path in --data={flag}")
        return spec

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_texts(spec: DataSpec) -> list[str]:
    """The documents of a text (whole file) or JSONL (one ``text`` field per line) source.

    Raises:
      JaxindError: the file is not UTF-8, has no text, or (JSONL) a line that is not an object
        with a string ``text`` field; the message names the file and the line.
    """
    if spec.path is None:
        raise JaxindError(f"--data={spec.kind} has no file to read")
    stat = os.stat(spec.path)
    return list(_read_texts(os.path.abspath(spec.path), spec.kind, stat.st_mtime_ns, stat.st_size))


def check_texts(spec: DataSpec) -> None:
    """Reads the data file once, up front, so that a bad file fails before any model is loaded
    (the documents are cached for :func:`make_tokens`)."""
    read_texts(spec)


@functools.lru_cache(maxsize=1)
def _read_texts(path: str, kind: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    del mtime_ns, size  # cache key only: a changed file is read again
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_number = raw.count(b"\n", 0, e.start) + 1
        raise JaxindError(
            f"{path} line {line_number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
            "pass a UTF-8 text file (convert it, e.g. with iconv -t UTF-8)"
        ) from None
    if kind == "text":
        if not text.strip():
            raise JaxindError(f"{path} is empty or only whitespace: pass a file with text (--data=text:FILE)")
        return (text,)
    texts = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            document = _jsonl_text(path, number, line)
            if document.strip():
                texts.append(document)
    if not texts:
        raise JaxindError(
            f"{path} has no documents (empty, blank lines or empty texts): "
            'write one JSON object per line, e.g. {"text": "..."}'
        )
    return tuple(texts)


def _jsonl_text(path: str, number: int, line: str) -> str:
    """The ``text`` field of JSONL line ``number``, or a JaxindError naming the line and the fix."""
    where, fix = f"{path} line {number}", 'each line must be a JSON object such as {"text": "..."}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise JaxindError(f"{where}: not valid JSON ({e.msg}, column {e.colno}): {fix}") from None
    if not isinstance(record, dict):
        raise JaxindError(f"{where}: a JSON {_json_type(record)}, not an object with a 'text' field: {fix}")
    if "text" not in record:
        fields = ", ".join(map(repr, list(record)[:5])) or "none"
        raise JaxindError(f"{where}: no 'text' field (fields: {fields}): {fix}")
    if not isinstance(record["text"], str):
        raise JaxindError(f"{where}: 'text' is a JSON {_json_type(record['text'])}, not a string: {fix}")
    return record["text"]


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


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


def make_tokens(
    spec: DataSpec, vocab_a: int, vocab_b: int, tokenizer_a: Any = None, tokenizer_b: Any = None
) -> np.ndarray:
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
    stream = np.concatenate(pieces)
    if stream.max(initial=0) >= shared:
        raise JaxindError(
            f"the tokenised data uses ids up to {stream.max()}, outside the shared vocabulary of {shared}"
        )
    return windows(stream, spec)


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
