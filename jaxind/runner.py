"""Runs the chosen tests on one pair of models and assembles the results document.

Data flows one way: models -> tokens -> (weights | one activation pass) -> matchings ->
p-values -> results dict. Activation tests (CSH and MATCH) share a single pass over the data
for both models. A test that cannot run on this pair (e.g. CSU on models of different width)
is recorded with its error and the others still run.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from jaxind import constrained, data, match, permtest, results
from jaxind.errors import JaxindError
from jaxind.loading import Model
from jaxind.testnames import ALL_TESTS, DEFAULT_TESTS  # noqa: F401  (re-exported)

_ACTIVATION_TESTS = ("csh", "match")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to run.

    Attributes:
      tests: names from ALL_TESTS.
      data: the token source (see :class:`jaxind.data.DataSpec`).
      num_perms: T for the PERMTEST statistics (l2, mc).
      batch_size: sequences per forward pass.
      mc_sequences: sequences of the data used by the mode-connectivity loss (T forwards each).
      generalized_steps: distillation steps per MLP block for the generalized test.
      localized: also run MATCH on every layer pair.
      heatmap_path: where localized testing writes its PNG (None: no image).
      alpha: significance level used in the report.
    """

    tests: tuple[str, ...] = DEFAULT_TESTS
    data: data.DataSpec = data.DataSpec()
    num_perms: int = 999
    batch_size: int = 8
    mc_sequences: int = 4
    generalized_steps: int = 2000
    localized: bool = False
    heatmap_path: str | None = None
    alpha: float = 0.05

    def __post_init__(self):
        unknown = [t for t in self.tests if t not in ALL_TESTS]
        if unknown:
            raise JaxindError(f"unknown test(s) {unknown}: choose from {', '.join(ALL_TESTS)}")
        if self.num_perms < 1:
            raise JaxindError("--num_perms must be >= 1")


def _key(seed: int, name: str) -> jax.Array:
    """A per-test key: the same test gets the same randomness whatever else runs."""
    return jax.random.fold_in(jax.random.key(seed), (ALL_TESTS + ("localized",)).index(name))


def _error_record(name: str, error: JaxindError, seconds: float = 0.0) -> dict[str, Any]:
    logging.warning("%s not run: %s", name, error)
    return {"pvalue": None, "log10_pvalue": None, "error": str(error), "seconds": seconds}


