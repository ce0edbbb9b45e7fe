"""A model's fingerprint: what MATCH and CSH need from one model alone, computed once on a shared
reference token set and cached on disk (docs/DESIGN.md §5.10).

For each collected layer ``l`` a fingerprint holds the normed MLP inputs ``X_l (n_tok, d)`` over
the reference tokens and each hidden unit's sum of squared gate and up outputs ``(h,)``, plus the
token ids themselves. For two fingerprints made on the same tokens, the one-pass statistics of any
layer pair follow by one matmul, ``X_A[i]^T X_B[j] (d_A, d_B)`` (:class:`CrossGrams`), from which
:class:`jaxind.stats.grams.PassStats` derives the ``h_A x h_B`` Grams with the gate/up kernels
(docs/DESIGN.md §5.1): N models cost N forward passes instead of one per pair.

Fingerprints on different tokens are incomparable and refused (:func:`check_comparable`). On disk
(``<cache>/fingerprints/<key>/``, see :mod:`jaxind.io.disk_cache`) a fingerprint is ``x.npy``, ``sq.npy``,
``tokens.npy`` and ``meta.json`` (written last, with each array's checksum), published by one rename;
its key is a hash of the model's content key, the token ids' hash, the layers and the format version.
:func:`load` verifies the checksums (once per process) and the token ids' hash; :func:`ensure`
discards an entry that does not verify, with one warning, and computes it again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxind import testhooks
from jaxind.errors import JaxindError
from jaxind.io import disk_cache
from jaxind.io import token_source as data_lib
from jaxind.models import model as model_lib
from jaxind.models.config import ModelConfig
from jaxind.stats import grams
from jaxind.types import LayerPair, Params

__all__ = [
    "CrossGrams",
    "Fingerprint",
    "IncomparableError",
    "VERSION",
    "check_comparable",
    "compute",
    "compute_into",
    "ensure",
    "fingerprint_key",
    "load",
    "pass_stats",
    "path_for",
    "token_hash",
]

VERSION = 1
_FILES = ("x.npy", "sq.npy", "tokens.npy")


class IncomparableError(JaxindError):
    """Two fingerprints (or a fingerprint and a token set) made on different tokens."""


def token_hash(tokens: Any) -> str:
    """A hash (32 hex digits) of token ids ``(N, T)``: their shape and int32 values."""
    array = np.ascontiguousarray(np.asarray(tokens, np.int32))
    digest = hashlib.sha256(json.dumps(list(array.shape)).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:32]


def fingerprint_key(model_key: str, tokens_hash: str, layers: Sequence[int]) -> str:
    """The cache key of a model's fingerprint on a token set and layers."""
    return disk_cache.key_of(v=VERSION, model=model_key, tokens=tokens_hash, layers=[int(l) for l in layers])


@dataclasses.dataclass(frozen=True, eq=False)
class Fingerprint:
    """One model's fingerprint on a token set.

    Attributes:
      key: the cache key (:func:`fingerprint_key`).
      model_key: the model's content key (:mod:`jaxind.io.disk_cache`).
      config: the model's config.
      layers: the collected layers, sorted.
      tokens: ``(N, T)`` int32 reference token ids; ``token_hash`` their hash.
      x: ``(n_layers, N * T, d)`` float32 normed MLP inputs (memory-mapped when read from disk).
      sq: ``(2, n_layers, h)`` float32 per unit sums of squared gate (index 0) and up (1) outputs.
      meta: what ``meta.json`` records (name, source, data, seconds, ...).
    """

    key: str
    model_key: str
    config: ModelConfig
    layers: tuple[int, ...]
    tokens: np.ndarray
    token_hash: str
    x: np.ndarray
    sq: np.ndarray
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def count(self) -> int:
        """Tokens counted (``N * T``)."""
        return int(self.x.shape[1])

    def position(self, layer: int) -> int:
        """Index of ``layer`` in ``layers``.

        Raises:
          JaxindError: the layer was not collected.
        """
        if layer not in self.layers:
            raise JaxindError(
                f"the fingerprint of {self.meta.get('name', self.model_key)} has layers {list(self.layers)}, "
                f"not layer {layer}: fingerprint the layers you test"
            )
        return self.layers.index(layer)

    def describe(self) -> str:
        """The tokens, for error messages."""
        data = self.meta.get("data") or {}
        what = f"{data.get('kind', '?')} data seed {data.get('seed', '?')}" if data else "tokens"
        return f"{self.tokens.shape[0]}x{self.tokens.shape[1]} {what} (hash {self.token_hash[:12]})"


