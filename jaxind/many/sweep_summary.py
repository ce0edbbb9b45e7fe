"""A sweep's output folder read back: per-model states, per-pair results, the event log and its
counters, and ``summary.json`` with the verdicts after a multiple-testing correction over pairs.

Layout of ``--output=DIR``::

    DIR/sweep.json                 the data settings and token hash the sweep was started with
    DIR/tokens.npy                 the reference token ids every fingerprint is made on
    DIR/models/<name>.json         per model: status, content key, fingerprint key, summary or error
    DIR/pairs/<a>__<b>.json        per pair: the results JSON of jaxind.main (schema version 2)
    DIR/errors/<a>__<b>.json       per pair that failed: its error (removed once it succeeds)
    DIR/log/<host>-<pid>.jsonl     per process: what it computed, one event per line
    DIR/summary.json, report.*     written at the end of every run (see jaxind.many.provenance)

**Verdicts.** A pair's p-value is the Bonferroni minimum over its tests that gave one
(``min(1, k * min_t p_t)`` for ``k`` such tests: valid whatever their dependence); the ``m`` pair
p-values are then adjusted with Holm's step-down (or Bonferroni, ``correction:``), and a pair is
``dependent`` when its adjusted p-value is at most ``alpha``: the chance of calling any
independent pair dependent is at most ``alpha``. Each test's own p-values are adjusted over the
pairs the same way (``tests[t].dependent``). Everything is computed in log10.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import math
import os
import socket
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

import jaxind
from jaxind.errors import JaxindError
from jaxind.many.sweep_config import SweepConfig

__all__ = [
    "EventLog",
    "SUMMARY_VERSION",
    "build",
    "counters",
    "evidence_matrix",
    "pair_name",
    "pair_problem",
    "pair_row",
    "read_events",
    "read_json",
    "read_pair",
    "related_by_truth",
]

if TYPE_CHECKING:
    from jaxind.pair.result import PairResult
    from jaxind.stats.results import TestResult

SUMMARY_VERSION = 1


def pair_name(a: Any, b: Any) -> str:
    return f"{a}__{b}"


def read_json(path: str) -> Any:
    """A JSON file, or None if it is missing or unreadable (e.g. cut short by a crash)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _log10_problem(value: Any) -> bool:
    """Whether ``value`` is not a (log10) p-value as results JSONs hold them (None, a number, "-inf")."""
    if value is None or value == "-inf":
        return False
    return isinstance(value, bool) or not isinstance(value, (int, float)) or not value < math.inf


def _record_problem(test: Any, record: Any) -> str | None:
    """What is wrong with one test's record of a pair's results JSON (None: nothing)."""
    if not isinstance(record, dict):
        return f"test {test} is not a record"
    for key in ("pvalue", "log10_pvalue"):
        if _log10_problem(record.get(key)):
            return f"test {test} has {key} {str(record.get(key))[:40]!r}"
    if record.get("error") is not None and not isinstance(record["error"], str):
        return f"test {test} has a non-text error"
    layers = record.get("layers", [])
    if not isinstance(layers, list) or not all(
        isinstance(l, dict) and {"layer_a", "layer_b"} <= set(l) and not _log10_problem(l.get("log10_pvalue"))
        for l in layers
    ):
        return f"test {test} has damaged layer records"
    return None


def pair_problem(doc: Any, tests: tuple[str, ...] | list[str]) -> str | None:
    """What keeps ``doc`` from being a pair's results JSON with a record for each of ``tests``
    (None: it is one). The file may be damaged, cut short or written by something else."""
    if not isinstance(doc, dict):
        return "not a results JSON object"
    records = doc.get("tests")
    if not isinstance(records, dict):
        return "no 'tests' mapping"
    missing = [t for t in tests if t not in records]
    if missing:
        return f"no record of test(s) {', '.join(missing)}"
    if not isinstance(doc.get("sweep"), dict):
        return "no 'sweep' record"
    return next((p for t in tests if (p := _record_problem(t, records[t])) is not None), None)


