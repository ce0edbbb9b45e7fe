"""One suspect against many references: ``python -m jaxind.main --model_a=SUSPECT --reference=REFS``.

Ranks the reference models by the evidence that the suspect derives from them (docs/DESIGN.md
§5.10). ``--reference`` is a YAML file (a ``models:`` list as in a sweep file, and optionally its
``data:``), a sweep's output folder (its models and its reference tokens), or a folder holding one
model source per entry (named after the entry). References are converted and fingerprinted once,
in the cache, and reused by every later scan or sweep on the same tokens; the suspect costs one
conversion and one forward pass, and each reference then matmuls and LAPs.

A reference's evidence is its pair p-value, the Bonferroni minimum over the tests that gave one
(``min(1, k * min_t p_t)``); the references' p-values are adjusted with Holm's step-down and a
reference is ``dependent`` when its adjusted p-value is at most ``--alpha``. The ranking lists the
strongest evidence first (p-values at the same floor, e.g. the exact bound ``2/n!`` per layer, by the
mean per-layer Spearman rho of the matching tests: a copy's is 1); references that failed come last.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import math
import os
import re
from collections.abc import Callable
from typing import Any

import jaxind
from jaxind.errors import JaxindError
from jaxind.sweep_config import ModelEntry, load_references

DEFAULT_SCAN_TESTS = ("csu", "match")


@dataclasses.dataclass(frozen=True)
class References:
    """What ``--reference`` names: the models, and data settings or stored tokens when it has them."""

    models: tuple[ModelEntry, ...]
    data: dict[str, Any] | None = None
    tokens_path: str | None = None


def _entry_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name.removesuffix(".gguf")) or "model"


def read_references(arg: str) -> References:
    """Reads ``--reference`` (see the module doc); no model is loaded.

    Raises:
      JaxindError: missing, empty, or an unreadable YAML file.
    """
    from jaxind.sweep_summary import read_json

    path = os.path.expanduser(arg)
    if os.path.isfile(path):
        models, data = load_references(path)
        return References(models, data)
    if not os.path.isdir(path):
        raise JaxindError(f"--reference={arg} does not exist: pass a folder of models, a sweep folder or a YAML file")
    if all(os.path.exists(os.path.join(path, n)) for n in ("sweep.json", "tokens.npy", "models")):
        states = [read_json(p) for p in sorted(glob.glob(os.path.join(path, "models", "*.json")))]
        models = tuple(ModelEntry(s["name"], s["source"]) for s in states if s and s.get("status") == "ok")
        tokens = os.path.join(path, "tokens.npy")
    else:
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
        chosen = [n for n in names if os.path.isdir(os.path.join(path, n)) or n.endswith(".gguf")]
        models = tuple(ModelEntry(_entry_name(n), os.path.join(path, n)) for n in chosen)
        tokens = None
    if not models:
        raise JaxindError(f"--reference={arg} holds no model (a folder, a .gguf file or a sweep's models/ per entry)")
    return References(models, None, tokens)


def _data_settings(spec: Any, suspect: str) -> dict[str, Any]:
    """The flags' DataSpec as sweep data settings (text cut by the suspect's tokenizer, as jaxind.main does)."""
    return {
        "kind": spec.kind,
        "path": spec.path,
        "num_sequences": spec.num_sequences,
        "seq_len": spec.seq_len,
        "seed": spec.seed,
        "vocab": None,
        "tokenizer": suspect if spec.kind != "random" else None,
    }


def _tokens(refs: References, suspect: ModelEntry, spec: Any) -> tuple[Any, dict[str, Any]]:
    """The reference tokens: a sweep's stored ones, the YAML's data settings over the references
    (the sweep's tokens, so its fingerprints are reused), or the flags' over suspect and references."""
    import numpy as np

    from jaxind import fingerprint, sweep
    from jaxind.sweep_summary import read_json

    if refs.tokens_path is not None:
        info = read_json(os.path.join(os.path.dirname(refs.tokens_path), "sweep.json"))
        return np.load(refs.tokens_path), info
    if refs.data is not None:
        tokens, info = sweep.make_tokens(refs.models, refs.data)
    else:
        tokens, info = sweep.make_tokens((suspect, *refs.models), _data_settings(spec, suspect.name))
    return tokens, {**info, "token_hash": fingerprint.token_hash(tokens)}


def _prepare(entry: ModelEntry, tokens: Any, info: dict[str, Any], settings: Any, dtype: str, computed: dict) -> Any:
    """Converts (once) and fingerprints (once) one model; returns ``(model, fingerprint or None)``."""
    from jaxind import modelstore, sweep

    stored, converted = modelstore.ensure(entry.name, entry.source, dtype)
    if converted:
        computed["converted"].append(entry.name)
    if int(tokens.max()) >= stored.config.vocab_size:
        raise JaxindError(f"its vocabulary ({stored.config.vocab_size}) lacks the token ids up to {int(tokens.max())}")
    sweep.check_tokenizer(stored, info["data"], info)
    fp = None
    if sweep.DATA_TESTS & set(settings.tests) and stored.config.glu:
        fp, made = modelstore.ensure_fingerprint(stored, tokens, batch_size=settings.batch_size, data_info=info["data"])
        if made:
            computed["fingerprinted"].append(entry.name)
    return stored, fp


def _evidence(document: dict[str, Any]) -> float | None:
    logs = [
        -math.inf if t["log10_pvalue"] == "-inf" else float(t["log10_pvalue"])
        for t in document["tests"].values()
        if t.get("log10_pvalue") is not None and not t.get("error")
    ]
    return None if not logs else min(0.0, min(logs) + math.log10(len(logs)))


def _closeness(document: dict[str, Any]) -> float:
    """Mean per-layer Spearman rho of the matching tests (1 for a copy): orders references whose
    p-values reach the same floor (an exact bound such as ``2/n!`` per layer)."""
    rhos = [
        float(layer["statistic"])
        for name, test in document["tests"].items()
        if name in ("csu", "csh", "match") and not test.get("error")
        for layer in test.get("layers", [])
        if layer.get("statistic") is not None
    ]
    return sum(rhos) / len(rhos) if rhos else 0.0


def scan(
    suspect: str,
    refs: References,
    settings: Any,
    *,
    dtype: str = "float32",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tests the suspect against every reference; returns the scan document (``ranking`` first to last).

    Raises:
      JaxindError: the suspect cannot be loaded or fingerprinted, or no tokens can be made.
    """
    from jaxind import data, modelstore, pvalues

    entry = ModelEntry("suspect", suspect)
    tokens, info = _tokens(refs, entry, settings.data)
    d = info["data"]
    spec = data.DataSpec(d["kind"], d["path"], d["num_sequences"], d["seq_len"], d["seed"])
    settings = dataclasses.replace(settings, data=spec, heatmap_path=None)
    computed: dict[str, list[str]] = {"converted": [], "fingerprinted": []}
    stored_s, fp_s = _prepare(entry, tokens, info, settings, dtype, computed)
    model_s = stored_s.load()
    rows, documents = [], {}
    for ref in refs.models:
        row: dict[str, Any] = {"name": ref.name, "source": ref.source, "error": None, "tests": {}, "closeness": None}
        try:
            stored_r, fp_r = _prepare(ref, tokens, info, settings, dtype, computed)
            document = modelstore.run_stored_pair(stored_r.load(), model_s, settings, tokens, (fp_r, fp_s))
            documents[ref.name] = document
            row["tests"] = {
                t: {k: r.get(k) for k in ("pvalue", "log10_pvalue", "error")} for t, r in document["tests"].items()
            }
            row["log10_pvalue"] = _evidence(document)
            row["closeness"] = _closeness(document)
            if row["log10_pvalue"] is None:
                row["error"] = "no test gave a p-value"
        except JaxindError as e:
            row.update(error=str(e), log10_pvalue=None)
        rows.append(row)
    tested = [r for r in rows if r["log10_pvalue"] is not None]
    adjusted: Any = pvalues.adjust_log10([r["log10_pvalue"] for r in tested], "holm") if tested else []
    for row in rows:
        row.update(pvalue=None, adjusted_log10_pvalue=None, dependent=None)
    for row, value in zip(tested, adjusted):
        row.update(
            pvalue=pvalues.pow10(row["log10_pvalue"]),
            adjusted_log10_pvalue=float(value),
            dependent=bool(value <= math.log10(settings.alpha)),
        )
    ranking = sorted(
        rows, key=lambda r: (r["log10_pvalue"] is None, r["log10_pvalue"] or 0.0, -(r["closeness"] or 0.0), r["name"])
    )
    keys = ["name", "source", "pvalue", "log10_pvalue", "dependent", "adjusted_log10_pvalue", "closeness", "tests"]
    keys.append("error")
    return {
        "schema_version": 2,
        "jaxind_version": jaxind.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "suspect": stored_s.summary(),
        "alpha": settings.alpha,
        "correction": "holm over references; per reference the Bonferroni minimum over its tests",
        "tests": list(settings.tests),
        "data": {**info["data"], "tokens_shape": list(tokens.shape), "token_hash": info.get("token_hash")},
        "computed": computed,
        "ranking": [{k: r[k] for k in keys} for r in ranking],
        "results": documents,
    }


def format_ranking(document: dict[str, Any]) -> str:
    """One line per reference, strongest evidence first."""
    from jaxind.provenance import fmt_p

    rows = document["ranking"]
    width = max([len(r["name"]) for r in rows] + [4])
    lines = [f"references ranked by evidence that the suspect derives from them (Holm at alpha={document['alpha']}):"]
    for rank, r in enumerate(rows, 1):
        if r["error"]:
            lines.append(f"{rank:>3}. {r['name']:<{width}}  error: {r['error']}")
            continue
        verdict = "dependent" if r["dependent"] else "no evidence"
        tests = ", ".join(
            f"{t} {fmt_p(v['log10_pvalue'])}" for t, v in r["tests"].items() if v["log10_pvalue"] is not None
        )
        lines.append(
            f"{rank:>3}. {r['name']:<{width}}  p={fmt_p(r['log10_pvalue']):<10} {verdict:<11}  ({tests})  {r['source']}"
        )
    return "\n".join(lines)