def check_comparable(a: Fingerprint, b: Fingerprint, names: tuple[str, str] = ("A", "B")) -> None:
    """Refuses two fingerprints made on different reference tokens.

    Raises:
      IncomparableError: naming both token sets and the fix.
    """
    if a.token_hash != b.token_hash:
        raise IncomparableError(
            f"the fingerprints of {names[0]} and {names[1]} were made on different tokens ({a.describe()} vs "
            f"{b.describe()}), so their Grams would compare different inputs: they are incomparable; fingerprint "
            "both on the same tokens (same data settings, seed and token ids)"
        )


@functools.partial(jax.jit, static_argnames=("cfg", "layers"))
def _step(params: Params, tokens: jax.Array, mask: jax.Array, *, cfg: ModelConfig, layers: tuple[int, ...]):
    """One batch: ``x (n_layers, B*T, d)`` and the masked sums of squared gate/up outputs ``(2, n_layers, h)``."""
    _, acts = model_lib.forward(params, cfg, tokens, collect=layers, return_logits=False, collect_inputs=True)
    weight = mask.reshape(-1, 1).astype(jnp.float32)

    def rows(name: str) -> jax.Array:
        return jnp.stack([acts[l][name].reshape(-1, acts[l][name].shape[-1]).astype(jnp.float32) for l in layers])

    up = jnp.sum(jnp.square(rows("up")) * weight, axis=1)
    gate = jnp.sum(jnp.square(rows("gate")) * weight, axis=1) if cfg.glu else jnp.zeros_like(up)
    return rows("x"), jnp.stack([gate, up])


def compute_into(
    x_out: np.ndarray, params: Params, cfg: ModelConfig, tokens: np.ndarray, layers: tuple[int, ...], batch_size: int
) -> np.ndarray:
    """Runs the model over ``tokens (N, T)`` once, writing the normed MLP inputs of ``layers`` into
    ``x_out (n_layers, N*T, d)`` (e.g. a memory map on disk); returns ``sq (2, n_layers, h)``."""
    n, t = tokens.shape
    sq = np.zeros((2, len(layers), cfg.d_ff), np.float64)
    row = 0
    for chunk, mask in data_lib.batches(tokens, batch_size):
        real = int(mask[:, 0].sum())
        x, sums = _step(params, jnp.asarray(chunk, jnp.int32), jnp.asarray(mask), cfg=cfg, layers=layers)
        x_out[:, row : row + real * t] = np.asarray(x)[:, : real * t]
        sq += np.asarray(sums, np.float64)
        row += real * t
    assert row == n * t
    return sq.astype(np.float32)


def compute(params: Params, cfg: ModelConfig, tokens: Any, layers: Sequence[int], batch_size: int = 8, **meta: Any):
    """A fingerprint in memory (not cached): the model ``(params, cfg)`` on ``tokens (N, T)``."""
    if cfg.moe:
        raise JaxindError(f"{cfg.family} is a mixture of experts: fingerprints hold dense MLP statistics only")
    tokens = np.asarray(tokens, np.int32)
    chosen = tuple(sorted({int(l) for l in layers}))
    x = np.zeros((len(chosen), tokens.size, cfg.d_model), np.float32)
    sq = compute_into(x, params, cfg, tokens, chosen, batch_size)
    model_key = str(meta.pop("model_key", "memory"))
    th = token_hash(tokens)
    key = fingerprint_key(model_key, th, chosen)
    return Fingerprint(key, model_key, cfg, chosen, tokens, th, x, sq, meta)


