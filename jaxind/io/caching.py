"""What the command lines keep between runs: the jaxind cache (converted models, fingerprints; see
:mod:`jaxind.io.disk_cache`) and JAX's persistent compilation cache, and the two flags that move them.

JAX's persistent compilation cache is on by default for the CLIs (``python -m jaxind.main``,
``python -m jaxind.sweep``): a second run with the same shapes loads its compiled kernels instead
of compiling them again. It lives in ``<cache>/jax``; ``--compilation_cache=DIR`` (or
``$JAXIND_COMPILATION_CACHE``) moves it, ``off`` disables it. Every compilation is cached (no
minimum compile time: many small kernels add up), the directory is bounded (LRU eviction at
4 GiB, which also makes JAX lock the directory, so concurrent processes share it safely).

Library users get it too (:func:`enable_for_library`): the first :func:`jaxind.from_params`,
:func:`jaxind.load_model`, ``TESTS[name](...)``, :func:`jaxind.run_pair` or array-level kernel call of a
process turns it on in the same directory (``$JAXIND_COMPILATION_CACHE``, else ``$JAXIND_CACHE/jax``,
else ``~/.cache/jaxind/jax``); ``JAXIND_COMPILATION_CACHE=off`` keeps it off, and a directory the
program set itself (``jax_compilation_cache_dir``) is left as it is.

Imports only absl at module level: the CLIs parse flags before JAX loads.
"""

from __future__ import annotations

import os

from absl import flags

__all__ = [
    "COMPILATION_CACHE_ENV",
    "apply_cache_dir",
    "compilation_cache_dir",
    "enable_compilation_cache",
    "enable_for_library",
    "setup_from_flags",
]

COMPILATION_CACHE_ENV = "JAXIND_COMPILATION_CACHE"
_OFF = ("off", "none", "no", "0", "false", "disable", "disabled")
_MAX_BYTES = 4 * 2**30

flags.DEFINE_string(
    "cache_dir",
    None,
    "jaxind cache: converted models, fingerprints, compiled kernels (default $JAXIND_CACHE or ~/.cache/jaxind).",
)
flags.DEFINE_string(
    "compilation_cache",
    None,
    f"JAX persistent compilation cache directory, or 'off' (default ${COMPILATION_CACHE_ENV} or <cache_dir>/jax).",
)


def apply_cache_dir(cache_dir: str | None) -> None:
    """Points the jaxind cache at ``cache_dir`` for this process and its children (``$JAXIND_CACHE``)."""
    if cache_dir:
        os.environ["JAXIND_CACHE"] = os.path.abspath(os.path.expanduser(cache_dir))


def compilation_cache_dir(value: str | None = None) -> str | None:
    """The compilation cache directory from a flag value, ``$JAXIND_COMPILATION_CACHE`` or the
    jaxind cache (``<cache>/jax``); None when disabled."""
    from jaxind.io import assets

    chosen = value or os.environ.get(COMPILATION_CACHE_ENV) or os.path.join(assets.cache_dir(), "jax")
    return None if chosen.strip().lower() in _OFF else os.path.abspath(os.path.expanduser(chosen))


_library: list[str | None] = []  # the process's choice (a directory, None: off), once made


def enable_compilation_cache(directory: str | None) -> str | None:
    """Turns JAX's persistent compilation cache on in ``directory`` (None: leaves it off); returns it.
    A directory that cannot be created leaves the cache off (with a warning), never stops a run. Either way the
    process's choice is made: :func:`enable_for_library` changes nothing after it."""
    _library[:] = [None]
    if directory is None:
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        from absl import logging

        logging.warning("compilation cache %s not usable (%s); compiling without it", directory, e.strerror)
        return None
    _library[:] = [directory]
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", _MAX_BYTES)
    return directory


def enable_for_library() -> str | None:
    """Turns the compilation cache on for a library user, once per process (module doc); returns its directory
    (None: off). Compilations made earlier in the process did not use it; later ones do."""
    if _library:
        return _library[0]
    import jax

    chosen = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    if chosen:
        _library[:] = [chosen]
        return chosen
    chosen = enable_compilation_cache(compilation_cache_dir())
    if chosen is not None:
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()  # JAX decides once per process whether to use it: again, with the directory
    return chosen


def setup_from_flags() -> str | None:
    """Applies ``--cache_dir`` and ``--compilation_cache``; returns the compilation cache directory."""
    apply_cache_dir(flags.FLAGS.cache_dir)
    return enable_compilation_cache(compilation_cache_dir(flags.FLAGS.compilation_cache))
