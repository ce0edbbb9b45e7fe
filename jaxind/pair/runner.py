"""Runs the chosen tests on one pair of models: :func:`run_pair` -> :class:`jaxind.pair.result.PairResult`.

Data flows one way (docs/DESIGN.md §3): models -> tokens -> each registered test
(:data:`jaxind.pair.registry.TESTS`, called the one way every test is called) -> one PairResult.
Activation tests (CSH and MATCH) share a single pass over the data for both models through one
:class:`jaxind.pair.token_data.TokenData`. A test that cannot run on this pair (e.g. CSU on models of
different width) is recorded with its error and the others still run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from jaxind.errors import JaxindError
from jaxind.io import token_source as data
from jaxind.io.loaded_model import Model
from jaxind.models.layer_selection import LayerSelectionError
from jaxind.pair.catalog import ALL_TESTS, DEFAULT_TESTS  # noqa: F401  (re-exported)
from jaxind.pair.registry import TESTS, TestSpec, key_for
from jaxind.pair.result import PairResult
from jaxind.pair.token_data import TokenData
from jaxind.stats.results import TestResult
from jaxind.types import LayerPair

__all__ = ["ALL_TESTS", "DEFAULT_TESTS", "Settings", "run_pair", "run_test"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to run.

    Attributes:
      tests: names from :data:`jaxind.pair.registry.TESTS`.
      data: the token source (see :class:`jaxind.io.token_source.DataSpec`).
      num_perms: T for the PERMTEST statistics (l2, mc).
      batch_size: sequences per forward pass.
      mc_sequences: sequences of the data used by the mode-connectivity loss (T forwards each).
      generalized_steps: distillation steps per MLP block for the generalized test.
      heatmap_path: where localized testing writes its PNG (None: no image).
      alpha: significance level used in the report.
      layers: layers to test (``--layers``; each against the same layer of B), or None.
      layer_pairs: explicit ``(layer_a, layer_b)`` pairs (``--layer_pairs``), or None.
      permtest_layer_shards: devices per group of PERMTEST-L2 draws that split the layers between them
        (0: 1, and one device on CPU: :func:`jaxind.stats.permtest.default_draw_devices`).
    """

    tests: tuple[str, ...] = DEFAULT_TESTS
    data: data.DataSpec = data.DataSpec()
    num_perms: int = 999
    batch_size: int = 8
    mc_sequences: int = 4
    generalized_steps: int = 2000
    heatmap_path: str | None = None
    alpha: float = 0.05
    layers: tuple[int, ...] | None = None
    layer_pairs: tuple[LayerPair, ...] | None = None
    permtest_layer_shards: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tests if t not in TESTS]
        if unknown:
            raise JaxindError(f"unknown test(s) {unknown}: choose from {', '.join(TESTS)}")
        if self.num_perms < 1:
            raise JaxindError("--num_perms must be >= 1")
        if self.layers is not None and self.layer_pairs is not None:
            raise LayerSelectionError("pass --layers or --layer_pairs, not both")

    def options(self, spec: TestSpec) -> dict[str, Any]:
        """The keyword arguments ``spec`` takes from these settings (its layer selection included)."""
        out = {option: getattr(self, attribute) for option, attribute in spec.cli_options.items()}
        selection = self.layer_pairs if self.layer_pairs is not None else self.layers
        if spec.layerwise and selection is not None:
            out["layers"] = selection
        return out


def run_test(spec: TestSpec, a: Model, b: Model, settings: Settings, tokens: TokenData) -> TestResult:
    """Runs one registered test; a JaxindError (the test does not apply to this pair) becomes its
    record (:meth:`TestResult.failed`)."""
    start = time.perf_counter()
    try:
        return spec(a, b, key=key_for(settings.data.seed, spec.name), data=tokens, **settings.options(spec))
    except JaxindError as e:
        logging.warning("%s not run: %s", spec.name, e)
        return TestResult.failed(spec.name, e, time.perf_counter() - start)


def run_pair(
    a: Model,
    b: Model,
    settings: Settings,
    log: Callable[[str], None] = print,
    tokens: np.ndarray | TokenData | None = None,
    timing: dict[str, float] | None = None,
    **extra: Any,
) -> PairResult:
    """Runs ``settings.tests`` on models A and B; returns their :class:`PairResult`. ``tokens (N, T)``
    overrides ``settings.data`` (the demo's byte-level corpus); a :class:`TokenData` may carry the
    models' fingerprints (a sweep). ``timing``: gets the seconds spent making the tokens (``tokens``) and in
    each test (``test_<name>``; the result's ``timing`` is this dict when given). ``extra``: more top-level keys of the
    document."""
    start = time.perf_counter()
    if tokens is None:
        tokenizers = (a.tokenizer, b.tokenizer) if settings.data.kind != "random" else (None, None)
        tokens = data.make_tokens(settings.data, a.config.vocab_size, b.config.vocab_size, *tokenizers)
    token_data = tokens if isinstance(tokens, TokenData) else TokenData.wrap(tokens, settings.batch_size)
    tokens = token_data.tokens
    if token_data.aligned is not None:
        log(f"models A and B have different tokenizers: {token_data.aligned.count:,} aligned text positions")
    keep_timing = timing is not None
    timing = {} if timing is None else timing
    timing["tokens"] = time.perf_counter() - start
    tests: dict[str, TestResult] = {}
    for name in dict.fromkeys(settings.tests):
        log(f"running {name} ...")
        tests[name] = run_test(TESTS[name], a, b, settings, token_data)
        timing[f"test_{name}"] = tests[name].seconds
    data_info = {**settings.data.describe(), "tokens_shape": list(tokens.shape)}
    if token_data.aligned is not None:  # different tokenizers: what was aligned (jaxind.io.alignment)
        data_info["alignment"] = token_data.aligned.describe()
    return PairResult(
        model_a=a.summary(),
        model_b=b.summary(),
        data=data_info,
        seed=settings.data.seed,
        tests=tests,
        alpha=settings.alpha,
        timing=timing if keep_timing else None,
        extra={"num_perms": settings.num_perms, **extra},
    )