def path_for(cache_root: str | None, key: str) -> str:
    """Where the fingerprint ``key`` lives in the cache."""
    return os.path.join(disk_cache.root(cache_root), "fingerprints", key)


def load(folder: str) -> Fingerprint:
    """Reads a published fingerprint (arrays memory-mapped), every array's checksum verified.

    Raises:
      store.DamagedEntry: missing, malformed or damaged (another format version, a missing, mis-shaped
        or changed file, bad JSON).
    """
    meta = disk_cache.read_json_entry(os.path.join(folder, "meta.json"))
    try:
        if meta.get("version") != VERSION:
            raise disk_cache.DamagedEntry(f"fingerprint {folder} has format {meta.get('version')}, not {VERSION}")
        sums = meta.get("checksums") or {}
        x, sq, tokens = (disk_cache.verify_array(os.path.join(folder, name), sums.get(name)) for name in _FILES)
        cfg = ModelConfig.from_dict(meta["config"])
        layers = tuple(int(l) for l in meta["layers"])
        fp = Fingerprint(
            meta["key"], meta["model_key"], cfg, layers, np.asarray(tokens), meta["token_hash"], x, sq, meta["info"]
        )
    except disk_cache.DamagedEntry as e:
        raise disk_cache.DamagedEntry(f"fingerprint {folder}: {e}") from None
    except (TypeError, KeyError, ValueError, AttributeError, JaxindError) as e:
        raise disk_cache.DamagedEntry(
            f"fingerprint {folder}: meta.json is malformed ({type(e).__name__}: {e})"
        ) from None
    if x.shape != (len(layers), tokens.size, cfg.d_model) or sq.shape != (2, len(layers), cfg.d_ff):
        raise disk_cache.DamagedEntry(f"fingerprint {folder} has arrays of the wrong shape")
    if token_hash(fp.tokens) != fp.token_hash or os.path.basename(folder) != fp.key:
        raise disk_cache.DamagedEntry(f"fingerprint {folder} records other tokens or another key than it holds")
    return fp


def _write(tmp: str, params: Params, cfg: ModelConfig, tokens: np.ndarray, layers: tuple[int, ...], **kw: Any):
    """Computes the fingerprint into the unpublished directory ``tmp`` (``meta.json`` last)."""
    start = time.perf_counter()
    x_out = np.lib.format.open_memmap(
        os.path.join(tmp, "x.npy"), mode="w+", dtype=np.float32, shape=(len(layers), tokens.size, cfg.d_model)
    )
    sq = compute_into(x_out, params, cfg, tokens, layers, kw.pop("batch_size"))
    x_out.flush()
    del x_out
    np.save(os.path.join(tmp, "sq.npy"), sq)
    np.save(os.path.join(tmp, "tokens.npy"), tokens)
    testhooks.stop_at(f"fingerprint_writing:{kw['info'].get('name', '')}")
    sums = {name: disk_cache.checksum(np.load(os.path.join(tmp, name), mmap_mode="r")) for name in _FILES}
    meta = {**kw, "version": VERSION, "config": json.loads(cfg.to_json()), "layers": list(layers), "checksums": sums}
    meta["info"] = {**meta["info"], "seconds": time.perf_counter() - start}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def ensure(
    cache_root: str | None,
    model_key: str,
    cfg: ModelConfig,
    get_params: Callable[[], Params],
    tokens: Any,
    layers: Sequence[int],
    *,
    batch_size: int = 8,
    **info: Any,
) -> tuple[Fingerprint, bool]:
    """The model's fingerprint on ``tokens``, from the cache, or computed (``get_params()`` is called
    only then), written atomically and cached. Returns ``(fingerprint, computed)``.

    Concurrent callers for the same key (workers, shards) compute it once: the others wait for the
    lock, then read it. ``info`` (name, source, data settings) is recorded in ``meta.json``.
    """
    tokens = np.asarray(tokens, np.int32)
    chosen = tuple(sorted({int(l) for l in layers}))
    th = token_hash(tokens)
    key = fingerprint_key(model_key, th, chosen)
    final = path_for(cache_root, key)
    with disk_cache.lock(final):
        if os.path.lexists(final):
            try:
                return load(final), False
            except disk_cache.DamagedEntry as e:  # another format or damaged: recompute
                disk_cache.discard(final, str(e))
        disk_cache.clean_stale(final)
        tmp = disk_cache.make_temp(final)
        try:
            _write(
                tmp,
                get_params(),
                cfg,
                tokens,
                chosen,
                key=key,
                model_key=model_key,
                token_hash=th,
                batch_size=batch_size,
                info=info,
            )
            disk_cache.publish(tmp, final)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return load(final), True


