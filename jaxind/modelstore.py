"""Models converted once and kept in the cache, their fingerprints computed once, and a pair of them
tested without converting or running either again (docs/DESIGN.md §5.10).

A model source (any kind :func:`converters.sources.load_model` reads) is identified by its content
key: a hash of its files' bytes (:func:`jaxind.store.content_hash`, memoised by stat) and the param
dtype. :func:`ensure` converts the source once and stores its param tree as ``.npy`` files under
``<cache>/models/<key>/``; :meth:`StoredModel.load` reads them back memory-mapped, so a pair's tests
touch only the arrays they use. :func:`ensure_fingerprint` computes the model's fingerprint on a
token set once (:mod:`jaxind.fingerprint`), and :func:`run_stored_pair` tests two stored models with
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

from jaxind import fingerprint, runner, store, testhooks
from jaxind.config import ModelConfig
from jaxind.errors import JaxindError
from jaxind.inputs import TokenData
from jaxind.loading import Model

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
        params = store.load_tree(os.path.join(self.folder, "weights"))
        return Model(config=self.config, params=params, meta={**self.meta, "source": self.source})

    def summary(self) -> dict[str, Any]:
        """What :meth:`jaxind.loading.Model.summary` says of it (recorded at conversion)."""
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
    return store.key_of(v=STORE_VERSION, content=store.content_hash(path, cache_root), dtype=dtype)


def _read(folder: str, name: str, source: str, key: str) -> StoredModel:
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = ModelConfig.from_json(f.read())
    return StoredModel(name, source, key, folder, cfg, meta)


def open_stored(name: str, source: str, key: str, cache_root: str | None = None) -> StoredModel:
    """A model :func:`ensure` stored, by its content key.

    Raises:
      JaxindError: no such entry in the cache.
    """
    folder = os.path.join(store.root(cache_root), "models", key)
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        raise JaxindError(f"model {name} ({source}) is not in the cache {store.root(cache_root)}: convert it again")
    return _read(folder, name, source, key)


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


def ensure(name: str, source: str, dtype: str = "float32", cache_root: str | None = None) -> tuple[StoredModel, bool]:
    """The stored model of ``source``: from the cache, or converted now and stored atomically
    (concurrent callers convert once). Returns ``(model, converted)``.

    Raises:
      JaxindError: the source is missing, unsupported, corrupt or inconsistent.
    """
    from converters.sources import load_model

    key = model_key(source, dtype, cache_root)
    final = os.path.join(store.root(cache_root), "models", key)
    with store.lock(final):
        if os.path.isfile(os.path.join(final, "meta.json")):
            return _read(final, name, source, key), False
        store.clean_stale(final)
        start = time.perf_counter()
        model = load_model(source, dtype=dtype)
        _check_room(os.path.dirname(final), model.params, source)
        tmp = store.make_temp(final)
        try:
            store.save_tree(os.path.join(tmp, "weights"), model.params)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write(model.config.to_json())
            meta = {k: v for k, v in model.meta.items() if k != "source"}
            meta.update(summary=model.summary(), converted_from=source, seconds=time.perf_counter() - start)
            with open(os.path.join(tmp, "meta.json"), "w") as f:  # last: its presence marks the entry
                json.dump(meta, f, indent=1, default=str)
            store.publish(tmp, final)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    testhooks.stop_at(f"converted:{name}")
    return _read(final, name, source, key), True


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
) -> dict[str, Any]:
    """Runs ``settings.tests`` on two loaded (stored) models over ``tokens``, MATCH and CSH from the
    fingerprints where given; returns the results document (``extra``: more top-level keys)."""
    if FULL_MODEL_TESTS & set(settings.tests):
        a, b = on_device(a), on_device(b)  # these tests read every weight, some many times
    token_data = TokenData(tokens, settings.batch_size)
    for model, fp in zip((a, b), fingerprints):
        if fp is not None:
            token_data.add_fingerprint(model.params, fp)
    return runner.run_pair(a, b, settings, log=log, tokens=token_data, **extra)
