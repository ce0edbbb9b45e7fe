"""Models with different tokenizers on the same text: each model reads the text tokenised by its own tokenizer,
and activations are compared at aligned positions (docs/DESIGN.md §5.14).

A token of A and a token of B are *aligned* when their spans end at the same byte offset of the text: both
models have then read exactly the same bytes (up to where the window starts). Where several tokens of one model
end at the same byte (the byte pieces of one multi-byte character), the last one is used, the one that completes
the character. Positions without a counterpart in the other model are dropped. A window starts with each model's
BOS token where its tokenizer adds one (Gemma, Llama); two BOS tokens are aligned with each other (both end at the
window's first byte). Spans come from the fast tokenizers' offset mappings (character offsets, turned into byte
offsets of the UTF-8 text here).

The one-pass statistics (:mod:`jaxind.stats.grams`) are accumulated over the aligned positions only: each model runs on
its own token ids, the MLP inputs at its aligned positions are gathered in the alignment's order, and the
cross-Grams and unit norms sum over those positions, so the ``h_A x h_B`` Grams compare both models on the same
text positions. Identical tokenizers never come here (:func:`jaxind.io.token_source.make_tokens` keeps one token array).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxind.errors import JaxindError

__all__ = [
    "AlignedBatches",
    "AlignedTokens",
    "Encoded",
    "MIN_POSITIONS",
    "NO_END",
    "Window",
    "align",
    "bos_id",
    "byte_offsets",
    "cut_window",
    "encode",
    "from_windows",
    "last_per_end",
    "stream_starts",
    "stream_windows",
    "streams",
    "text_windows",
]

MIN_POSITIONS = 128  # fewer aligned positions than this is refused: too few for the unit Grams to mean anything
NO_END = -1  # the end of a token that spans no text (it is never aligned)


def byte_offsets(text: str) -> np.ndarray:
    """``(len(text) + 1,)`` int64: the UTF-8 byte offset of each character offset of ``text``."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    lengths = 1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A text's tokens with their byte spans.

    Attributes:
      ids: ``(n,)`` int64 token ids.
      starts, ends: ``(n,)`` int64 byte offsets of each token's span (``ends`` is :data:`NO_END` for a token that
        spans no text).
    """

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.size)

    @classmethod
    def concat(cls, parts: Sequence[Encoded]) -> Encoded:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "starts", "ends")))


def encode(tok: Any, text: str, base: int = 0) -> Encoded:
    """``text``'s ids under ``tok`` (no special tokens added) with byte spans shifted by ``base``.

    Raises:
      JaxindError: the tokenizer gives no offset mapping (a slow, Python tokenizer).
    """
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        enc["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError):
        raise JaxindError(
            "models A and B have different tokenizers, and aligning them needs each token's span in the text, "
            f"which the tokenizer {type(tok).__name__} does not give (no offset mapping: a slow tokenizer): ship a "
            "tokenizer.json (a fast tokenizer) with the model, or use --data=random"
        ) from None
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    table = byte_offsets(text)
    starts, ends = table[offsets[:, 0]] + base, table[offsets[:, 1]] + base
    return Encoded(np.asarray(enc["input_ids"], np.int64), starts, np.where(ends > starts, ends, NO_END))


def bos_id(tok: Any) -> int | None:
    """The special token ``tok`` puts before a text when asked to add special tokens (its BOS), or None."""
    plain = list(tok("a", add_special_tokens=False)["input_ids"])
    full = list(tok("a")["input_ids"])
    special = set(getattr(tok, "all_special_ids", ()))
    if len(full) > len(plain) and full[0] in special and full[1 : 1 + len(plain)] == plain:
        return int(full[0])
    return None


def last_per_end(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(end values, index of the last token ending there)`` over the tokens with a span, sorted by end."""
    keep = np.flatnonzero(ends != NO_END)
    values, first_from_back = np.unique(ends[keep][::-1], return_index=True)
    return values, keep[keep.size - 1 - first_from_back]