# --- pair statistics from two fingerprints ---------------------------------------------------------


@jax.jit
def _cross(x_a: jax.Array, x_b: jax.Array) -> jax.Array:
    return jnp.matmul(x_a.T, x_b, precision=jax.lax.Precision.HIGHEST)


class CrossGrams:
    """The ``(P, d_A, d_B)`` input cross-Grams of ``P`` layer pairs, each computed from two
    fingerprints by one matmul when first indexed (the last one is kept: MATCH reads each pair
    twice, for gate and up). Indexed like ``PassStats.cross`` (:class:`jaxind.stats.grams.PassStats`) for
    explicit pairs."""

    def __init__(self, x_a: np.ndarray, x_b: np.ndarray, positions: Sequence[tuple[int, int]]):
        self.x_a, self.x_b, self.positions = x_a, x_b, tuple(positions)
        self._last: tuple[int, jax.Array] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.positions), self.x_a.shape[-1], self.x_b.shape[-1])

    def __getitem__(self, pair: int) -> jax.Array:
        if not isinstance(pair, (int, np.integer)):
            raise TypeError("CrossGrams holds explicit layer pairs: index it with the pair's position")
        if self._last is None or self._last[0] != pair:
            ia, ib = self.positions[pair]
            self._last = (int(pair), _cross(jnp.asarray(self.x_a[ia]), jnp.asarray(self.x_b[ib])))
        return self._last[1]


def pass_stats(
    fp_a: Fingerprint, params_a: Params, fp_b: Fingerprint, params_b: Params, pairs: Sequence[LayerPair]
) -> grams.PassStats:
    """The one-pass statistics of ``pairs`` (:class:`jaxind.stats.grams.PassStats`) from two fingerprints
    on the same tokens, without running either model; the gate/up kernels come from the param trees.

    Raises:
      IncomparableError: the fingerprints were made on different tokens.
      JaxindError: a layer of ``pairs`` is not in its fingerprint.
    """
    check_comparable(fp_a, fp_b, (str(fp_a.meta.get("name", "A")), str(fp_b.meta.get("name", "B"))))
    layers_a = tuple(sorted({a for a, _ in pairs}))
    layers_b = tuple(sorted({b for _, b in pairs}))
    pos_a = [fp_a.position(l) for l in layers_a]
    pos_b = [fp_b.position(l) for l in layers_b]
    return grams.PassStats(
        cross=CrossGrams(fp_a.x, fp_b.x, [(fp_a.position(a), fp_b.position(b)) for a, b in pairs]),
        sq_a={"gate": np.asarray(fp_a.sq[0][pos_a]), "up": np.asarray(fp_a.sq[1][pos_a])},
        sq_b={"gate": np.asarray(fp_b.sq[0][pos_b]), "up": np.asarray(fp_b.sq[1][pos_b])},
        count=float(fp_a.count),
        weights_a={k: params_a["layers"][k] for k in ("gate", "up")},
        weights_b={k: params_b["layers"][k] for k in ("gate", "up")},
        layers_a=layers_a,
        layers_b=layers_b,
        pair_index=tuple((layers_a.index(a), layers_b.index(b)) for a, b in pairs),
    )
