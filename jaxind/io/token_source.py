"""Token batches that both models see: random tokens, a plain-text file, or JSONL.

``--data=random`` draws uniform token ids from the vocabulary both models share (the prefix
``[0, min(V_A, V_B))``).

``--data=text:PATH`` reads only what the windows need, so the time to tokens does not grow with
the file (docs/DESIGN.md §5.11): each of the ``num_sequences`` windows starts at a seeded random
byte offset, moved to the next whitespace; about ``8 * seq_len`` bytes from there are read
(twice as many, again, until they give ``seq_len`` tokens), cut at the last whitespace and
tokenised with model A's tokenizer; the window is the first ``seq_len`` ids. Model B's tokenizer
must turn each of those texts (all that is fed) into exactly A's ids, else the run stops with an
error naming the window, its byte offset and the first differing token.

``--data=jsonl:PATH`` (a ``text`` field per line) is read and tokenised whole (documents joined
by the end-of-text token), every line checked, and B's ids compared over all of it; sequences are
windows of ``seq_len`` tokens at seeded random offsets into that stream.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxind.errors import JaxindError
from jaxind.io import tokenizer

__all__ = [
    "DataSpec",
    "TextWindows",
    "available_memory",
    "batches",
    "check_memory",
    "check_texts",
    "gib",
    "make_tokens",
    "memory_needed",
    "read_texts",
    "text_windows",
    "windows",
]


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


def available_memory() -> int | None:
    """Bytes of memory a new allocation can still get: /proc/meminfo's MemAvailable, capped by the cgroup
    (container) limit where one is set; None where neither can be read (not Linux)."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if cap != "max":
            limits.append(max(0, int(cap) - used))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def gib(n: float) -> str:
    """A byte count for people: ``3.2 GiB``, ``1.4 PiB``."""
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**20:.2f} MiB"


def memory_needed(spec: DataSpec, configs: Any = (), batch_size: int = 8, fingerprint: bool = False) -> dict[str, int]:
    """About the bytes of host memory a run needs, from the flags and the model configs (nothing loaded):
    ``tokens`` (the ``(N, T)`` ids, drawn as int64 and kept as int32; text windows also keep their
    text and ids as Python objects), ``activations`` (one batch through every model: residual stream,
    MLP units, logits, one layer's attention scores) and, for a scan's fingerprints, ``fingerprints``
    (each layer's normed MLP inputs over every token, float32)."""
    n_tok = spec.num_sequences * spec.seq_len
    need = {"tokens": n_tok * (12 if spec.kind != "text" else 64)}
    rows = min(batch_size, spec.num_sequences)
    if configs:
        need["activations"] = sum(
            4 * rows * spec.seq_len * (4 * c.d_model + 2 * c.d_ff + c.vocab_size + c.n_heads * spec.seq_len)
            for c in configs
        )
    if fingerprint and configs:
        need["fingerprints"] = sum(4 * n_tok * c.d_model * c.n_layers for c in configs)
    return need


def check_memory(spec: DataSpec, configs: Any = (), batch_size: int = 8, fingerprint: bool = False) -> None:
    """Refuses, before any model loads, a ``--num_sequences`` x ``--seq_len`` whose tokens and activations
    (:func:`memory_needed`) cannot fit in the memory available.

    Raises:
      JaxindError: naming the size needed, its parts, and the memory available.
    """
    need = memory_needed(spec, configs, batch_size, fingerprint)
    total, limit = sum(need.values()), available_memory()
    if limit is not None and total > limit:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in need.items())
        raise JaxindError(
            f"--num_sequences={spec.num_sequences} x --seq_len={spec.seq_len} needs about {gib(total)} of memory "
            f"({parts}) and {gib(limit)} is available: lower --num_sequences, --seq_len or --batch_size"
        )


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
    """Checks the data file up front, so that a bad file fails before any model is loaded: a
    JSONL file is read whole (the documents are cached for :func:`make_tokens`); of a text file
    only the first 64 KiB are read (empty, not UTF-8, only whitespace)."""
    if spec.kind == "text" and spec.path is not None:
        _check_text_head(spec.path)
    else:
        read_texts(spec)


