"""Tokenizers for model sources, through transformers (HF directories and GGUF files)."""

from __future__ import annotations

import os
from typing import Any

from jaxind.errors import JaxindError, brief


def load_tokenizer(spec: dict[str, str]) -> Any:
    """A transformers tokenizer for ``{"kind": "hf"|"gguf"|"dir", "path": ...}``.

    Raises:
      JaxindError: the source has no usable tokenizer.
    """
    from transformers import AutoTokenizer

    kind, path = spec.get("kind"), spec.get("path")
    try:
        if kind == "gguf":
            return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise JaxindError(f"no usable tokenizer for {path} ({brief(e)}); "
                          "use --data=random or a source with a tokenizer") from None