def read_pair(output: str, name: str, tests: tuple[str, ...] | list[str]) -> tuple[PairResult | None, str | None]:
    """Pair ``name``'s results JSON in ``output``: ``(result, None)``; ``(None, None)`` when there is
    none; ``(None, why)`` when it is unreadable or not of a results JSON's shape."""
    from jaxind.pair.result import PairResult

    path = os.path.join(output, "pairs", name + ".json")
    if not os.path.lexists(path):
        return None, None
    doc = read_json(path)
    problem = "unreadable or not JSON" if doc is None else pair_problem(doc, tests)
    if problem:
        return None, problem
    try:
        return PairResult.from_json(doc), None
    except (JaxindError, KeyError, TypeError, ValueError) as e:
        return None, f"not a results JSON of this version ({e})"


class EventLog:
    """This process's event log ``DIR/log/<host>-<pid>.jsonl`` (one file per process: no two
    writers share a file, across workers, shards and hosts)."""

    def __init__(self, output: str):
        self.path = os.path.join(output, "log", f"{socket.gethostname()}-{os.getpid()}.jsonl")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def add(self, event: str, **fields: Any) -> None:
        """Appends ``{"event", "time", **fields}`` and syncs it to disk."""
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_events(output: str) -> list[dict[str, Any]]:
    """Every event of every process, by time (a line cut short by a kill is skipped)."""
    events = []
    for path in sorted(glob.glob(os.path.join(output, "log", "*.jsonl"))):
        with open(path, errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and isinstance(event.get("time", 0), (int, float)):
                        events.append(event)
    return sorted(events, key=lambda e: e.get("time", 0))


def counters(events: list[dict[str, Any]]) -> dict[str, Any]:
    """How often each model was converted / fingerprinted and each pair computed, over all runs
    (``*_cached``: found in the cache instead), and the number of runs."""
    out: dict[str, Any] = {"runs": sum(e.get("event") == "run" for e in events)}
    for event in ("converted", "model_cached", "fingerprinted", "fingerprint_cached", "model_error"):
        out[event] = dict(Counter(str(e.get("name")) for e in events if e.get("event") == event))
    for event in ("pair", "pair_error", "pair_skipped"):
        out[event] = dict(Counter(pair_name(e.get("a"), e.get("b")) for e in events if e.get("event") == event))
    return out


def _test_entry(record: TestResult) -> dict[str, Any]:
    """A test's summary entry, in the results JSON's own number format (``"-inf"``, NaN as null)."""
    from jaxind.stats.results import jsonable

    return jsonable({"pvalue": record.pvalue, "log10_pvalue": record.log10_pvalue, "error": record.error})


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    if value == "-inf":
        return -math.inf
    return float(value)


def pair_row(config: SweepConfig, output: str, a: str, b: str) -> dict[str, Any]:
    """One pair's summary row: status, per-test p-values, the pair's Bonferroni-over-tests p-value."""
    name = pair_name(a, b)
    row: dict[str, Any] = {"a": a, "b": b, "file": f"pairs/{name}.json", "status": "pending", "error": None}
    doc, damaged = read_pair(output, name, config.tests)
    if doc is None:
        failure = read_json(os.path.join(output, "errors", name + ".json"))
        if damaged is not None:
            row.update(status="error", error=f"{row['file']} is damaged ({damaged}): rerun the sweep to recompute it")
        elif isinstance(failure, dict):
            row.update(status="error", error=str(failure.get("error")))
        row.update(tests={}, pvalue=None, log10_pvalue=None)
        return row
    tests = {t: _test_entry(doc.tests[t]) for t in config.tests}
    logs = [
        float(_finite(v["log10_pvalue"]) or 0.0)
        for v in tests.values()
        if v["log10_pvalue"] is not None and not v["error"]
    ]
    log10 = None if not logs else min(0.0, min(logs) + math.log10(len(logs)))
    row.update(
        status="done", tests=tests, log10_pvalue=log10, pvalue=None if log10 is None else 10.0 ** max(log10, -400)
    )
    if log10 is None:
        row["error"] = "no test gave a p-value: " + "; ".join(f"{t}: {v['error']}" for t, v in tests.items())
        if all(v["error"] for v in tests.values()):
            row["status"] = "error"  # not one test ran: nothing was found out about the pair
    return row


def _adjust(rows: list[dict[str, Any]], get, put, method: str, alpha: float) -> None:
    """Adjusts the log10 p-values ``get(row)`` over the rows that have one; ``put(row, adjusted, dependent)``."""
    from jaxind.stats import pvalues

    chosen = [r for r in rows if get(r) is not None]
    adjusted: Any = pvalues.adjust_log10([get(r) for r in chosen], method) if chosen else []
    for row, value in zip(chosen, adjusted):
        put(row, float(value), bool(value <= math.log10(alpha)))


def related_by_truth(config: SweepConfig) -> set[frozenset[str]] | None:
    """Pairs of models in the same derivation tree (``parent:`` keys), or None without any."""
    parents = {m.name: m.parent for m in config.models}
    if not any(parents.values()):
        return None

    def root(name: str) -> str:
        seen = set()
        while parents.get(name) and name not in seen:
            seen.add(name)
            name = parents[name]  # type: ignore[assignment]
        return name

    names = list(parents)
    return {frozenset((x, y)) for i, x in enumerate(names) for y in names[i + 1 :] if root(x) == root(y)}


def build(config: SweepConfig, output: str) -> dict[str, Any]:
    """The summary document of the sweep in ``output`` as it stands (pending pairs included)."""
    rows = [pair_row(config, output, a, b) for a, b in config.pairs]
    alpha, method = config.alpha, config.correction

    def put_pair(row: dict[str, Any], value: float, dependent: bool) -> None:
        row.update(adjusted_log10_pvalue=value, dependent=dependent)

    for row in rows:
        row.update(adjusted_log10_pvalue=None, dependent=None)
    _adjust(rows, lambda r: r["log10_pvalue"], put_pair, method, alpha)
    for test in config.tests:
        has = [r for r in rows if test in r["tests"]]

        def get(r: dict[str, Any], t: str = test) -> float | None:
            entry = r["tests"][t]
            return None if entry["error"] or entry["log10_pvalue"] is None else _finite(entry["log10_pvalue"])

        def put(r: dict[str, Any], value: float, dependent: bool, t: str = test) -> None:
            r["tests"][t].update(adjusted_log10_pvalue=value, dependent=dependent)

        _adjust(has, get, put, method, alpha)
    truth = related_by_truth(config)
    if truth is not None:
        for row in rows:
            row["expected_dependent"] = frozenset((row["a"], row["b"])) in truth
    models = []
    for m in config.models:
        state = read_json(os.path.join(output, "models", m.name + ".json"))
        state = state if isinstance(state, dict) and state else {"status": "pending"}
        models.append({"name": m.name, "source": m.source, "family": m.family, "parent": m.parent, **state})
    statuses = Counter(r["status"] for r in rows)
    tested = sum(r["log10_pvalue"] is not None for r in rows)
    return {
        "summary_version": SUMMARY_VERSION,
        "jaxind_version": jaxind.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config.path,
        "alpha": alpha,
        "correction": method,
        "verdict": (
            f"pair p-value = Bonferroni minimum over its tests; {method} over the {tested} pairs with a p-value; "
            f"dependent when the adjusted p-value <= {alpha}"
        ),
        "tests": list(config.tests),
        "complete": statuses.get("pending", 0) == 0,
        "counts": {"models": len(models), "pairs": len(rows), **dict(statuses)},
        "models": models,
        "pairs": rows,
        "dependent_pairs": [[r["a"], r["b"]] for r in rows if r["dependent"]],
        "counters": counters(read_events(output)),
    }


def evidence_matrix(summary: dict[str, Any], test: str | None = None) -> tuple[list[str], np.ndarray]:
    """``(names, M)``: ``M[i, j] = -log10 p`` of the pair (or of ``test``), symmetric, NaN where untested."""
    names = [m["name"] for m in summary["models"]]
    index = {n: i for i, n in enumerate(names)}
    matrix = np.full((len(names), len(names)), np.nan)
    for row in summary["pairs"]:
        value = row["log10_pvalue"] if test is None else row["tests"].get(test, {}).get("log10_pvalue")
        if value is None or (test is not None and row["tests"][test].get("error")):
            continue
        i, j = index[row["a"]], index[row["b"]]
        matrix[i, j] = matrix[j, i] = -_finite(value)  # type: ignore[operator]
    return names, matrix