def align(ends_a: np.ndarray, ends_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aligned positions ``(ia, ib)`` of two token sequences of the same text: per byte offset at which a token of
    each ends, the last such token of A and of B, in text order."""
    values_a, index_a = last_per_end(np.asarray(ends_a, np.int64))
    values_b, index_b = last_per_end(np.asarray(ends_b, np.int64))
    _, in_a, in_b = np.intersect1d(values_a, values_b, assume_unique=True, return_indices=True)
    return index_a[in_a], index_b[in_b]


@dataclasses.dataclass(frozen=True)
class Window:
    """One window of text as each model reads it: ids ``(T_a,)``/``(T_b,)``, byte ends, and the bytes covered."""

    ids_a: np.ndarray
    ends_a: np.ndarray
    ids_b: np.ndarray
    ends_b: np.ndarray
    num_bytes: int


def cut_window(a: Encoded, b: Encoded, start: int, length: int, bos: tuple[int | None, int | None]) -> Window:
    """The window of ``length`` tokens of A from token ``start`` of stream ``a`` (one fewer when A adds a BOS), and
    the tokens of stream ``b`` whose spans lie in the bytes those tokens of A cover; each led by its model's BOS."""
    take = length - (bos[0] is not None)
    ids_a, starts_a, ends_a = (x[start : start + take] for x in (a.ids, a.starts, a.ends))
    lo = int(starts_a[0])
    hi = int(ends_a.max(initial=lo))
    inside = (b.starts >= lo) & (b.ends <= hi) & ((b.ends != NO_END) | (b.starts < hi))
    ids_b, ends_b = b.ids[inside], b.ends[inside]
    parts = []
    for bos_id_, ids, ends in ((bos[0], ids_a, ends_a), (bos[1], ids_b, ends_b)):
        if bos_id_ is not None:  # a BOS spans no text and ends where the window starts, so two BOS tokens align
            ids, ends = np.concatenate([[bos_id_], ids]), np.concatenate([[lo], ends])
        parts.append((ids, ends))
    return Window(parts[0][0], parts[0][1], parts[1][0], parts[1][1], hi - lo)


@dataclasses.dataclass(frozen=True)
class AlignedTokens:
    """Token windows of the same text for two tokenizers and their aligned positions.

    Attributes:
      tokens_a: ``(N, T_a)`` int32 ids of A.
      tokens_b: ``(N, T_b)`` int32 ids of B (padded with id 0 after a window's end; padding is never aligned).
      pos_a, pos_b: ``(N, K)`` int32 aligned positions (row ``k``: ``tokens_a[n, pos_a[n, k]]`` and
        ``tokens_b[n, pos_b[n, k]]`` end at the same byte); padded with 0 where ``valid`` is 0.
      valid: ``(N, K)`` float32, 1 for the aligned positions, 0 for padding.
      text_bytes: bytes of text the windows cover.
      num_tokens_b: B's tokens in the windows (without the padding).
    """

    tokens_a: np.ndarray
    tokens_b: np.ndarray
    pos_a: np.ndarray
    pos_b: np.ndarray
    valid: np.ndarray
    text_bytes: int
    num_tokens_b: int

    @property
    def count(self) -> int:
        return int(self.valid.sum())

    def describe(self) -> dict[str, Any]:
        """What the results document records of the alignment (its ``data.alignment``)."""
        return {
            "aligned_positions": self.count,
            "tokens_a": int(self.tokens_a.size),
            "tokens_b": self.num_tokens_b,
            "tokens_b_shape": list(self.tokens_b.shape),
            "text_bytes": self.text_bytes,
        }

    def batches(self, batch_size: int) -> AlignedBatches:
        return AlignedBatches(self, batch_size)


def from_windows(windows: Sequence[Window], vocab_a: int, vocab_b: int, min_positions: int = MIN_POSITIONS):
    """Stacks windows into :class:`AlignedTokens`.

    Raises:
      JaxindError: ids outside a model's vocabulary, or fewer than ``min_positions`` aligned positions (naming
        how many more text bytes would give enough).
    """
    pairs = [align(w.ends_a, w.ends_b) for w in windows]
    count, text_bytes = sum(len(ia) for ia, _ in pairs), sum(w.num_bytes for w in windows)
    if count < min_positions:
        more = math.ceil((min_positions - count) * text_bytes / max(count, 1))
        raise JaxindError(
            f"models A and B have different tokenizers, and only {count:,} positions of the {text_bytes:,} text "
            f"bytes fed align (a token of each ending at the same byte; at least {min_positions:,} are needed): "
            f"feed about {more:,} more text bytes (raise --num_sequences or --seq_len)"
        )
    for name, vocab, ids in (("A", vocab_a, [w.ids_a for w in windows]), ("B", vocab_b, [w.ids_b for w in windows])):
        top = max(int(i.max(initial=0)) for i in ids)
        if top >= vocab:
            raise JaxindError(f"model {name}'s tokenizer gives ids up to {top}, outside its vocabulary of {vocab}")
    t_a, t_b = max(len(w.ids_a) for w in windows), max(len(w.ids_b) for w in windows)
    k = max(len(ia) for ia, _ in pairs)
    shape = (len(windows),)
    tokens_a, tokens_b = np.zeros((*shape, t_a), np.int32), np.zeros((*shape, t_b), np.int32)
    pos_a, pos_b, valid = np.zeros((*shape, k), np.int32), np.zeros((*shape, k), np.int32), np.zeros((*shape, k))
    for n, (w, (ia, ib)) in enumerate(zip(windows, pairs)):
        tokens_a[n, : len(w.ids_a)], tokens_b[n, : len(w.ids_b)] = w.ids_a, w.ids_b
        pos_a[n, : len(ia)], pos_b[n, : len(ib)], valid[n, : len(ia)] = ia, ib, 1.0
    num_b = sum(len(w.ids_b) for w in windows)
    return AlignedTokens(tokens_a, tokens_b, pos_a, pos_b, valid.astype(np.float32), text_bytes, num_b)


def text_windows(texts: Sequence[str], tok_a: Any, tok_b: Any, seq_len: int, vocab_a: int, vocab_b: int):
    """Aligned windows of plain-text windows (:func:`jaxind.io.token_source.text_windows`): the first
    ``seq_len`` tokens of A
    of each text (BOS included) and B's tokens of the same bytes."""
    bos = (bos_id(tok_a), bos_id(tok_b))
    windows = [cut_window(encode(tok_a, t), encode(tok_b, t), 0, seq_len, bos) for t in texts]
    return from_windows(windows, vocab_a, vocab_b)


def stream_windows(texts: Sequence[str], tok_a: Any, tok_b: Any, spec: Any, vocab_a: int, vocab_b: int):
    """Aligned windows of documents joined into one stream (JSONL): each document's tokens, then each model's
    end-of-text token (on a separator byte after the document, so that the two align); ``spec.num_sequences``
    windows of ``spec.seq_len`` tokens of A at seeded offsets (:func:`stream_starts`) and B's tokens of their bytes."""
    a, b = streams(texts, tok_a, tok_b)
    bos = (bos_id(tok_a), bos_id(tok_b))
    starts = stream_starts(len(a), spec.seq_len, spec.num_sequences, spec.seed)
    return from_windows([cut_window(a, b, int(s), spec.seq_len, bos) for s in starts], vocab_a, vocab_b)


def streams(texts: Sequence[str], tok_a: Any, tok_b: Any) -> tuple[Encoded, Encoded]:
    """Both models' token streams of the documents ``texts`` (see :func:`stream_windows`)."""
    out = []
    for tok in (tok_a, tok_b):
        eos, parts, base = getattr(tok, "eos_token_id", None), [], 0
        for text in texts:
            parts.append(encode(tok, text, base))
            base += len(text.encode("utf-8"))
            if eos is not None and len(texts) > 1:
                parts.append(Encoded(np.asarray([eos]), np.asarray([base]), np.asarray([base + 1])))
            base += 1
        out.append(Encoded.concat(parts))
    return out[0], out[1]


def stream_starts(n: int, seq_len: int, num_sequences: int, seed: int) -> np.ndarray:
    """Window starts into a stream of ``n`` tokens (as :func:`jaxind.io.token_source.windows` draws them).

    Raises:
      JaxindError: fewer tokens than one window.
    """
    if n < seq_len:
        raise JaxindError(f"the documents give only {n} tokens; need at least --seq_len={seq_len}")
    return np.random.default_rng(seed).integers(0, n - seq_len + 1, num_sequences)


class AlignedBatches:
    """Batches of :class:`AlignedTokens` (the one pass over them is :func:`jaxind.stats.grams.accumulate_aligned`)."""

    def __init__(self, data: AlignedTokens, batch_size: int) -> None:
        self.data, self.size = data, min(batch_size, data.tokens_a.shape[0])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        d, n = self.data, self.data.tokens_a.shape[0]
        for start in range(0, n, self.size):
            rows = np.arange(start, start + self.size) % n  # the last batch padded with the first rows, masked out
            keep = (np.arange(start, start + self.size) < n).astype(np.float32)[:, None]
            valid = d.valid[rows] * keep
            yield {
                "tokens_a": d.tokens_a[rows],
                "tokens_b": d.tokens_b[rows],
                "mask_a": _position_mask(d.pos_a[rows], valid, d.tokens_a.shape[1]),
                "mask_b": _position_mask(d.pos_b[rows], valid, d.tokens_b.shape[1]),
                "pos_a": d.pos_a[rows],
                "pos_b": d.pos_b[rows],
                "valid": valid,
            }


def _position_mask(pos: np.ndarray, valid: np.ndarray, length: int) -> np.ndarray:
    """``(B, length)`` float32: 1 at the valid positions ``pos (B, K)``."""
    mask = np.zeros((pos.shape[0], length), np.float32)
    np.maximum.at(mask, (np.arange(pos.shape[0])[:, None], pos), valid)
    return mask
