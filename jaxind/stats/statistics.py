"""PERMTEST statistics: the protocol :func:`jaxind.stats.permtest.permtest` runs, and a registry of named ones.

A PERMTEST statistic is any function of two param trees, ``stat(params_a, params_b) -> scalar``, oriented so that
larger = more similar. Under H0 ``(A, p(B))`` is distributed as ``(A, B)`` for a uniform group element ``p``, so
``(1 + #{t : stat(A, p_t(B)) >= stat(A, B)}) / (T + 1)`` is an exact p-value whatever the function
(docs/DESIGN.md §5.2). :func:`~jaxind.stats.permtest.permtest` takes a statistic in one of three forms:

- a plain function ``fn(params_a, params_b_permuted) -> scalar`` (traceable with JAX): each draw materialises
  ``p_t(B)`` with :func:`jaxind.models.symmetry.apply_permutation` and calls ``fn``;
- a :class:`PermStatistic` (the fast path): ``prepare(params_a, params_b, cfg, tokens)`` computes per-pair
  constants (a pytree of arrays) once, and ``draw(consts, perm, cfg)`` is a cheap function of them and one group
  element :class:`jaxind.models.symmetry.Perm` (``perm.resid (d,)``, ``perm.mlp (L, h)``) that never builds ``p(B)``;
- a registered name (:func:`register_statistic`; :func:`registered_statistics` lists them): the built-in ``"l2"``
  and ``"mc"`` (:mod:`jaxind.stats.permtest`) are two :class:`PermStatistic` of this protocol.

Whatever the form, the draws are ``vmap``ped, chunked to the memory budget and split over the ``perm`` axis of
the draw mesh, and draw ``t`` is ``draw_permutations(fold_in(key, t), cfg)``, so a statistic's p-value does not
depend on the devices. A draw must return one floating scalar (``"l2"``: per-layer values and a total);
anything else is a :class:`~jaxind.errors.JaxindError` before any draw runs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxind.errors import JaxindError, brief
from jaxind.models.config import ModelConfig
from jaxind.models.symmetry import Perm, apply_permutation, identity
from jaxind.types import Params

__all__ = [
    "PermStatistic",
    "check_draw",
    "from_function",
    "register_statistic",
    "registered_statistics",
    "resolve_statistic",
]

BUILTIN = ("l2", "mc")


def _pair(params_a: Params, params_b: Params, cfg: ModelConfig, tokens: Any) -> tuple[Params, Params]:
    """The default constants: the two trees themselves."""
    return params_a, params_b


@dataclasses.dataclass(frozen=True, kw_only=True)
class PermStatistic:
    """A PERMTEST statistic (larger = more similar), evaluated on many group elements at once.

    Attributes:
      name: the statistic's name (the result's ``test``). Two statistics with the same functions are equal
        whatever their names (they share compiled draws).
      draw: ``(consts, perm, cfg) -> stat`` for one group element (traceable; ``vmap``ped over draws): a float
        scalar, or with ``per_layer`` a pair ``(stat_layers (L,), stat_total ())``.
      prepare: ``(params_a, params_b, cfg, tokens) -> consts``, a pytree of arrays computed once per test and
        replicated on the draw devices (default: the two trees). Runs as written: jit it if it is heavy.
      direct: ``(params_a, params_b, cfg, tokens) -> stat`` computed from two trees (traceable): the observed
        statistic and :func:`jaxind.stats.permtest.permtest_loop`'s reference (default: ``draw(prepare(A, B), id)``).
      observed: ``(params_a, params_b, cfg, tokens) -> stat`` on the host, overriding ``direct`` for the
        observed statistic (``"l2"``: from the differences, no cancellation).
      per_layer: draws return per-layer statistics too (one p-value per layer).
      combine_layers: ``(stats (..., K)) -> (...)``, the overall statistic of a layer selection's K per-layer
        statistics (``"l2"``: minus the distance over them); None: the statistic takes no layer selection.
      needs_tokens: the statistic reads ``tokens`` (``(N, T)`` ints, ``T >= 2``).
      bytes_per_draw: ``(cfg, tokens) -> bytes`` of working memory per draw in flight, for the chunk size
        (default: the bytes of the constants).
      cpu_chunk: at most this many draws per CPU device per step (None: what the budget allows).
      place: ``(params_a, params_b, cfg, tokens, mesh) -> consts`` on the draw mesh (default: ``prepare``,
        replicated); with ``sharded``, the hooks ``"l2"`` uses to split its constants over the mesh's
        ``layers`` axis.
      sharded: ``(cfg, mesh) -> (local, consts_specs)``: the per-device draw function for ``shard_map``
        (``(consts, key_data, idx (C,)) -> (stat_layers (C, L'), stat_total (C,))``) and its constants'
        partition specs; None: built from ``draw`` (constants replicated, no ``layers`` split).
    """

    name: str = dataclasses.field(compare=False)
    draw: Callable[[Any, Perm, ModelConfig], Any]
    prepare: Callable[[Params, Params, ModelConfig, Any], Any] = _pair
    direct: Callable[[Params, Params, ModelConfig, Any], Any] | None = None
    observed: Callable[[Params, Params, ModelConfig, Any], Any] | None = None
    per_layer: bool = False
    combine_layers: Callable[[Any], Any] | None = None
    needs_tokens: bool = False
    bytes_per_draw: Callable[[ModelConfig, Any], int] | None = None
    cpu_chunk: int | None = None
    place: Callable[..., Any] | None = None
    sharded: Callable[[ModelConfig, Any], tuple[Callable, Any]] | None = None

    def direct_or_draw(self, params_a: Params, params_b: Params, cfg: ModelConfig, tokens: Any) -> Any:
        """The statistic of two trees: ``direct``, else the draw of the identity on their constants."""
        if self.direct is not None:
            return self.direct(params_a, params_b, cfg, tokens)
        return self.draw(self.prepare(params_a, params_b, cfg, tokens), identity(cfg), cfg)


@functools.lru_cache(maxsize=128)
def from_function(fn: Callable[[Params, Params], Any], name: str | None = None) -> PermStatistic:
    """The :class:`PermStatistic` of a plain ``fn(params_a, params_b) -> scalar``: each draw applies the group
    element to B (:func:`jaxind.models.symmetry.apply_permutation`) and calls ``fn`` (cached per function, so repeated
    tests reuse the compiled draws)."""

    def draw(consts: tuple[Params, Params], perm: Perm, cfg: ModelConfig) -> Any:
        return fn(consts[0], apply_permutation(consts[1], cfg, perm))

    def bytes_per_draw(cfg: ModelConfig, tokens: Any) -> int:
        return 3 * cfg.num_params() * 4  # a permuted copy of B and the function's intermediates, float32

    return PermStatistic(
        name=name or str(getattr(fn, "__name__", "custom")),
        draw=draw,
        direct=lambda a, b, cfg, tokens: fn(a, b),
        bytes_per_draw=bytes_per_draw,
    )


_REGISTRY: dict[str, PermStatistic] = {}


def _load_builtins() -> None:
    importlib.import_module("jaxind.stats.permtest")  # registers "l2" and "mc"


def register_statistic(
    name: str, statistic: Callable[[Params, Params], Any] | PermStatistic, *, overwrite: bool = False
) -> PermStatistic:
    """Registers ``statistic`` (a plain function or a :class:`PermStatistic`) under ``name``, so that
    ``permtest(..., statistic=name)`` runs it.

    Raises:
      JaxindError: ``name`` is taken (pass ``overwrite=True`` to replace a statistic of your own; the built-in
        ones cannot be replaced), or ``statistic`` is neither form.
    """
    if not isinstance(name, str) or not name:
        raise JaxindError(f"a PERMTEST statistic's name must be a non-empty string, got {name!r}")
    if name in BUILTIN and name in _REGISTRY:
        raise JaxindError(f"{name!r} is a built-in PERMTEST statistic; register yours under another name")
    if name in _REGISTRY and not overwrite:
        raise JaxindError(f"PERMTEST statistic {name!r} is already registered; pass overwrite=True to replace it")
    if isinstance(statistic, PermStatistic):
        stat = statistic if statistic.name == name else dataclasses.replace(statistic, name=name)
    elif callable(statistic):
        stat = dataclasses.replace(from_function(statistic), name=name)  # the same draws as the function itself
    else:
        raise JaxindError(
            f"a PERMTEST statistic is a function (params_a, params_b) -> scalar or a PermStatistic, got {statistic!r}"
        )
    _REGISTRY[name] = stat
    return stat


def registered_statistics() -> tuple[str, ...]:
    """The names ``permtest(statistic=...)`` accepts: the built-in ``"l2"``, ``"mc"``, then those registered."""
    _load_builtins()
    return tuple(_REGISTRY)


def resolve_statistic(statistic: str | Callable[[Params, Params], Any] | PermStatistic) -> PermStatistic:
    """The :class:`PermStatistic` for a registered name, a plain function or a :class:`PermStatistic`.

    Raises:
      JaxindError: an unknown name (the message lists the registered ones) or another kind of value.
    """
    if isinstance(statistic, PermStatistic):
        return statistic
    if isinstance(statistic, str):
        _load_builtins()
        if statistic not in _REGISTRY:
            raise JaxindError(
                f"unknown PERMTEST statistic {statistic!r}; choose from {registered_statistics()}, pass a function "
                "(params_a, params_b) -> scalar or a jaxind.stats.statistics.PermStatistic, or register_statistic() one"
            )
        return _REGISTRY[statistic]
    if callable(statistic):
        return from_function(statistic)
    raise JaxindError(
        f"statistic= takes a name from {registered_statistics()}, a function (params_a, params_b) -> scalar or a "
        f"jaxind.stats.statistics.PermStatistic, got {type(statistic).__name__}"
    )


def _describe(out: Any) -> str:
    return ", ".join(f"{x.dtype}{list(x.shape)}" for x in jax.tree.leaves(out)) or repr(out)


def _is_float_scalar(x: Any, shape: tuple[int, ...] = ()) -> bool:
    return hasattr(x, "shape") and tuple(x.shape) == shape and jnp.issubdtype(x.dtype, jnp.floating)


def check_draw(stat: PermStatistic, consts: Any, cfg: ModelConfig) -> None:
    """Traces one draw of ``stat`` (no compute) and checks what it returns: one floating scalar, or with
    ``per_layer`` ``(stat_layers (L,), stat_total ())``.

    Raises:
      JaxindError: the draw fails to trace, or returns another shape or dtype.
    """
    try:
        out = jax.eval_shape(lambda c, p: stat.draw(c, p, cfg), consts, identity(cfg))
    except JaxindError:
        raise
    except Exception as e:  # the user's function: one line, not JAX's traceback
        raise JaxindError(f"PERMTEST statistic {stat.name!r} fails on one draw: {brief(e)}") from e
    if stat.per_layer:
        ok = isinstance(out, tuple) and len(out) == 2 and _is_float_scalar(out[1])
        ok = ok and hasattr(out[0], "shape") and out[0].ndim == 1 and jnp.issubdtype(out[0].dtype, jnp.floating)
        want = "(stat_layers (L,), stat_total ()) floats"
    else:
        ok, want = _is_float_scalar(out), "one float scalar"
    if not ok:
        raise JaxindError(
            f"PERMTEST statistic {stat.name!r} must return {want} per draw (larger = more similar), "
            f"got {_describe(out)}; reduce it to a scalar, e.g. with jnp.sum, and cast to float32"
        )
