"""Models converted once and kept in the cache, their fingerprints computed once, and a pair of them
tested without converting or running either again (docs/DESIGN.md §5.10).

A model source (any kind :func:`converters.sources.load_model` reads) is identified by its content
key: a hash of its files' bytes (:func:`jaxind.io.disk_cache.content_hash`, memoised by stat) and the param
dtype. :func:`ensure` converts the source once and stores its param tree as ``.npy`` files under
``<cache>/models/<key>/``, with the content hash and every array's checksum; :meth:`StoredModel.load`
reads them back memory-mapped after verifying the checksums (once per process). :func:`ensure`
verifies an existing entry before using it: one that is damaged (noise, flipped bits, a truncated,
missing or replaced file, bad JSON) is discarded with one warning and converted again
(:func:`jaxind.io.disk_cache.discard`). :func:`ensure_fingerprint` computes the model's fingerprint on a
token set once (:mod:`jaxind.stats.fingerprint`), and :func:`run_stored_pair` tests two stored models with
their fingerprints: the per-pair work is matmuls and LAPs, no forward pass for MATCH and CSH.

This module reads checkpoints (it imports :mod:`converters`), like :mod:`jaxind.main`; nothing in
the library core imports it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxind import testhooks
from jaxind.errors import JaxindError
from jaxind.io import disk_cache
from jaxind.io.loaded_model import Model
from jaxind.models.config import ModelConfig
from jaxind.pair import runner
from jaxind.pair.result import PairResult
from jaxind.pair.token_data import TokenData
from jaxind.stats import fingerprint

__all__ = [
    "FULL_MODEL_TESTS",
    "STORE_VERSION",
    "StoredModel",
    "ensure",
    "ensure_fingerprint",
    "model_key",
    "on_device",
    "open_stored",
    "run_stored_pair",
]

STORE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class StoredModel:
    """A converted model in the cache.

    Attributes:
      name: the name the caller gave it (a sweep's model name; not part of the cache entry).
      source: the source string it was converted from.
      key: its content key; ``folder`` the cache entry.
      config: its config; ``meta`` provenance (format, tokenizer location, summary, seconds).
    """

    name: str
    source: str
    key: str
    folder: str
    config: ModelConfig
    meta: dict[str, Any]

    def load(self) -> Model:
        """The model, params as memory-mapped numpy arrays (moved to the device when used)."""
        params = disk_cache.load_tree(os.path.join(self.folder, "weights"))
        return Model(config=self.config, params=params, meta={**self.meta, "source": self.source})

    def summary(self) -> dict[str, Any]:
        """What :meth:`jaxind.io.loaded_model.Model.summary` says of it (recorded at conversion)."""
        return {**self.meta["summary"], "source": self.source}


def on_device(model: Model) -> Model:
    """``model`` with every param leaf on the default device (one transfer, before many uses)."""
    return dataclasses.replace(model, params=jax.tree.map(jnp.asarray, model.params))


def model_key(source: str, dtype: str = "float32", cache_root: str | None = None) -> str:
    """The content key of a source: a hash of its files and the param dtype (no weights converted).

    Raises:
      JaxindError: the source is missing (a hub id is fetched first where the network allows).
    """
    from converters import sources

    path = sources.resolve(source)
    return disk_cache.key_of(v=STORE_VERSION, content=disk_cache.content_hash(path, cache_root), dtype=dtype)


def _read(folder: str, name: str, source: str, key: str) -> StoredModel:
    """The entry's JSON files, checked against ``key``.

    Raises:
      store.DamagedEntry: a file is missing or unreadable, or the entry records another key.
    """
    meta = disk_cache.read_json_entry(os.path.join(folder, "meta.json"))
    if not isinstance(meta, dict) or meta.get("key") != key:
        found = meta.get("key") if isinstance(meta, dict) else None
        raise disk_cache.DamagedEntry(f"meta.json records key {found}, not {key} (no checksums: an older jaxind)")
    try:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = ModelConfig.from_json(f.read())
    except (OSError, ValueError, TypeError, KeyError, JaxindError) as e:
        raise disk_cache.DamagedEntry(f"cannot read config.json ({type(e).__name__}: {e})") from None
    return StoredModel(name, source, key, folder, cfg, meta)


def _verified(stored: StoredModel) -> StoredModel:
    """``stored`` after reading its param tree once (every checksum; remembered for this process).

    Raises:
      store.DamagedEntry: a leaf does not verify, or the tree has another number of leaves than recorded.
    """
    params = disk_cache.load_tree(os.path.join(stored.folder, "weights"))
    if len(jax.tree.leaves(params)) != stored.meta.get("leaves"):
        raise disk_cache.DamagedEntry(f"weights/tree.json lists {len(jax.tree.leaves(params))} leaves, "
                                 f"meta.json {stored.meta.get('leaves')}")  # fmt: skip
    return stored


def open_stored(name: str, source: str, key: str, cache_root: str | None = None) -> StoredModel:
    """A model :func:`ensure` stored, by its content key (verified).

    Raises:
      JaxindError: no such entry in the cache; store.DamagedEntry: it does not verify.
    """
    folder = os.path.join(disk_cache.root(cache_root), "models", key)
    if not os.path.isdir(folder):
        raise JaxindError(
            f"model {name} ({source}) is not in the cache {disk_cache.root(cache_root)}: convert it again"
        )
    return _verified(_read(folder, name, source, key))


def _check_room(root: str, params: Any, source: str) -> None:
    """Refuses (``OSError`` ENOSPC) to store ``params`` where the disk would keep less than 1 GiB free after them."""
    need = sum(int(x.nbytes) for x in jax.tree.leaves(params))
    free = shutil.disk_usage(root).free
    if free < need + 2**30:
        raise OSError(
            errno.ENOSPC,
            f"{source} needs {need / 2**30:.1f} GiB in the model cache plus 1 GiB kept free on the disk, and {root} "
            f"has {free / 2**30:.1f} GiB free (free space there, or set JAXIND_CACHE to a larger disk)",
        )


def _existing(final: str, name: str, source: str, key: str) -> StoredModel | None:
    """The verified entry at ``final``; None when there is none or it was damaged (then discarded)."""
    if not os.path.lexists(final):
        return None
    try:
        return _verified(_read(final, name, source, key))
    except disk_cache.DamagedEntry as e:
        disk_cache.discard(final, str(e))
        return None


def ensure(name: str, source: str, dtype: str = "float32", cache_root: str | None = None) -> tuple[StoredModel, bool]:
    """The stored model of ``source``: from the cache (verified), or converted now and stored
    atomically (concurrent callers convert once; a damaged entry is replaced). Returns ``(model, converted)``.

    Raises:
      JaxindError: the source is missing, unsupported, corrupt or inconsistent.
    """
    from converters import sources

    path = sources.resolve(source)
    content = disk_cache.content_hash(path, cache_root)
    key = disk_cache.key_of(v=STORE_VERSION, content=content, dtype=dtype)
    final = os.path.join(disk_cache.root(cache_root), "models", key)
    with disk_cache.lock(final):
        found = _existing(final, name, source, key)
        if found is not None:
            return found, False
        disk_cache.clean_stale(final)
        start = time.perf_counter()
        model = sources.load_model(source, dtype=dtype)
        _check_room(os.path.dirname(final), model.params, source)
        tmp = disk_cache.make_temp(final)
        try:
            disk_cache.save_tree(os.path.join(tmp, "weights"), model.params)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write(model.config.to_json())
            meta = {k: v for k, v in model.meta.items() if k != "source"}
            meta.update(summary=model.summary(), converted_from=source, seconds=time.perf_counter() - start)
            meta.update(key=key, content_sha256=content, dtype=dtype, leaves=len(jax.tree.leaves(model.params)))
            with open(os.path.join(tmp, "meta.json"), "w") as f:  # last: its presence marks the entry
                json.dump(meta, f, indent=1, default=str)
            disk_cache.publish(tmp, final)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    testhooks.stop_at(f"converted:{name}")
    return _verified(_read(final, name, source, key)), True


def ensure_fingerprint(
    stored: StoredModel,
    tokens: np.ndarray,
    layers: tuple[int, ...] | None = None,
    *,
    batch_size: int = 8,
    cache_root: str | None = None,
    data_info: dict[str, Any] | None = None,
) -> tuple[fingerprint.Fingerprint, bool]:
    """The stored model's fingerprint on ``tokens`` over ``layers`` (default all): from the cache, or
    computed by one forward pass over the tokens. Returns ``(fingerprint, computed)``."""
    chosen = tuple(range(stored.config.n_layers)) if layers is None else layers
    return fingerprint.ensure(
        cache_root,
        stored.key,
        stored.config,
        lambda: on_device(stored.load()).params,
        tokens,
        chosen,
        batch_size=batch_size,
        name=stored.name,
        source=stored.source,
        data=data_info or {},
    )


FULL_MODEL_TESTS = frozenset({"l2", "mc", "jsd", "csu_all", "generalized", "localized"})


def run_stored_pair(
    a: Model,
    b: Model,
    settings: runner.Settings,
    tokens: np.ndarray,
    fingerprints: tuple[fingerprint.Fingerprint | None, fingerprint.Fingerprint | None] = (None, None),
    log: Callable[[str], None] = lambda message: None,
    **extra: Any,
) -> PairResult:
    """Runs ``settings.tests`` on two loaded (stored) models over ``tokens``, MATCH and CSH from the
    fingerprints where given; returns their :class:`PairResult` (``extra``: more top-level keys)."""
    if FULL_MODEL_TESTS & set(settings.tests):
        a, b = on_device(a), on_device(b)  # these tests read every weight, some many times
    token_data = TokenData(tokens, settings.batch_size)
    for model, fp in zip((a, b), fingerprints):
        if fp is not None:
            token_data.add_fingerprint(model.params, fp)
    return runner.run_pair(a, b, settings, log=log, tokens=token_data, **extra)