_HEAD_BYTES = 1 << 16
_SPACE = b" \t\n\r\f\v"


def _utf8_error(path: str, raw: bytes, base: int, error: UnicodeDecodeError) -> JaxindError:
    """The one-line error for bytes ``raw`` read at offset ``base`` of ``path`` that are not UTF-8."""
    offset = base + error.start
    line = _count_newlines(path, offset) + 1
    return JaxindError(
        f"{path} line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {offset}): "
        "pass a UTF-8 text file (convert it, e.g. with iconv -t UTF-8)"
    )


def _count_newlines(path: str, end: int) -> int:
    count = 0
    with open(path, "rb") as f:
        while end > 0 and (chunk := f.read(min(end, 1 << 24))):
            count += chunk.count(b"\n")
            end -= len(chunk)
    return count


def _check_text_head(path: str) -> None:
    """Refuses an empty text file, a head that is not UTF-8, or a short file of only whitespace."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(_HEAD_BYTES)
    if size == 0 or (size <= _HEAD_BYTES and not raw.strip()):
        raise JaxindError(f"{path} is empty or only whitespace: pass a file with text (--data=text:FILE)")
    head = raw if size <= _HEAD_BYTES else _utf8_prefix(raw)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, raw, 0, e) from None


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


def make_tokens(spec: DataSpec, vocab_a: int, vocab_b: int, tokenizer_a: Any = None, tokenizer_b: Any = None) -> Any:
    """The ``(num_sequences, seq_len)`` int32 token array both models are run on; where B's tokenizer turns the
    text fed into other ids than A's, each model's own tokens of the same text and their aligned positions
    (:class:`jaxind.io.alignment.AlignedTokens`).

    Raises:
      JaxindError: a text source without tokenizers, ids outside the shared vocabulary, or (different
        tokenizers) too few aligned positions.
    """
    shared = min(vocab_a, vocab_b)
    if spec.kind == "random":
        rng = np.random.default_rng(spec.seed)
        return rng.integers(0, shared, (spec.num_sequences, spec.seq_len)).astype(np.int32)
    if tokenizer_a is None:
        raise JaxindError("text data needs model A's tokenizer, and it has none: use --data=random")
    from jaxind.io import alignment

    if spec.kind == "text":
        cut = text_windows(spec, tokenizer_a)
        if tokenizer_b is not None and tokenizer_b is not tokenizer_a:  # B must see exactly A's ids, or align
            try:
                cut.check(tokenizer_a, tokenizer_b)
            except JaxindError:
                return alignment.text_windows(cut.texts, tokenizer_a, tokenizer_b, spec.seq_len, vocab_a, vocab_b)
        return _in_vocabulary(cut.tokens, shared)
    texts = read_texts(spec)
    eos = getattr(tokenizer_a, "eos_token_id", None)
    separate = eos is not None and len(texts) > 1
    encoded = tokenizer.encode(tokenizer_a, texts)
    if tokenizer_b is not None and tokenizer_b is not tokenizer_a:  # B must see exactly A's ids (all), or align
        try:
            tokenizer.check_same_tokens(texts, encoded, tokenizer_a, tokenizer_b, separator=separate)
        except JaxindError:
            return alignment.stream_windows(texts, tokenizer_a, tokenizer_b, spec, vocab_a, vocab_b)
    pieces = []
    for ids in encoded:
        pieces.append(np.asarray(ids, np.int64))
        if separate:
            pieces.append(np.asarray([eos], np.int64))
    return windows(_in_vocabulary(np.concatenate(pieces), shared), spec)


def _in_vocabulary(ids: np.ndarray, shared: int) -> np.ndarray:
    if ids.max(initial=0) >= shared:
        raise JaxindError(f"the tokenised data uses ids up to {ids.max()}, outside the shared vocabulary of {shared}")
    return ids


@dataclasses.dataclass(frozen=True)
class TextWindows:
    """Windows cut from a text file by :func:`text_windows`.

    Attributes:
      tokens: ``(num_sequences, seq_len)`` int32 token ids (model A's tokenizer).
      texts: per window, the text read; its ids start with the window's.
      ids: per window, all the ids of ``texts[k]`` (what model B's tokenizer must reproduce).
      offsets: per window, the byte offset of ``texts[k]`` in the file.
    """

    tokens: np.ndarray
    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]

    def check(self, tokenizer_a: Any, tokenizer_b: Any) -> None:
        """Refuses a tokenizer B that turns any window's text into other ids than A's (every id compared).

        Raises:
          JaxindError: naming the window, its byte offset and the first differing token.
        """
        names = [f"window {k + 1} (byte offset {o:,})" for k, o in enumerate(self.offsets)]
        tokenizer.check_same_tokens(self.texts, self.ids, tokenizer_a, tokenizer_b, names=names)


def _utf8_prefix(raw: bytes) -> bytes:
    """``raw`` without a trailing, incomplete UTF-8 sequence."""
    for back in range(1, min(4, len(raw)) + 1):
        byte = raw[-back]
        if byte < 0x80:
            return raw
        if byte >= 0xC0:  # a lead byte: complete if its sequence fits
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return raw if need <= back else raw[:-back]
    return raw


def _cut(raw: bytes, at_start: bool, at_end: bool) -> tuple[bytes, int]:
    """The part of ``raw`` that starts after its first whitespace (unless it starts the file) and
    ends at its last whitespace (unless it ends the file); falls back to UTF-8 character boundaries
    for text without whitespace. Returns ``(bytes, offset of them in raw)``."""
    start = 0
    if not at_start:
        spaces = [i for i in (raw.find(c) for c in _SPACE) if i >= 0]
        start = min(spaces) + 1 if spaces else 0
        while start < len(raw) and 0x80 <= raw[start] < 0xC0:  # no whitespace: the next character
            start += 1
    end = len(raw)
    if not at_end:
        last = max(raw.rfind(c) for c in _SPACE)
        end = last + 1 if last >= start else start + len(_utf8_prefix(raw[start:]))
    return raw[start:end], start


def _read_window(f: Any, path: str, size: int, start: int, seq_len: int, tok: Any) -> tuple[str, list[int], int]:
    """Reads from byte ``start`` until the text gives ``seq_len`` ids (doubling the read, and moving
    it back from the end of the file when needed); returns ``(text, ids, byte offset of text)``.

    Raises:
      JaxindError: the bytes are not UTF-8, or the whole file has fewer than ``seq_len`` tokens.
    """
    span = 8 * seq_len + 64
    while True:
        lo = max(0, min(start, size - span))
        hi = min(size, lo + span)
        f.seek(lo)
        raw = f.read(hi - lo)
        part, skip = _cut(raw, lo == 0, hi == size)
        try:
            text = part.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _utf8_error(path, part, lo + skip, e) from None
        ids = tokenizer.encode(tok, [text])[0]
        if len(ids) >= seq_len:
            return text, ids, lo + skip
        if lo == 0 and hi == size:
            raise JaxindError(f"{path} has only {len(ids)} tokens; need at least --seq_len={seq_len}")
        span *= 2


def text_windows(spec: DataSpec, tok: Any) -> TextWindows:
    """``num_sequences`` windows of ``seq_len`` ids read at seeded random byte offsets of a text
    file, reading and tokenising only those bytes (see the module doc).

    Raises:
      JaxindError: an empty file, bytes that are not UTF-8, or too few tokens.
    """
    if spec.path is None:
        raise JaxindError("--data=text has no file to read")
    size = os.path.getsize(spec.path)
    if size == 0:
        raise JaxindError(f"{spec.path} is empty or only whitespace: pass a file with text (--data=text:FILE)")
    starts = np.random.default_rng(spec.seed).integers(0, size, spec.num_sequences)
    texts, ids, offsets = [], [], []
    with open(spec.path, "rb") as f:
        for start in starts:
            text, window_ids, offset = _read_window(f, spec.path, size, int(start), spec.seq_len, tok)
            texts.append(text)
            ids.append(tuple(int(i) for i in window_ids))
            offsets.append(offset)
    tokens = np.asarray([w[: spec.seq_len] for w in ids], np.int64)
    return TextWindows(tokens.astype(np.int32), tuple(texts), tuple(ids), tuple(offsets))


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
