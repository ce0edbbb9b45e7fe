"""Tokenizers for model sources, through transformers (HF directories, GGUF files, converted checkpoints).

A GGUF file's tokenizer is rebuilt from its ``tokenizer.ggml.*`` metadata by transformers' own GGUF
tokenizer converter. transformers' GGUF *file reader* imports PyTorch, so the metadata is read with the
``gguf`` package instead and handed to the same converter: GGUF tokenizers need no PyTorch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxind.errors import JaxindError, brief

__all__ = [
    "TOKENIZER_FILES",
    "check_same_tokens",
    "encode",
    "gguf_tokenizer",
    "gguf_tokenizer_without_torch",
    "load_tokenizer",
]

# Files one of which a Hugging Face model directory has when it ships a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "tekken.json",
    "vocab.txt",
)


def load_tokenizer(spec: dict[str, str]) -> Any:
    """A transformers tokenizer for ``{"kind": "hf"|"gguf"|"dir", "path": ...}``.

    Raises:
      JaxindError: the source has no usable tokenizer (one line: the reason and the fix).
    """
    kind, path = spec.get("kind"), spec.get("path", "")
    try:
        if kind == "gguf":
            return gguf_tokenizer(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except JaxindError:
        raise
    except Exception as e:
        raise JaxindError(
            f"no usable tokenizer for {path} ({brief(e, 300)}); use --data=random or a source with a tokenizer"
        ) from None


def gguf_tokenizer(path: str) -> Any:
    """The tokenizer a GGUF file describes, built by :func:`gguf_tokenizer_without_torch` (transformers' GGUF
    tokenizer converter on metadata the ``gguf`` package reads: no PyTorch import, which also keeps the
    converter's memory peak down). Where that fails and PyTorch is installed, transformers'
    ``AutoTokenizer(gguf_file=...)`` (the same converter behind a PyTorch-based file reader) is used instead."""
    try:
        return gguf_tokenizer_without_torch(path)
    except Exception:
        from transformers.utils import is_torch_available

        if not is_torch_available():
            raise
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))


# GGUF special-token ids -> the tokenizer attributes naming those tokens.
_GGUF_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def gguf_tokenizer_without_torch(path: str) -> Any:
    """Builds a GGUF file's tokenizer with no PyTorch: ``gguf.GGUFReader`` reads the ``tokenizer.*`` metadata,
    renamed with transformers' ``GGUF_TOKENIZER_MAPPING`` and converted by its ``convert_gguf_tokenizer`` (what
    ``AutoTokenizer.from_pretrained(gguf_file=...)`` does after its own, PyTorch-based, metadata read).

    Raises:
      JaxindError: the file has no tokenizer, or this transformers version lacks the GGUF tokenizer converter.
    """
    try:
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:
        raise JaxindError(
            f"reading the tokenizer of {path} without PyTorch needs transformers' GGUF tokenizer converter "
            "(transformers.integrations.gguf, transformers 5.x); install PyTorch (pip install 'jaxind[torch]') "
            "or a newer transformers, or use --data=random"
        ) from None
    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in metadata:
        raise JaxindError(f"{path} holds no tokenizer (no tokenizer.ggml.* metadata); use --data=random")
    architecture = reader.fields["general.architecture"].contents()
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies by default
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _GGUF_SPECIAL_TOKENS.items():
        index = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer_dict["tokens"][index] if index is not None else None
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each text, without special tokens."""
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def check_same_tokens(
    texts: Sequence[str],
    ids_a: Sequence[Sequence[int]],
    tokenizer_a: Any,
    tokenizer_b: Any,
    separator: bool = False,
    names: Sequence[str] | None = None,
) -> None:
    """Refuses data that model B's tokenizer turns into other ids than model A's (``ids_a``): every text is
    tokenised with B and compared id by id, and so is the end-of-text separator placed between documents.
    ``names``: what to call each text in the error (default: its position in the concatenated documents).

    Raises:
      JaxindError: naming the first differing position (document, token index) with both ids and their strings.
    """
    ids_b = encode(tokenizer_b, texts)
    fix = (
        "models A and B have different tokenizers, so B would not see the tokens A sees: use --data=random "
        "(token ids both vocabularies share) or models with the same tokenizer"
    )
    offset = 0
    for doc, (doc_a, doc_b) in enumerate(zip(ids_a, ids_b)):
        a, b = np.asarray(doc_a, np.int64), np.asarray(doc_b, np.int64)
        n = min(a.size, b.size)
        differ = np.flatnonzero(a[:n] != b[:n])
        if differ.size or a.size != b.size:
            i = int(differ[0]) if differ.size else n
            if names is not None:
                where = f"{names[doc]}, token {i:,}"
            else:
                where = f"token {offset + i:,}" + (f" (document {doc + 1}, token {i:,})" if len(texts) > 1 else "")
            raise JaxindError(
                f"models A and B tokenise the data differently from {where} on: "
                f"A gives {_describe(tokenizer_a, a, i)}, B gives {_describe(tokenizer_b, b, i)}; {fix}"
            )
        offset += a.size + int(separator)
    if separator:
        eos_a, eos_b = getattr(tokenizer_a, "eos_token_id", None), getattr(tokenizer_b, "eos_token_id", None)
        if eos_a != eos_b:
            raise JaxindError(
                f"models A and B end documents with different tokens (A: id {eos_a}, B: id {eos_b}); {fix}"
            )


def _describe(tokenizer: Any, ids: np.ndarray, i: int) -> str:
    if i >= ids.size:
        return f"no token (its tokenisation ends after {ids.size:,} tokens)"
    token = int(ids[i])
    to_string = getattr(tokenizer, "convert_ids_to_tokens", None)
    return f"id {token}" + (f" ({to_string(token)!r})" if to_string else "")
