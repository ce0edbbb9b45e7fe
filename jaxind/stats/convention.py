"""The one calling convention of the public kernels, and its checks (docs/DESIGN.md §5.3).

Every array-level kernel that returns a :class:`jaxind.stats.results.TestResult` is called as::

    kernel(params_a, cfg_a, params_b, cfg_b, [data,] *, key, layers=None, **options)

(``data``, the token batches, only for the kernels that run the models). ``layers`` is the one name of a layer
selection (:mod:`jaxind.models.layer_selection`: pairs where the kernel compares layer pairs). The helpers here
keep the call forms of earlier releases working for one release, each with a ``DeprecationWarning`` naming
the new form, and turn a ``key`` that is not a PRNG key into a :class:`jaxind.errors.JaxindError`.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxind.errors import JaxindError
from jaxind.models.config import ModelConfig

__all__ = [
    "check_key",
    "check_options",
    "is_seed",
    "key_and_layers",
    "legacy_positional",
    "one_config_pair",
    "option_names",
    "renamed",
]


def _deprecated(message: str) -> None:
    """A ``DeprecationWarning`` pointing at the first caller outside ``jaxind/stats`` (the user's line, not a
    kernel's or ``@timed``'s)."""
    here, frame, level = os.path.dirname(os.path.abspath(__file__)), sys._getframe(1), 2
    while frame.f_back is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DeprecationWarning, stacklevel=level)


def is_seed(value: Any) -> bool:
    """``value`` is an integer seed (a Python or numpy integer, not a bool)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"an array of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r:.40}"


def check_key(key: Any, where: str) -> jax.Array:
    """``key`` if it is a PRNG key: a typed key of shape ``()`` (``jax.random.key(seed)``) or a raw ``uint32[2]``
    one (``jax.random.PRNGKey(seed)``). Every kernel's first check, so it also turns the compilation cache on for
    a library user (:func:`jaxind.io.caching.enable_for_library`; once per process, unless the program chose).

    Raises:
      JaxindError: anything else (None, an int, a float array, a batch of keys), naming ``where``.
    """
    from jaxind.io import caching  # defines the CLIs' cache flags: imported when first needed

    caching.enable_for_library()
    if isinstance(key, jax.Array | np.ndarray):
        typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        if (typed and key.shape == ()) or (not typed and key.dtype == np.uint32 and key.shape == (2,)):
            return key if isinstance(key, jax.Array) else jax.numpy.asarray(key)
    raise JaxindError(
        f"{where}: key must be one PRNG key, e.g. key=jax.random.key(0); got {_describe(key)}"
        + (" (the registry's TESTS[name] also takes an int seed)" if is_seed(key) else "")
    )


def option_names(fn: Callable[..., Any], exclude: Iterable[str]) -> tuple[str, ...]:
    """The keyword options ``fn`` takes (its parameters with a default, after the positional ones), less ``exclude``."""
    params = inspect.signature(fn).parameters.values()
    skip = set(exclude)
    return tuple(
        p.name
        for p in params
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty and p.name not in skip
    )


def check_options(where: str, options: Mapping[str, Any], valid: Sequence[str]) -> None:
    """Raises :class:`JaxindError` naming ``where`` and the valid options when ``options`` has others."""
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(sorted(valid)) or "none"
        raise JaxindError(f"{where} takes no option {', '.join(map(repr, unknown))}; its options are: {listed}")


def legacy_positional(
    where: str, new_form: str, legacy: tuple[Any, ...], names: Sequence[str], given: dict[str, Any]
) -> dict[str, Any]:
    """Binds arguments passed positionally in an old call form (``legacy``) to ``names`` in order, over ``given``
    (the keyword values, None where not given), with a ``DeprecationWarning`` naming ``new_form``.

    Raises:
      JaxindError: more positional arguments than ``names``, or one given both ways.
    """
    if not legacy:
        return given
    if len(legacy) > len(names):
        raise JaxindError(f"{where} takes at most {len(names)} arguments after the models; call {new_form}")
    _deprecated(
        f"{where}: passing {', '.join(names[: len(legacy)])} positionally is deprecated and will be removed in "
        f"the next release; call {new_form}"
    )
    out = dict(given)
    for name, value in zip(names, legacy):
        if out.get(name) is not None:
            raise JaxindError(f"{where}: {name} given both positionally and by keyword; call {new_form}")
        out[name] = value
    return out


def renamed(where: str, old: str, new: str, old_value: Any, new_value: Any) -> Any:
    """The value of an option renamed from ``old`` to ``new``: ``old_value`` (with a ``DeprecationWarning``)
    when only it is given, else ``new_value``.

    Raises:
      JaxindError: both are given.
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise JaxindError(f"{where}: give {new}= only ({old}= is its deprecated name)")
    _deprecated(f"{where}: {old}= is deprecated and will be removed in the next release; pass {new}=")
    return old_value


def one_config_pair(
    where: str,
    new_form: str,
    args: tuple[Any, Any, Any, Any],
    legacy: tuple[Any, ...],
    key: Any,
    cfg: ModelConfig | None,
) -> tuple[Any, Any, ModelConfig, Any]:
    """``(params_a, params_b, cfg, key)`` of a kernel of two models of one config (PERMTEST) called in the form
    ``(params_a, cfg_a, params_b, cfg_b, *, key)`` (``args`` are those four slots as given) or, with a
    ``DeprecationWarning``, in the old one ``(params_a, params_b, cfg, key)`` (positionally or by keyword).

    Raises:
      JaxindError: two different configs, or arguments in neither form.
    """
    params_a, cfg_a, params_b, cfg_b = args
    if cfg is None and isinstance(cfg_a, ModelConfig) and isinstance(cfg_b, ModelConfig):
        key = legacy_positional(where, new_form, legacy, ("key",), {"key": key})["key"]
        if cfg_a != cfg_b:
            raise JaxindError(f"{where} needs two models of the same architecture and config; use csu/match")
        return params_a, params_b, cfg_a, key
    if cfg is None and isinstance(params_b, ModelConfig):  # (params_a, params_b, cfg, key)
        params_b, cfg, legacy = cfg_a, params_b, ((cfg_b,) if cfg_b is not None else ()) + legacy
    elif cfg is not None and cfg_b is None and (cfg_a is None) != (params_b is None):  # cfg=... by keyword
        params_b, legacy = (params_b if cfg_a is None else cfg_a), legacy
    else:
        raise JaxindError(f"{where}: expected {new_form}")
    if len(legacy) > 1 or (legacy and key is not None):
        raise JaxindError(f"{where}: expected {new_form}")
    _deprecated(
        f"{where}(params_a, params_b, cfg, key) is deprecated and will be removed in the next release; call {new_form}"
    )
    return params_a, params_b, cfg, (legacy[0] if legacy else key)


def key_and_layers(where: str, legacy: tuple[Any, ...], key: Any, layers: Any = None) -> tuple[jax.Array, Any]:
    """``(key, layers)`` of a kernel ``where(params_a, cfg_a, params_b, cfg_b, *, key, layers=None)``, also when
    passed positionally in the old form (a ``DeprecationWarning``); the key checked (:func:`check_key`)."""
    new_form = f"{where}(params_a, cfg_a, params_b, cfg_b, *, key, layers=None)"
    given = legacy_positional(where, new_form, legacy, ("key", "layers"), {"key": key, "layers": layers})
    return check_key(given["key"], where), given["layers"]
