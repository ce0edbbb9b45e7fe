"""One pair's results as a typed value: :class:`PairResult` (models, data, every test's
:class:`~jaxind.stats.results.TestResult`, timing), and its JSON document (docs/DESIGN.md §4).

``run_pair`` returns a :class:`PairResult`; the report, the scan and the sweep summary read one
(from memory, or from a results JSON through :meth:`PairResult.from_json`), so no consumer reads
string keys of a document or writes a schema version of its own.
"""

from __future__ import annotations

import dataclasses
import datetime
import warnings
from collections.abc import Mapping
from typing import Any

import jaxind
from jaxind.errors import JaxindError
from jaxind.stats import results
from jaxind.stats.results import SCHEMA_VERSION, TestResult

__all__ = ["PairResult"]

_CORE = ("schema_version", "jaxind_version", "created", "seed", "alpha", "model_a", "model_b", "data", "tests")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairResult:
    """The tests of one pair of models.

    Attributes:
      model_a, model_b: what was loaded (``Model.summary()``: source, family, sizes, content key, ...).
      data: the token settings and the tokens' shape.
      seed, alpha: the run's seed (each test's key is ``key_for(seed, name)``) and significance level.
      tests: ``{name: TestResult}`` in the order they ran.
      timing: seconds per phase (``load_model_a``, ``tokens``, ``test_<name>``, ``compile``, ...), or None.
      extra: further top-level keys of the document (``num_perms``, a sweep's ``sweep`` record, ...).
      created: UTC ISO time; jaxind_version: the version that made it.
    """

    model_a: Mapping[str, Any]
    model_b: Mapping[str, Any]
    data: Mapping[str, Any]
    seed: int
    alpha: float
    tests: Mapping[str, TestResult]
    timing: Mapping[str, float] | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    created: str = dataclasses.field(default_factory=_now)
    jaxind_version: str = jaxind.__version__

    def to_json(self) -> dict[str, Any]:
        """The results document (plain JSON types; the keys of :data:`RESULTS_SCHEMA`, then ``extra``, then
        ``timing`` when there is one)."""
        doc = {
            "schema_version": SCHEMA_VERSION,
            "jaxind_version": self.jaxind_version,
            "created": self.created,
            "seed": self.seed,
            "alpha": self.alpha,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "data": self.data,
            "tests": {name: result.to_json() for name, result in self.tests.items()},
            **self.extra,
        }
        if self.timing is not None:
            doc["timing"] = dict(self.timing)
        return results.jsonable(doc)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> PairResult:
        """A results document (as :meth:`PairResult.to_json` writes it) back as a value.

        Raises:
          JaxindError: a document of another schema version, or one without the keys every version has.
        """
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise JaxindError(
                f"results document of schema version {doc.get('schema_version')!r}: this jaxind reads version "
                f"{SCHEMA_VERSION}; rerun the pair to rewrite it"
            )
        missing = [k for k in _CORE if k not in doc]
        if missing:
            raise JaxindError(f"results document without {', '.join(missing)}: rerun the pair to rewrite it")
        return cls(
            model_a=doc["model_a"],
            model_b=doc["model_b"],
            data=doc["data"],
            seed=doc["seed"],
            alpha=doc["alpha"],
            tests={name: TestResult.from_json(record) for name, record in doc["tests"].items()},
            timing=doc.get("timing"),
            extra={k: v for k, v in doc.items() if k not in (*_CORE, "timing")},
            created=doc["created"],
            jaxind_version=doc["jaxind_version"],
        )

    def replace(self, **changes: Any) -> PairResult:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def __getitem__(self, key: str) -> Any:
        """``result["tests"]``: the document's keys, as ``run_pair``'s dict gave them before it returned a
        PairResult. Deprecated: use the attributes, or :meth:`PairResult.to_json`."""
        warnings.warn(
            "run_pair returns a PairResult: read its attributes (result.tests[name].pvalue) or result.to_json()",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.to_json()[key]
