"""The sweep configuration (``python -m jaxind.sweep --config=sweep.yaml``): read, checked, normalised.

Kept free of heavy imports (no JAX), so that a bad file fails in a fraction of a second with one
``error:`` line. The file (YAML; JSON is YAML too)::

    models:                        # at least 2; name + any model source jaxind.main accepts
      - {name: base, source: path/to/model}
      - {name: tuned, source: other.gguf, family: llama, parent: base}
    pairs: all                     # or {bases: [base], derived: [tuned, ...]} or [[base, tuned], ...]
    tests: [csu, match]            # registered test names (default: csu, l2, match)
    data: {kind: random, num_sequences: 8, seq_len: 128, seed: 0}   # or kind: text/jsonl with path
    alpha: 0.05                    # level of the verdicts
    correction: holm               # over pairs: holm (default) or bonferroni

More keys: ``num_perms`` (l2/mc draws, default 999), ``batch_size`` (8), ``layers`` / ``layer_pairs``
(as ``--layers`` / ``--layer_pairs``), ``dtype`` (float32 | bfloat16), ``cache_dir`` (default
``$JAXIND_CACHE``), ``generalized_steps``; per data: ``vocab`` (random ids below it; default: the
smallest vocabulary of the models) and ``tokenizer`` (the model whose tokenizer cuts text data;
default: the first model). Per model: ``family`` (checked against the loaded config) and ``parent``
(the model it derives from, if known: the ground truth the report compares against). Relative
paths are taken from the folder of the YAML file when they exist there. Names (of models, parents,
families) are at most 64 letters, digits and ``. _ + -``; YAML anchors and aliases are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import reprlib
from typing import Any, TypeGuard

from jaxind.errors import JaxindError
from jaxind.pair.catalog import ALL_TESTS

__all__ = [
    "CORRECTIONS",
    "DEFAULT_SWEEP_TESTS",
    "MAX_TOKENS",
    "ModelEntry",
    "NAME_MAX",
    "SweepConfig",
    "SweepConfigError",
    "load",
    "load_references",
    "show",
]

NAME_MAX = 64  # a pair's files are named <a>__<b>_localized.png: well under 255 bytes
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+-]{{0,{NAME_MAX - 1}}}")  # (fullmatch: no trailing newline)
MAX_TOKENS = 2**28  # reference tokens of a sweep (8,192 are typical; each model's fingerprint grows with them)
_MAX_BYTES = 4 << 20  # a sweep file of 10,000 models is about 1 MB
_TOP_KEYS = {
    "models",
    "pairs",
    "tests",
    "data",
    "alpha",
    "correction",
    "num_perms",
    "batch_size",
    "layers",
    "layer_pairs",
    "dtype",
    "cache_dir",
    "generalized_steps",
}
_MODEL_KEYS = {"name", "source", "family", "parent"}
_DATA_KEYS = {"kind", "path", "num_sequences", "seq_len", "seed", "vocab", "tokenizer"}
CORRECTIONS = ("holm", "bonferroni")
DEFAULT_SWEEP_TESTS = ("csu", "l2", "match")


class SweepConfigError(JaxindError):
    """A sweep file that cannot be run, explained in one line."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model of the sweep: ``name`` (unique), ``source``, optional ``family`` and ``parent``."""

    name: str
    source: str
    family: str | None = None
    parent: str | None = None


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A checked sweep file (see the module doc); ``pairs`` are ``(name_a, name_b)`` in run order."""

    path: str
    models: tuple[ModelEntry, ...]
    pairs: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]
    data: dict[str, Any]
    alpha: float = 0.05
    correction: str = "holm"
    num_perms: int = 999
    batch_size: int = 8
    layers: str | None = None
    layer_pairs: str | None = None
    dtype: str = "float32"
    cache_dir: str | None = None
    generalized_steps: int = 2000

    def model(self, name: str) -> ModelEntry:
        return next(m for m in self.models if m.name == name)

    def work_settings(self) -> dict[str, Any]:
        """What a finished pair's results depend on besides the two models (resume compares it)."""
        return {
            "tests": list(self.tests),
            "num_perms": self.num_perms,
            "layers": self.layers,
            "layer_pairs": self.layer_pairs,
            "dtype": self.dtype,
            "seed": self.data["seed"],
            "generalized_steps": self.generalized_steps,
        }


def _fail(where: str, problem: str) -> SweepConfigError:
    return SweepConfigError(f"{where}: {problem}")


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 40, 40


def show(value: Any) -> str:
    """A value of the file for an error message: its repr, cut to a few dozen characters."""
    return _SHORT.repr(value)


def _keys(mapping: dict[Any, Any], allowed: set[str]) -> str:
    """The keys of ``mapping`` not in ``allowed``, listed for an error message ('' if none)."""
    return ", ".join(sorted(show(k) if not isinstance(k, str) else k[:40] for k in mapping if k not in allowed))