def _guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs one test; a JaxindError (the test does not apply to this pair) becomes its record."""
    start = time.perf_counter()
    try:
        out = fn()
    except JaxindError as e:
        return _error_record(name, e, time.perf_counter() - start)
    out.pop("test", None)
    out.setdefault("seconds", time.perf_counter() - start)
    return out


def _same_config(a: Model, b: Model, test: str) -> None:
    if a.config != b.config:
        raise JaxindError(f"{test} (PERMTEST on weights) needs two models of the same architecture and config; "
                          "use csu/match for models that differ")


def _permtest(a: Model, b: Model, statistic: str, settings: Settings, tokens: np.ndarray) -> dict[str, Any]:
    _same_config(a, b, statistic)
    mc_tokens = tokens[: settings.mc_sequences] if statistic == "mc" else None
    r = permtest.permtest(a.params, b.params, a.config, _key(settings.data.seed, statistic), num_perms=settings.num_perms,
                          statistic=statistic, tokens=mc_tokens)
    out = {"pvalue": r.pvalue, "log10_pvalue": r.log10_pvalue, "statistic": r.stat0, "num_perms": r.num_perms,
           "null_mean": float(np.mean(r.stats)), "null_max": float(np.max(r.stats)), "exact": True}
    if r.pvalue_layers is not None:
        out["layers"] = [{"layer_a": l, "layer_b": l, "pvalue": float(p), "log10_pvalue": float(lp), "statistic": float(s)}
                         for l, (p, lp, s) in enumerate(zip(r.pvalue_layers, r.log10_pvalue_layers, r.stat0_layers))]
    return out


def _activation_tests(a: Model, b: Model, wanted: list[str], settings: Settings, tokens: np.ndarray) -> dict[str, dict]:
    """CSH and MATCH from one pass over the data for both models."""
    start = time.perf_counter()
    if not (a.config.glu and b.config.glu):
        raise JaxindError("csh and match read gate/up activations and need gated (GLU) MLPs in both models; "
                          "use --tests=generalized for GPT-2-style MLPs")
    pairs = match.default_layer_pairs(a.config, b.config)
    layers = tuple(l for l, _ in pairs)
    pair_index = tuple((i, i) for i in range(len(pairs)))
    stats = match.accumulate(a.params, a.config, b.params, b.config, data.batches(tokens, settings.batch_size),
                             layers_a=layers, layers_b=layers, pair_index=pair_index)
    pass_seconds = time.perf_counter() - start
    out = {}
    if "csh" in wanted:
        t0 = time.perf_counter()
        out["csh"] = constrained.csh_from_pass(stats, list(pairs), _key(settings.data.seed, "csh"), t0)
        out["csh"]["seconds"] += pass_seconds
    if "match" in wanted:
        t0 = time.perf_counter()
        out["match"] = match.match_from_pass(stats, pairs, _key(settings.data.seed, "match"))
        out["match"]["seconds"] = time.perf_counter() - t0 + pass_seconds
        out["match"]["exact"] = False  # the paper's approximate test: calibrated in simulation, not exact
    return out


def run_pair(a: Model, b: Model, settings: Settings, log: Callable[[str], None] = print,
             tokens: np.ndarray | None = None) -> dict[str, Any]:
    """Runs ``settings.tests`` (and localized testing) on models A and B; returns the results
    document. ``tokens (N, T)`` overrides ``settings.data`` (the demo's byte-level corpus)."""
    if tokens is None:
        tokenizers = (a.tokenizer, b.tokenizer) if settings.data.kind != "random" else (None, None)
        tokens = data.make_tokens(settings.data, a.config.vocab_size, b.config.vocab_size, *tokenizers)
    seed = settings.data.seed
    tests: dict[str, Any] = {}
    for name in settings.tests:
        if name in tests:
            continue
        log(f"running {name} ...")
        if name in _ACTIVATION_TESTS:
            wanted = [t for t in _ACTIVATION_TESTS if t in settings.tests]
            try:
                tests.update(_activation_tests(a, b, wanted, settings, tokens))
            except JaxindError as e:
                tests.update({t: _error_record(t, e) for t in wanted})
            continue
        if name == "csu":
            tests[name] = _guarded(name, lambda: constrained.csu(a.params, a.config, b.params, b.config, _key(seed, "csu")))
        elif name == "csu_all":
            tests[name] = _guarded(name, lambda: constrained.csu_all(a.params, a.config, b.params, b.config, _key(seed, "csu_all")))
        elif name in ("l2", "mc"):
            tests[name] = _guarded(name, lambda name=name: _permtest(a, b, name, settings, tokens))
        elif name == "jsd":
            vocab = min(a.config.vocab_size, b.config.vocab_size)
            tests[name] = _guarded(name, lambda: constrained.jsd(a.logits, b.logits, data.batches(tokens, settings.batch_size), vocab))
        elif name == "generalized":
            from jaxind import generalized

            tests[name] = _guarded(name, lambda: {**generalized.generalized_test(
                a.params, a.config, b.params, b.config, key=_key(seed, "generalized"), steps=settings.generalized_steps),
                "exact": False})
    extra = {}
    if settings.localized:
        from jaxind import localized

        log("running localized MATCH on every layer pair ...")
        extra["localized"] = localized.localized_test(
            a.params, a.config, b.params, b.config, list(data.batches(tokens, settings.batch_size)),
            key=_key(seed, "localized"), heatmap_path=settings.heatmap_path)
    data_info = {**settings.data.describe(), "tokens_shape": list(tokens.shape)}
    return results.make_results(a.summary(), b.summary(), data_info, seed, tests, alpha=settings.alpha,
                                num_perms=settings.num_perms, **extra)
