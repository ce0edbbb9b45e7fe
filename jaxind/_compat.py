"""Old import paths, kept working for one release with a ``DeprecationWarning``.

This release moved jaxind's flat modules into folders (docs/DESIGN.md §2): ``jaxind.permtest`` is now
``jaxind.stats.permtest``, and so on. :data:`MOVED` is the one table of old -> new module paths; a
finder on ``sys.meta_path`` (installed by ``jaxind/__init__.py``) answers an import of an old path
with the module at its new path, the very same module object, so a test that monkeypatches either
name patches both. ``jaxind.main`` and ``jaxind.sweep`` stay real files (``python -m`` runs them);
names imported from them are forwarded by :func:`forward`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED: dict[str, str] = {
    "jaxind.config": "jaxind.models.config",
    "jaxind.paramspec": "jaxind.models.paramspec",
    "jaxind.model": "jaxind.models.model",
    "jaxind.moe": "jaxind.models.moe",
    "jaxind.symmetry": "jaxind.models.symmetry",
    "jaxind.train": "jaxind.models.train",
    "jaxind.layers": "jaxind.models.layer_selection",
    "jaxind.sharding": "jaxind.parallel.sharding",
    "jaxind.cluster": "jaxind.parallel.cluster",
    "jaxind.rendezvous": "jaxind.parallel.rendezvous",
    "jaxind.tokenizer": "jaxind.io.tokenizer",
    "jaxind.data": "jaxind.io.token_source",
    "jaxind.assets": "jaxind.io.assets",
    "jaxind.store": "jaxind.io.disk_cache",
    "jaxind.caching": "jaxind.io.caching",
    "jaxind.destinations": "jaxind.io.destinations",
    "jaxind.loading": "jaxind.io.loaded_model",
    "jaxind.pvalues": "jaxind.stats.pvalues",
    "jaxind.assignment": "jaxind.stats.assignment",
    "jaxind.grams": "jaxind.stats.grams",
    "jaxind.permtest": "jaxind.stats.permtest",
    "jaxind.constrained": "jaxind.stats.constrained",
    "jaxind.match": "jaxind.stats.match",
    "jaxind.generalized": "jaxind.stats.generalized",
    "jaxind.localized": "jaxind.stats.localized",
    "jaxind.divergence": "jaxind.stats.divergence",
    "jaxind.experts": "jaxind.stats.experts",
    "jaxind.fingerprint": "jaxind.stats.fingerprint",
    "jaxind.results": "jaxind.stats.results",
    "jaxind.catalog": "jaxind.pair.catalog",
    "jaxind.registry": "jaxind.pair.registry",
    "jaxind.inputs": "jaxind.pair.token_data",
    "jaxind.runner": "jaxind.pair.runner",
    "jaxind.report": "jaxind.pair.report",
    "jaxind.modelstore": "jaxind.many.modelstore",
    "jaxind.sweep_config": "jaxind.many.sweep_config",
    "jaxind.sweep_summary": "jaxind.many.sweep_summary",
    "jaxind.scan": "jaxind.many.scan",
    "jaxind.provenance": "jaxind.many.provenance",
    "jaxind.demo": "jaxind.cli.demo",
    "jaxind.cli_utils": "jaxind.cli.cli_utils",
}

# Names that left a module when it was split: (old module, name) -> the module that holds it now.
MOVED_NAMES: dict[tuple[str, str], str] = {
    ("jaxind.models.config", "from_hf_config"): "jaxind.io.hf_config",
    ("jaxind.models.config", "parse_hf_config"): "jaxind.io.hf_config",
}

# What ``python -m jaxind.sweep`` defines (the rest of the old ``jaxind.sweep`` is ``jaxind.many.sweep``).
SWEEP_CLI_NAMES = frozenset({"define_flags", "preflight", "run", "main", "entry_point", "FLAGS"})


def _warn(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} moved to {new}; the old name goes away in the next release", DeprecationWarning, stacklevel)


def forward(old_module: str, new_module: str, name: str, stacklevel: int = 4) -> Any:
    """``getattr(new_module, name)`` for a name looked up on ``old_module``, with a ``DeprecationWarning``."""
    if name.startswith("__"):
        raise AttributeError(name)
    value = getattr(importlib.import_module(new_module), name)
    _warn(f"{old_module}.{name}", f"{new_module}.{name}", stacklevel)
    return value


def moved_name(module: str, name: str) -> Any:
    """A name that left ``module`` when it was split (:data:`MOVED_NAMES`), else ``AttributeError``."""
    if (module, name) not in MOVED_NAMES:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return forward(module, MOVED_NAMES[module, name], name, stacklevel=5)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(spec.name, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its new name


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old module paths of :data:`MOVED`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new)) if new else None


def install() -> None:
    """Puts the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())  # before the path finder: jaxind/data/ is a folder too