def _integer(where: str, key: str, value: Any, low: int, high: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        limits = f">= {low}" if isinstance(value, bool) or not isinstance(value, int) or value < low else f"<= {high}"
        raise _fail(where, f"{key} must be an integer {limits}, got {show(value)}")
    return value


def _is_path(value: Any) -> TypeGuard[str]:
    """A path or model source: non-empty text that a file name can hold (no NUL, no lone surrogate)."""
    if not isinstance(value, str) or not value or "\0" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_name(value: Any) -> TypeGuard[str]:
    """A model name: letters, digits and . _ + - (first a letter or digit, no '__'), at most NAME_MAX."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None and "__" not in value


def _local(base: str, value: str) -> str:
    """``value`` relative to the YAML's folder when it exists there, else as given."""
    candidate = os.path.join(base, os.path.expanduser(value))
    return candidate if not os.path.isabs(value) and os.path.lexists(candidate) else os.path.expanduser(value)


def _models(where: str, raw: Any, base: str, least: int = 2) -> tuple[ModelEntry, ...]:
    if not isinstance(raw, list) or len(raw) < least:
        raise _fail(where, f"'models' must be a list of at least {least} entries like {{name: base, source: path}}")
    out: list[ModelEntry] = []
    for i, entry in enumerate(raw):
        at = f"models[{i}]"
        if not isinstance(entry, dict):
            raise _fail(where, f"{at} must be a mapping like {{name: base, source: path}}, got {show(entry)}")
        unknown = _keys(entry, _MODEL_KEYS)
        if unknown:
            raise _fail(where, f"{at} has unknown key(s) {unknown}: allowed {', '.join(sorted(_MODEL_KEYS))}")
        name, source = entry.get("name"), entry.get("source")
        if not _is_name(name):
            raise _fail(
                where,
                f"{at} needs a name of letters, digits and . _ + - (no '__'), at most {NAME_MAX}, got {show(name)}",
            )
        if not _is_path(source):
            raise _fail(where, f"{at} ({name}) needs a 'source' (a model path, .gguf file, hub id or smollm2)")
        family, parent = entry.get("family"), entry.get("parent")
        if family is not None and not _is_name(family):
            raise _fail(where, f"{at} ({name}) has family {show(family)}: give a family name such as llama")
        if parent is not None and not _is_name(parent):
            raise _fail(where, f"{at} ({name}) has parent {show(parent)}: give the name of another model")
        out.append(ModelEntry(name, _local(base, source), family, parent))
    names = [m.name for m in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _fail(where, f"model name(s) {', '.join(duplicates)} used twice: names must be unique")
    for m in out:
        if m.parent is not None and m.parent not in names:
            raise _fail(where, f"model {m.name} has parent {m.parent!r}, which is not a model of the sweep")
        if m.parent == m.name:
            raise _fail(where, f"model {m.name} has itself as parent: give the model it derives from")
    return tuple(out)


def _pairs(where: str, raw: Any, names: list[str]) -> tuple[tuple[str, str], ...]:
    def known(name: Any, role: str) -> str:
        if not isinstance(name, str) or name not in names:
            listed = ", ".join(names) if len(names) <= 10 else ", ".join(names[:10]) + ", ..."
            raise _fail(where, f"{role} {show(name)} is not a model of the sweep (models: {listed})")
        return name

    if raw is None or raw == "all":
        return tuple((a, b) for i, a in enumerate(names) for b in names[i + 1 :])
    if (
        isinstance(raw, dict)
        and set(raw) == {"bases", "derived"}
        and all(isinstance(raw[k], list) for k in ("bases", "derived"))
    ):
        bases = [known(n, "pairs.bases entry") for n in raw["bases"]]
        derived = [known(n, "pairs.derived entry") for n in raw["derived"]]
        pairs = [(a, b) for a in bases for b in derived if a != b]
    elif isinstance(raw, list) and all(isinstance(p, list) and len(p) == 2 for p in raw):
        pairs = [(known(a, "pair member"), known(b, "pair member")) for a, b in raw]
    else:
        raise _fail(where, "'pairs' must be all, {bases: [...], derived: [...]} or a list of [a, b] pairs")
    seen: set[frozenset[str]] = set()
    for a, b in pairs:
        if a == b or frozenset((a, b)) in seen:
            raise _fail(where, f"pair [{a}, {b}] is {'a model with itself' if a == b else 'listed twice'}")
        seen.add(frozenset((a, b)))
    if not pairs:
        raise _fail(where, "'pairs' selects no pair of models")
    return tuple(pairs)


def _data(where: str, raw: Any, base: str, names: list[str]) -> dict[str, Any]:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise _fail(where, "'data' must be a mapping like {kind: random, num_sequences: 8, seq_len: 128}")
    unknown = _keys(raw, _DATA_KEYS)
    if unknown:
        raise _fail(where, f"data has unknown key(s) {unknown}: allowed {', '.join(sorted(_DATA_KEYS))}")
    kind = raw.get("kind", "random")
    if kind not in ("random", "text", "jsonl"):
        raise _fail(where, f"data.kind must be random, text or jsonl, got {show(kind)}")
    out: dict[str, Any] = {
        "kind": kind,
        "num_sequences": _integer(where, "data.num_sequences", raw.get("num_sequences", 64), 1),
        "seq_len": _integer(where, "data.seq_len", raw.get("seq_len", 128), 2),
        "seed": _integer(where, "data.seed", raw.get("seed", 0), 0),
        "vocab": None if raw.get("vocab") is None else _integer(where, "data.vocab", raw["vocab"], 1),
        "tokenizer": raw.get("tokenizer"),
        "path": None,
    }
    if out["num_sequences"] * out["seq_len"] > MAX_TOKENS:
        raise _fail(
            where,
            f"data asks for {out['num_sequences']} x {out['seq_len']} tokens: at most {MAX_TOKENS:,} "
            "(a few thousand sequences suffice; every model's fingerprint grows with them)",
        )
    if kind != "random":
        if not _is_path(raw.get("path")):
            raise _fail(where, f"data.kind={kind} needs data.path (the {kind} file)")
        out["path"] = _local(base, raw["path"])
        if not os.path.isfile(out["path"]):
            raise _fail(where, f"data file {out['path']} does not exist or is not a file")
    if out["tokenizer"] is not None and (not isinstance(out["tokenizer"], str) or out["tokenizer"] not in names):
        raise _fail(where, f"data.tokenizer {show(out['tokenizer'])} is not a model of the sweep")
    return out


class _AliasFound(Exception):
    """An anchor or alias at line ``args[0]`` of a sweep file."""


@functools.cache
def _loader() -> type:
    """PyYAML's safe loader without anchors and aliases (``&x`` / ``*x``): nested aliases expand
    a few hundred bytes into billions of nodes, and a sweep file has no use for them."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise _AliasFound(event.start_mark.line + 1)
            return super().compose_node(parent, index)

    return NoAliasLoader


def _read_yaml(path: str) -> Any:
    """The file's YAML (no anchors or aliases, at most 4 MiB, nested at most ~500 deep).

    Raises:
      SweepConfigError: missing, too big, not UTF-8 YAML, or with an anchor or alias.
    """
    import yaml

    if not os.path.isfile(path):
        raise SweepConfigError(f"sweep config {path} does not exist or is not a file: check --config")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(_MAX_BYTES + 1)
    except (OSError, UnicodeDecodeError) as e:
        problem = getattr(e, "strerror", None) or " ".join(str(e).split())[:160]
        raise SweepConfigError(f"sweep config {path} cannot be read ({problem}): check --config") from None
    if len(text) > _MAX_BYTES:
        raise SweepConfigError(f"sweep config {path} is over {_MAX_BYTES >> 20} MiB: is it the right file?")
    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 (a safe loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())[:160]
        raise SweepConfigError(
            f"{path} is not valid YAML{at} ({problem}): fix the file (see jaxind.many.sweep_config)"
        ) from None
    except _AliasFound as e:
        raise SweepConfigError(
            f"sweep config {path} line {e.args[0]}: YAML anchors and aliases (&name, *name) are not allowed "
            "in a sweep file: write each value out"
        ) from None
    except RecursionError:
        raise SweepConfigError(f"sweep config {path} is nested too deeply: fix the file") from None


def load(path: str) -> SweepConfig:
    """Reads and checks a sweep file.

    Raises:
      SweepConfigError: one line naming the file, the key and the fix.
    """
    raw = _read_yaml(path)
    where = f"sweep config {path}"
    if not isinstance(raw, dict):
        raise _fail(where, "must be a YAML mapping with at least a 'models' list")
    unknown = _keys(raw, _TOP_KEYS)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}: allowed {', '.join(sorted(_TOP_KEYS))}")
    base = os.path.dirname(os.path.abspath(path))
    models = _models(where, raw.get("models"), base)
    names = [m.name for m in models]
    tests = raw.get("tests", list(DEFAULT_SWEEP_TESTS))
    tests = [t.strip() for t in tests.split(",")] if isinstance(tests, str) else tests
    if not isinstance(tests, list) or not tests or any(t not in ALL_TESTS for t in tests):
        bad = [t for t in tests if t not in ALL_TESTS] if isinstance(tests, list) else [tests]
        raise _fail(where, f"unknown or no test(s) {show(bad)}: choose from {', '.join(ALL_TESTS)}")
    alpha = raw.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and 0 < alpha < 1):
        raise _fail(where, f"alpha must lie strictly between 0 and 1, got {show(alpha)}")
    correction = raw.get("correction", "holm")
    if correction not in CORRECTIONS:
        raise _fail(where, f"correction must be one of {', '.join(CORRECTIONS)}, got {show(correction)}")
    dtype = raw.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise _fail(where, f"dtype must be float32 or bfloat16, got {show(dtype)}")
    layers, layer_pairs = _layer_flags(where, raw.get("layers"), raw.get("layer_pairs"))
    return SweepConfig(
        path=os.path.abspath(path),
        models=models,
        pairs=_pairs(where, raw.get("pairs", "all"), names),
        tests=tuple(dict.fromkeys(tests)),
        data=_data(where, raw.get("data"), base, names),
        alpha=float(alpha),
        correction=correction,
        num_perms=_integer(where, "num_perms", raw.get("num_perms", 999), 1),
        batch_size=_integer(where, "batch_size", raw.get("batch_size", 8), 1),
        layers=layers,
        layer_pairs=layer_pairs,
        dtype=dtype,
        cache_dir=_cache_dir(where, raw.get("cache_dir"), base),
        generalized_steps=_integer(where, "generalized_steps", raw.get("generalized_steps", 2000), 1),
    )


def _cache_dir(where: str, value: Any, base: str) -> str | None:
    """The file's ``cache_dir`` (a folder path, relative to the file's folder when it exists there)."""
    if value is None:
        return None
    if not _is_path(value):
        raise _fail(where, f"cache_dir must be a folder path, got {show(value)}")
    path = _local(base, value)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise _fail(where, f"cache_dir {path} is a file, not a directory: choose another path")
    return path


def _layer_flags(where: str, layers: Any, layer_pairs: Any) -> tuple[str | None, str | None]:
    """``layers`` / ``layer_pairs`` as their flag strings, checked by :mod:`jaxind.models.layer_selection`."""
    from jaxind.models import layer_selection as layers_lib

    if layers is not None and layer_pairs is not None:
        raise _fail(where, "give layers or layer_pairs, not both")
    plain = (int, str)
    if isinstance(layers, list) and layers and all(isinstance(l, plain) and not isinstance(l, bool) for l in layers):
        layers = ",".join(str(l) for l in layers)
    if isinstance(layer_pairs, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(l, int) and not isinstance(l, bool) for l in p)
        for p in layer_pairs
    ):
        layer_pairs = ",".join(f"{a}:{b}" for a, b in layer_pairs)
    for key, value, example in (("layers", layers, "0,5,14 or [0, 5]"), ("layer_pairs", layer_pairs, "[[3, 5]]")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, plain)):
            raise _fail(where, f"{key} must be like {example}, got {show(value)}")
    try:
        if layers is not None:
            layers_lib.parse_layers(str(layers), "layers")
        if layer_pairs is not None:
            layers_lib.parse_layer_pairs(str(layer_pairs), "layer_pairs")
    except JaxindError as e:
        raise _fail(where, str(e)) from None
    return (None if layers is None else str(layers)), (None if layer_pairs is None else str(layer_pairs))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as converters.sources reads it


def _from_yaml_folder(base: str, source: str) -> str:
    """A reference list's ``source`` with a relative path taken from the YAML's folder ``base`` whatever the
    working directory (a missing one then fails naming that folder); built-in aliases and ``org/name`` hub ids
    that are not a folder there stay as written."""
    from jaxind.io.assets import BUILTIN_ALIASES

    expanded = os.path.expanduser(source)
    if os.path.isabs(expanded) or source in BUILTIN_ALIASES:
        return expanded
    joined = os.path.join(base, expanded)
    if (
        not os.path.lexists(joined)
        and _HUB_ID.match(source)
        and not os.path.lexists(os.path.join(base, source.split("/")[0]))
    ):
        return source
    return joined


def load_references(path: str) -> tuple[tuple[ModelEntry, ...], dict[str, Any] | None]:
    """The ``models:`` list (at least one) and the ``data:`` settings, if any, of a YAML file: the
    references of a one-vs-many scan (other keys, e.g. a whole sweep's, are allowed and ignored).

    Raises:
      SweepConfigError: no readable models list.
    """
    raw = _read_yaml(path)
    where = f"reference list {path}"
    if not isinstance(raw, dict):
        raise _fail(where, "must be a YAML mapping with a 'models' list")
    base = os.path.dirname(os.path.abspath(path))
    models = tuple(
        dataclasses.replace(m, source=_from_yaml_folder(base, raw_m["source"]))
        for m, raw_m in zip(_models(where, raw.get("models"), base, least=1), raw["models"])
    )
    data = None if raw.get("data") is None else _data(where, raw["data"], base, [m.name for m in models])
    return models, data
