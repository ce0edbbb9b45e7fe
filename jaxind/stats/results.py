"""What every test returns (:class:`TestResult`) and the results JSON the CLI writes.

**One result type** (docs/DESIGN.md §5.3). Every test, whatever its statistic, returns a
:class:`TestResult`: ``pvalue`` and ``log10_pvalue`` (``None`` for JSD, which is not a test),
``exact`` (valid at every sample size under H0 as stated), the test ``statistic``, per-layer
:class:`LayerResult` records, ``combine`` (how the layers became one p-value), ``seconds``,
``note``/``error``, and test-specific values in ``extra``. Layer-wise tests build it with the one
Fisher-combining helper :func:`fisher_result`; :class:`jaxind.stats.permtest.PermTestResult` is a
subclass that also keeps the draws.

**The results JSON** (docs/DESIGN.md §4), one file per model pair, written atomically:
``schema_version``, ``jaxind_version``, ``created`` (UTC ISO time), ``seed``, ``alpha``,
``num_perms``, ``model_a`` / ``model_b`` (what was loaded), ``data`` (token settings), and
``tests``: ``{name: TestResult.to_json()}``. :data:`RESULTS_SCHEMA` is its JSON Schema.
Version 2 (this one) replaced version 1's per-layer ``rho`` by ``statistic``, moved localized
testing from the top level into ``tests["localized"]``, and gave every test record the same keys.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import tempfile
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, ParamSpec, TypeVar

import numpy as np

import jaxind
from jaxind.io import destinations
from jaxind.stats import pvalues

__all__ = [
    "Combine",
    "LayerResult",
    "RESULTS_SCHEMA",
    "SCHEMA_VERSION",
    "TEST_SCHEMA",
    "TestResult",
    "fisher_result",
    "jsonable",
    "make_results",
    "rescue_path",
    "timed",
    "write_json",
    "write_json_or_rescue",
]

SCHEMA_VERSION = 2
# How per-layer results became one p-value.
Combine = Literal["fisher", "permtest", "bonferroni_min"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerResult:
    """One layer pair's test.

    Attributes:
      layer_a, layer_b: the layers compared (-1 for parameters outside the layers, CSU-all).
      pvalue, log10_pvalue: the layer's p-value and its log10 (finite where ``pvalue`` underflows).
      statistic: the layer's statistic (Spearman's rho for CSU/CSH/MATCH; minus the L2 distance).
      extra: test-specific values (``param``, ``matched_units``, the distillation fit ``r2_a``, ...).
    """

    layer_a: int
    layer_b: int
    pvalue: float
    log10_pvalue: float
    statistic: float | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_spearman(cls, layer_a: int, layer_b: int, result: pvalues.SpearmanResult, **extra: Any) -> LayerResult:
        """A layer record from a Spearman test (the statistic is rho)."""
        return cls(
            layer_a=int(layer_a),
            layer_b=int(layer_b),
            pvalue=float(result.pvalue),
            log10_pvalue=float(result.log10_pvalue),
            statistic=float(result.rho),
            extra=extra,
        )

    def to_json(self) -> dict[str, Any]:
        """``{"layer_a", "layer_b", "pvalue", "log10_pvalue", "statistic", **extra}``."""
        core = {
            "layer_a": self.layer_a,
            "layer_b": self.layer_b,
            "pvalue": self.pvalue,
            "log10_pvalue": self.log10_pvalue,
            "statistic": self.statistic,
        }
        return jsonable({**core, **_no_clash(self.extra, core)})

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> LayerResult:
        """The inverse of :meth:`LayerResult.to_json` (keys beyond the core ones become ``extra``)."""
        core = ("layer_a", "layer_b", "pvalue", "log10_pvalue", "statistic")
        return cls(
            layer_a=record["layer_a"],
            layer_b=record["layer_b"],
            pvalue=_float(record["pvalue"], math.nan),
            log10_pvalue=_float(record["log10_pvalue"], math.nan),
            statistic=_float(record.get("statistic")),
            extra={k: v for k, v in record.items() if k not in core},
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TestResult:
    """One test on one pair of models.

    Attributes:
      test: the test's name in :data:`jaxind.pair.registry.TESTS`.
      pvalue, log10_pvalue: the p-value (0.0 where float64 underflows) and its log10 (always
        finite for a p-value); both ``None`` for a statistic that is not a test, or an error.
      exact: the p-value is valid at every sample size under H0 as stated (README "exact").
      statistic: the test's overall statistic (Fisher's ``-2 sum ln p`` for layer-wise tests,
        the observed PERMTEST statistic, the JSD), or None.
      layers: per-layer (or per-parameter, per-block) records.
      combine: how the layers' p-values became ``pvalue`` ("fisher", "permtest" for one
        statistic over the selected layers, "bonferroni_min"), or None.
      seconds: wall time of the test.
      note: what the reader should know (e.g. why a p-value is heuristic).
      error: why the test did not run on this pair (then ``pvalue`` is None).
      extra: test-specific values (``num_perms``, ``num_tokens``, localized's matrix, ...).
    """

    __test__ = False  # not a pytest test class

    test: str
    pvalue: float | None
    log10_pvalue: float | None
    exact: bool
    statistic: float | None = None
    layers: tuple[LayerResult, ...] = ()
    combine: Combine | None = None
    seconds: float = 0.0
    note: str | None = None
    error: str | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def failed(cls, test: str, error: Exception | str, seconds: float = 0.0) -> TestResult:
        """The record of a test that does not apply to a pair (e.g. CSU across widths)."""
        return cls(test=test, pvalue=None, log10_pvalue=None, exact=False, seconds=seconds, error=str(error))

    def replace(self, **changes: Any) -> TestResult:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The JSON record: the fields above, the extras after them, ``layers`` last (plain JSON types)."""
        core = {
            "test": self.test,
            "pvalue": self.pvalue,
            "log10_pvalue": self.log10_pvalue,
            "exact": self.exact,
            "statistic": self.statistic,
            "combine": self.combine,
            "seconds": self.seconds,
            "note": self.note,
            "error": self.error,
        }
        extra = _no_clash(self.extra, {**core, "layers": None})
        return jsonable({**core, **extra, "layers": [layer.to_json() for layer in self.layers]})

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TestResult:
        """The inverse of :meth:`TestResult.to_json`: ``TestResult.from_json(r.to_json()).to_json() == r.to_json()``."""
        core = ("test", "pvalue", "log10_pvalue", "exact", "statistic", "combine", "seconds", "note", "error", "layers")
        return cls(
            test=record["test"],
            pvalue=_float(record["pvalue"]),
            log10_pvalue=_float(record["log10_pvalue"]),
            exact=bool(record["exact"]),
            statistic=_float(record.get("statistic")),
            layers=tuple(LayerResult.from_json(layer) for layer in record.get("layers") or ()),
            combine=record.get("combine"),
            seconds=float(record.get("seconds") or 0.0),
            note=record.get("note"),
            error=record.get("error"),
            extra={k: v for k, v in record.items() if k not in core},
        )


@typing.overload
def _float(value: Any, missing: float) -> float: ...
@typing.overload
def _float(value: Any, missing: None = None) -> float | None: ...
def _float(value: Any, missing: float | None = None) -> float | None:
    """A number of the results JSON back to a float: ``"inf"``/``"-inf"`` as written by :func:`jsonable`;
    ``None`` (a NaN, or no value) becomes ``missing``."""
    return missing if value is None else float(value)


def _no_clash(extra: Mapping[str, Any], core: Mapping[str, Any]) -> Mapping[str, Any]:
    clash = sorted(set(extra) & set(core))
    if clash:
        raise ValueError(f"extra values {clash} would overwrite result fields")
    return extra


def fisher_result(
    test: str, layers: Sequence[LayerResult], *, exact: bool, note: str | None = None, **extra: Any
) -> TestResult:
    """The result of a layer-wise test: the layers' p-values combined by Fisher's method
    (``X = -2 sum ln p_l ~ chi2(2L)`` under H0 with independent layers, in log space).

    Raises:
      ValueError: no layers, or a NaN p-value (e.g. Spearman on constant input).
    """
    logs = np.asarray([layer.log10_pvalue for layer in layers], np.float64)
    combined = pvalues.fisher_combine(log10_pvalues=logs)
    statistic = float(-2.0 * math.log(10.0) * logs.sum())
    return TestResult(
        test=test,
        pvalue=float(combined.pvalue),
        log10_pvalue=float(combined.log10_pvalue),
        exact=exact,
        statistic=statistic,
        layers=tuple(layers),
        combine="fisher",
        note=note,
        extra=extra,
    )


P = ParamSpec("P")
R = TypeVar("R", bound=TestResult)


def timed(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorates a test function: its result's ``seconds`` is the wall time of the call."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        return dataclasses.replace(result, seconds=time.perf_counter() - start)

    return wrapper


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) else (value if math.isfinite(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def make_results(
    model_a: dict,
    model_b: dict,
    data: dict,
    seed: int,
    tests: Mapping[str, TestResult],
    alpha: float = 0.05,
    **extra: Any,
) -> dict:
    """Assembles the results document (plain JSON types; NaN becomes null)."""
    return jsonable(
        {
            "schema_version": SCHEMA_VERSION,
            "jaxind_version": jaxind.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seed": seed,
            "alpha": alpha,
            "model_a": model_a,
            "model_b": model_b,
            "data": data,
            "tests": {name: result.to_json() for name, result in tests.items()},
            **extra,
        }
    )


_NUMBER = {"type": ["number", "null"]}
_LOG10 = {"anyOf": [{"type": ["number", "null"]}, {"enum": ["-inf"]}]}  # -inf: a p-value of exactly 0
_STATISTIC = {"anyOf": [{"type": ["number", "null"]}, {"enum": ["inf", "-inf"]}]}
_LAYER_SCHEMA = {
    "type": "object",
    "required": ["layer_a", "layer_b", "pvalue", "log10_pvalue", "statistic"],
    "properties": {
        "layer_a": {"type": "integer", "minimum": -1},
        "layer_b": {"type": "integer", "minimum": -1},
        "pvalue": {"type": "number", "minimum": 0, "maximum": 1},
        "log10_pvalue": _LOG10,
        "statistic": _STATISTIC,
    },
}
TEST_SCHEMA = {
    "type": "object",
    "required": [
        "test",
        "pvalue",
        "log10_pvalue",
        "exact",
        "statistic",
        "combine",
        "seconds",
        "note",
        "error",
        "layers",
    ],
    "properties": {
        "test": {"type": "string"},
        "pvalue": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "log10_pvalue": _LOG10,
        "exact": {"type": "boolean"},
        "statistic": _STATISTIC,
        "combine": {"enum": ["fisher", "permtest", "bonferroni_min", None]},
        "seconds": {"type": "number", "minimum": 0},
        "note": {"type": ["string", "null"]},
        "error": {"type": ["string", "null"]},
        "layers": {"type": "array", "items": _LAYER_SCHEMA},
    },
}
_MODEL_SCHEMA = {
    "type": "object",
    "required": [
        "source",
        "format",
        "family",
        "layers",
        "d_model",
        "d_ff",
        "heads",
        "kv_heads",
        "vocab",
        "params",
        "dtype",
    ],
    "properties": {
        "family": {"type": "string"},
        "layers": {"type": "integer", "minimum": 1},
        "params": {"type": "integer", "minimum": 1},
        "dtype": {"type": "string"},
    },
}
RESULTS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "jaxind results (one model pair)",
    "type": "object",
    "required": ["schema_version", "jaxind_version", "created", "seed", "alpha", "model_a", "model_b", "data", "tests"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "jaxind_version": {"type": "string"},
        "created": {"type": "string"},
        "seed": {"type": "integer"},
        "alpha": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "num_perms": {"type": "integer", "minimum": 1},
        "model_a": _MODEL_SCHEMA,
        "model_b": _MODEL_SCHEMA,
        "data": {"type": "object", "required": ["kind", "num_sequences", "seq_len", "seed", "tokens_shape"]},
        "tests": {"type": "object", "additionalProperties": TEST_SCHEMA},
    },
}


def write_json(path: str, document: dict) -> None:
    """Writes ``document`` to ``path`` atomically (:func:`jaxind.io.destinations.write_file`: a temporary
    file beside the target, fsync, rename; a symlink is written through, a special file refused).

    The file gets the mode a plain ``open()`` would give it (``0o666`` less the umask), also when
    it replaces an existing file.
    """
    destinations.write_text(path, json.dumps(jsonable(document), indent=2))


def rescue_path(path: str) -> str:
    """Where results go when ``path`` cannot be written: the temp folder, named after ``path``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"jaxind-{os.path.splitext(os.path.basename(path))[0] or 'results'}-{stamp}-{os.getpid()}.json"
    return os.path.join(tempfile.gettempdir(), name)


def write_json_or_rescue(path: str, document: dict) -> None:
    """:func:`write_json`, never losing the results: if ``path`` cannot be written (disk full, the
    folder removed meanwhile, ...), they are written to :func:`rescue_path`, or else printed on
    stdout, and a JaxindError says where they are.

    Raises:
      JaxindError: ``path`` was not written (the message says where the results went).
    """
    try:
        write_json(path, document)
        return
    except OSError as e:
        problem = f"cannot write {path} ({e.strerror or type(e).__name__})"
    except jaxind.JaxindError as e:  # it became a special file after the check before the run
        problem = f"cannot write {path} ({e})"
    fallback = rescue_path(path)
    try:
        write_json(fallback, document)
    except (OSError, jaxind.JaxindError):
        print(json.dumps(jsonable(document), indent=2), flush=True)
        raise jaxind.JaxindError(
            f"{problem}, nor {fallback}: the results JSON is printed on stdout instead; "
            "free some space or choose another --output"
        ) from None
    raise jaxind.JaxindError(f"{problem}: the results were saved to {fallback} instead; move them where they belong")
