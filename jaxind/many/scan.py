"""One suspect against many references: ``python -m jaxind.main --model_a=SUSPECT --reference=REFS``.

Ranks the reference models by the evidence that the suspect derives from them (docs/DESIGN.md
§5.10). ``--reference`` is a YAML file (a ``models:`` list as in a sweep file, and optionally its
``data:``), a sweep's output folder (its models and its reference tokens), or a folder holding one
model source per entry (named after the entry). References are converted and fingerprinted once,
in the cache, and reused by every later scan or sweep on the same tokens; the suspect costs one
conversion and one forward pass, and each reference then matmuls and LAPs.

A reference's evidence is its pair p-value, the Bonferroni minimum over the tests that gave one
(``min(1, k * min_t p_t)``); the references' p-values are adjusted with Holm's step-down and a
reference is ``dependent`` when its adjusted p-value is at most ``--alpha``, and the document's ``dependent``
lists every such reference (a merge has several parents; printed as ``derived from: ...``). With ``localized``
among the tests, ``layer_parents`` says which reference each layer of the suspect comes from
(:func:`jaxind.stats.localized.layer_parents`, docs/DESIGN.md §5.15). The ranking lists the
strongest evidence first: a byte-identical copy of the suspect (same content key) first, then by p-value
(p-values at the same floor, e.g. the exact bound ``2/n!`` per layer, by the mean per-layer Spearman rho
of the matching tests: a copy's is 1); references that failed come last. A folder's entries whose names
sanitise alike get distinct names (``a_b``, ``a_b-2``). Explicit data flags (``--data``,
``--num_sequences``, ``--seq_len``) win over the tokens a sweep folder or a YAML ``data:`` brings.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import math
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jaxind
from jaxind.errors import JaxindError
from jaxind.many.sweep_config import ModelEntry, load_references

__all__ = ["DEFAULT_SCAN_TESTS", "References", "format_ranking", "read_references", "scan", "format_layer_parents"]

if TYPE_CHECKING:
    from jaxind.pair.result import PairResult

DEFAULT_SCAN_TESTS = ("csu", "match")


@dataclasses.dataclass(frozen=True)
class References:
    """What ``--reference`` names: the models, and data settings or stored tokens when it has them."""

    models: tuple[ModelEntry, ...]
    data: dict[str, Any] | None = None
    tokens_path: str | None = None


def _entry_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name.removesuffix(".gguf")) or "model"


def _entry_names(entries: list[str]) -> list[str]:
    """Distinct names for a folder's entries: each sanitised (:func:`_entry_name`); an entry whose name was
    already clean keeps it, and one whose sanitised name is taken gets the first free ``-2``, ``-3``, ...
    (``a b`` beside ``a_b`` becomes ``a_b-2``)."""
    clean = {n for n in entries if _entry_name(n) == n}
    taken: set[str] = set(clean)
    out = []
    for entry in entries:
        name = _entry_name(entry)
        if entry not in clean:
            base, k = name, 2
            while name in taken:
                name, k = f"{base}-{k}", k + 1
            taken.add(name)
        out.append(name)
    return out


def read_references(arg: str) -> References:
    """Reads ``--reference`` (see the module doc); no model is loaded.

    Raises:
      JaxindError: missing, empty, or an unreadable YAML file.
    """
    from jaxind.many.sweep_summary import read_json

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
        models = tuple(ModelEntry(name, os.path.join(path, n)) for name, n in zip(_entry_names(chosen), chosen))
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


def _tokens(
    refs: References, suspect: ModelEntry, spec: Any, data_flags: bool, log: Callable[[str], None]
) -> tuple[Any, dict[str, Any]]:
    """The reference tokens: a sweep's stored ones, the YAML's data settings over the references
    (the sweep's tokens, so its fingerprints are reused), or the flags' over suspect and references:
    always the flags' when ``data_flags`` (the user gave data flags explicitly). ``log`` says which."""
    import numpy as np

    from jaxind.many import sweep
    from jaxind.many.sweep_summary import read_json
    from jaxind.stats import fingerprint

    stored = "its sweep's stored tokens" if refs.tokens_path is not None else "its data: settings"
    if data_flags and (refs.tokens_path is not None or refs.data is not None):
        log(f"reference tokens: from the data flags, not {stored} (fingerprints are made on them once)")
    elif refs.tokens_path is not None or refs.data is not None:
        log(f"reference tokens: --reference's, from {stored} (pass --data/--num_sequences/--seq_len to use others)")
    if refs.tokens_path is not None and not data_flags:
        info = read_json(os.path.join(os.path.dirname(refs.tokens_path), "sweep.json"))
        return np.load(refs.tokens_path), info
    if refs.data is not None and not data_flags:
        tokens, info = sweep.make_tokens(refs.models, refs.data)
    else:
        tokens, info = sweep.make_tokens((suspect, *refs.models), _data_settings(spec, suspect.name))
    return tokens, {**info, "token_hash": fingerprint.token_hash(tokens)}


def _prepare(entry: ModelEntry, tokens: Any, info: dict[str, Any], settings: Any, dtype: str, computed: dict) -> Any:
    """Converts (once) and fingerprints (once) one model; returns ``(model, fingerprint or None)``."""
    from jaxind.many import modelstore, sweep

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


def _evidence(result: PairResult) -> float | None:
    logs = [t.log10_pvalue for t in result.tests.values() if t.log10_pvalue is not None and not t.error]
    return None if not logs else min(0.0, min(logs) + math.log10(len(logs)))


def _closeness(result: PairResult) -> float:
    """Mean per-layer Spearman rho of the matching tests (1 for a copy): orders references whose
    p-values reach the same floor (an exact bound such as ``2/n!`` per layer)."""
    rhos = [
        float(layer.statistic)
        for name, test in result.tests.items()
        if name in ("csu", "csh", "match") and not test.error
        for layer in test.layers
        if layer.statistic is not None and not math.isnan(layer.statistic)
    ]
    return sum(rhos) / len(rhos) if rhos else 0.0


def _rank_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """Strongest evidence first: a byte-identical copy of the suspect (its p-value sits at the tests' floor, which
    a fine-tune reaches too), then the p-value (its log10, which does not underflow), then, where p-values meet at
    the same floor, the matching tests' mean rho, then the name; failures last."""
    tested = row["log10_pvalue"] is not None
    return (not tested, not row["identical"], row["log10_pvalue"] or 0.0, -(row["closeness"] or 0.0), row["name"])


def scan(
    suspect: str,
    refs: References,
    settings: Any,
    *,
    dtype: str = "float32",
    log: Callable[[str], None] = print,
    data_flags: bool = False,
) -> dict[str, Any]:
    """Tests the suspect against every reference; returns the scan document (``ranking`` first to last).
    ``data_flags``: make the tokens from ``settings.data`` even where ``refs`` brings its own.

    Raises:
      JaxindError: the suspect cannot be loaded or fingerprinted, or no tokens can be made.
    """
    from jaxind.io import token_source as data
    from jaxind.many import modelstore
    from jaxind.stats import pvalues
    from jaxind.stats.results import SCHEMA_VERSION

    entry = ModelEntry("suspect", suspect)
    tokens, info = _tokens(refs, entry, settings.data, data_flags, log)
    d = info["data"]
    spec = data.DataSpec(d["kind"], d["path"], d["num_sequences"], d["seq_len"], d["seed"])
    settings = dataclasses.replace(settings, data=spec, heatmap_path=None)
    computed: dict[str, list[str]] = {"converted": [], "fingerprinted": []}
    stored_s, fp_s = _prepare(entry, tokens, info, settings, dtype, computed)
    model_s = stored_s.load()
    rows, documents = [], {}
    for ref in refs.models:
        row: dict[str, Any] = {"name": ref.name, "source": ref.source, "error": None, "tests": {}, "closeness": None}
        row["identical"] = False
        try:
            stored_r, fp_r = _prepare(ref, tokens, info, settings, dtype, computed)
            row["identical"] = stored_r.key == stored_s.key  # byte-identical files (the content key)
            result = modelstore.run_stored_pair(stored_r.load(), model_s, settings, tokens, (fp_r, fp_s))
            documents[ref.name] = result.to_json()
            row["tests"] = {
                t: {k: r.get(k) for k in ("pvalue", "log10_pvalue", "error")}
                for t, r in documents[ref.name]["tests"].items()
            }
            row["log10_pvalue"] = _evidence(result)
            row["closeness"] = _closeness(result)
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
    ranking = sorted(rows, key=_rank_key)
    keys = ["name", "source", "pvalue", "log10_pvalue", "dependent", "adjusted_log10_pvalue", "closeness"]
    keys += ["identical", "tests"]
    keys.append("error")
    parents = _layer_parents(documents, settings) if "localized" in settings.tests else None
    return {
        "schema_version": SCHEMA_VERSION,
        "jaxind_version": jaxind.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "suspect": stored_s.summary(),
        "alpha": settings.alpha,
        "correction": "holm over references; per reference the Bonferroni minimum over its tests",
        "tests": list(settings.tests),
        "data": {**info["data"], "tokens_shape": list(tokens.shape), "token_hash": info.get("token_hash")},
        "computed": computed,
        "ranking": [{k: r[k] for k in keys} for r in ranking],
        "dependent": [r["name"] for r in ranking if r["dependent"]],
        "layer_parents": parents,
        "results": documents,
    }


def _layer_parents(documents: dict[str, dict[str, Any]], settings: Any) -> dict[str, Any] | None:
    """With ``localized`` among the tests: which reference each layer of the suspect comes from
    (:func:`jaxind.stats.localized.layer_parents` over every reference localized testing ran on, Bonferroni over
    them at ``settings.alpha``); None where it ran on none."""
    from jaxind.stats import localized

    records = {
        name: doc["tests"]["localized"]
        for name, doc in documents.items()
        if "log10_pvalue_matrix" in doc["tests"].get("localized", {})  # absent where the test failed
    }
    if not records:
        return None
    each = settings.alpha / len(records)
    return {"alpha_per_reference": each, "layers": localized.layer_parents(records, each)}


def format_ranking(document: dict[str, Any]) -> str:
    """One line per reference, strongest evidence first."""
    from jaxind.many.provenance import fmt_p

    rows = document["ranking"]
    width = max([len(r["name"]) for r in rows] + [4])
    lines = [f"references ranked by evidence that the suspect derives from them (Holm at alpha={document['alpha']}):"]
    for rank, r in enumerate(rows, 1):
        if r["error"]:
            lines.append(f"{rank:>3}. {r['name']:<{width}}  error: {r['error']}")
            continue
        verdict = "dependent" if r["dependent"] else "no evidence"
        if r.get("identical"):
            verdict += " (identical files to the suspect)"
        tests = ", ".join(
            f"{t} {fmt_p(v['log10_pvalue'])}" for t, v in r["tests"].items() if v["log10_pvalue"] is not None
        )
        lines.append(
            f"{rank:>3}. {r['name']:<{width}}  p={fmt_p(r['log10_pvalue']):<10} {verdict:<11}  ({tests})  {r['source']}"
        )
    found = document.get("dependent", [r["name"] for r in rows if r["dependent"]])
    lines.append(f"derived from: {', '.join(found)}" if found else "derived from: none of the references")
    if document.get("layer_parents"):
        lines += format_layer_parents(document["layer_parents"])
    return "\n".join(lines)


def _runs(layers: dict[str, dict[str, Any] | None]) -> list[tuple[list[int], dict[str, Any] | None]]:
    """The suspect's layers in runs: consecutive layers from consecutive layers of one reference (or from none)."""
    runs: list[tuple[list[int], dict[str, Any] | None]] = []
    last_key: Any = object()
    for b, src in ((int(k), v) for k, v in layers.items()):
        key = None if src is None else (src["parent"], src["layer"] - b)
        if runs and key == last_key and b == runs[-1][0][-1] + 1:
            runs[-1][0].append(b)
        else:
            runs.append(([b], src))
        last_key = key
    return runs


def format_layer_parents(parents: dict[str, Any]) -> list[str]:
    """Which reference each layer of the suspect comes from, a line per run of consecutive layers."""
    from jaxind.many.provenance import fmt_p

    def span(first: int, last: int) -> str:
        return str(first) if first == last else f"{first}-{last}"

    lines = [f"layers of the suspect by reference (localized MATCH, alpha {parents['alpha_per_reference']:.3g} each):"]
    for bs, src in _runs(parents["layers"]):
        layers = "layer" + ("s" if len(bs) > 1 else "") + " " + span(bs[0], bs[-1])
        if src is None:
            lines.append(f"  {layers:<14} no reference")
            continue
        weakest = max(parents["layers"][str(b)]["log10_pvalue"] for b in bs)
        source = f"{src['parent']} layer{'s' if len(bs) > 1 else ''} {span(src['layer'], src['layer'] + len(bs) - 1)}"
        lines.append(f"  {layers:<14} from {source}  (p <= {fmt_p(weakest)})")
    return lines
