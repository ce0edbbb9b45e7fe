"""Every test behind one calling convention, and the registry the CLI, the runner and the README
are generated from (docs/DESIGN.md §5.3).

    result = TESTS[name](a, b, *, key, data=None, layers=None, **options) -> TestResult

``a`` and ``b`` are :class:`jaxind.io.loaded_model.Model` objects; ``key`` a PRNG key (or an int seed, which
means ``key_for(seed, name)``, the key ``run_pair`` uses); ``data`` token ids
``(N, T)`` (or a :class:`jaxind.pair.token_data.TokenData`, which lets CSH and MATCH share one pass) for the
tests that run the models; ``layers`` a layer selection (:mod:`jaxind.models.layer_selection`) for the layer-wise
tests; ``options`` the test's own settings (``num_perms`` for the PERMTESTs, ``steps`` for the
generalized test, ...; an unknown option is a :class:`~jaxind.errors.JaxindError` listing the valid ones,
``TESTS[name].options()``). The array-level kernels underneath (:func:`jaxind.stats.constrained.csu`,
:func:`jaxind.stats.permtest.permtest`, :func:`jaxind.stats.match.match_test`, ...) stay public for code
that holds raw param trees.

:func:`key_for` derives each test's PRNG key from the seed and a CRC-32 of the test's name, so a
test's randomness does not depend on which other tests run or on their order.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any, get_args

import jax
import numpy as np

from jaxind.errors import JaxindError
from jaxind.io.loaded_model import Model
from jaxind.io.shared_vocab import SharedTokens, shared_tokens
from jaxind.models.layer_selection import Layers, resolve_pairs, same_layer_pairs
from jaxind.pair.catalog import CATALOG, DEFAULT_TESTS, TestInfo, TestName, markdown_table, tests_help  # noqa: F401
from jaxind.pair.token_data import TokenData
from jaxind.stats import (
    constrained,
    convention,
    divergence,
    experts,
    generalized,
    grams,
    localized,
    match,
    permtest,
    upcycling,
)
from jaxind.stats.csu_aligned import check_models as _csu_aligned_applies
from jaxind.stats.csu_aligned import csu_aligned as _csu_aligned_kernel
from jaxind.stats.results import TestResult, timed
from jaxind.types import LayerPair

__all__ = [
    "CATALOG",
    "DEFAULT_TESTS",
    "TESTS",
    "TestFn",
    "TestInfo",
    "TestName",
    "TestSpec",
    "key_for",
    "markdown_table",
    "tests_help",
]

# The one calling convention: (a: Model, b: Model, *, key, data=None, layers=None, **options) -> TestResult.
TestFn = Callable[..., TestResult]


@dataclasses.dataclass(frozen=True)
class TestSpec(TestInfo):
    """A registered test: its description (:class:`jaxind.pair.catalog.TestInfo`) and how to run it.

    Attributes:
      run: the test, called as ``run(a, b, key=..., data=..., layers=..., **options)``.
      cli_options: ``{option: attribute of jaxind.pair.runner.Settings}`` the runner passes.
    """

    __test__ = False  # not a pytest test class

    run: TestFn
    cli_options: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def options(self) -> tuple[str, ...]:
        """The test's own keyword options (beyond ``key``, ``data``, ``layers``), read off its signature."""
        fn = _FORWARDS.get(self.name, self.run)
        return convention.option_names(fn, _NOT_OPTIONS)

    def __call__(
        self, a: Model, b: Model, *, key: jax.Array | int, data: Any = None, layers: Layers = None, **options: Any
    ) -> TestResult:
        """Runs the test (see the module doc). ``key`` is a PRNG key, or an int seed: ``key_for(seed, name)``,
        the key :func:`jaxind.pair.runner.run_pair` gives this test for ``Settings(seed=seed)``.

        Raises:
          JaxindError: a layer selection for a whole-model test, an option the test does not take (the
            message lists those it does), or a ``key`` that is neither a PRNG key nor an int.
        """
        if layers is not None and not self.layerwise:
            raise JaxindError(f"{self.name} compares whole models; it takes no layer selection")
        convention.check_options(f"TESTS[{self.name!r}]", options, self.options())
        key = key_for(int(key), self.name) if convention.is_seed(key) else key
        key = convention.check_key(key, f"TESTS[{self.name!r}]")
        return self.run(a, b, key=key, data=data, layers=layers, **options)


def key_for(seed: int, name: str) -> jax.Array:
    """The PRNG key of test ``name`` for ``seed``: ``fold_in(key(seed), crc32(name))``."""
    return jax.random.fold_in(jax.random.key(seed), np.uint32(zlib.crc32(name.encode())))


def _require_glu(a: Model, b: Model, test: str) -> None:
    if not (a.config.glu and b.config.glu):
        raise JaxindError(
            f"{test} reads gate/up activations and needs gated (GLU) MLPs in both models; "
            "use --tests=generalized for GPT-2-style MLPs"
        )


def _moe(a: Model, b: Model) -> bool:
    """Either model is a mixture of experts: the layer-wise tests run their expert versions (jaxind.stats.experts)."""
    return a.config.moe or b.config.moe


def _one_pass(
    a: Model, b: Model, data: Any, layers: Layers, test: str
) -> tuple[grams.PassStats | experts.ExpertPass, tuple[LayerPair, ...]]:
    """The one-pass statistics of the selected layer pairs (shared through ``data``) and the pairs."""
    _require_glu(a, b, test)
    pairs = resolve_pairs(layers, a.config, b.config, test)
    return TokenData.of(data, test).pass_stats(a.params, a.config, b.params, b.config, pairs), pairs


def _same_config(a: Model, b: Model, test: str) -> None:
    if a.config != b.config:
        raise JaxindError(
            f"{test} (PERMTEST on weights) needs two models of the same architecture and config; "
            "use csu/match for models that differ"
        )


@timed
def _csu(a: Model, b: Model, *, key: jax.Array, data: Any = None, layers: Layers = None) -> TestResult:
    if upcycling.applies(a.config, b.config):
        return upcycling.csu(a.params, a.config, b.params, b.config, key=key, layers=layers)
    if _moe(a, b):
        return experts.csu(a.params, a.config, b.params, b.config, key=key, layers=layers)
    return constrained.csu(a.params, a.config, b.params, b.config, key=key, layers=layers)


@timed
def _csu_all(a: Model, b: Model, *, key: jax.Array, data: Any = None, layers: Layers = None) -> TestResult:
    return constrained.csu_all(a.params, a.config, b.params, b.config, key=key)


@timed
def _csh(a: Model, b: Model, *, key: jax.Array, data: Any = None, layers: Layers = None) -> TestResult:
    stats, pairs = _one_pass(a, b, data, layers, "csh")
    if isinstance(stats, experts.ExpertPass) and upcycling.applies(a.config, b.config):
        return upcycling.csh_from_pass(a.params, a.config, b.params, b.config, stats, pairs, key)
    if isinstance(stats, experts.ExpertPass):
        return experts.csh_from_pass(a.params, b.params, stats, pairs, key)
    return constrained.csh_from_pass(stats, pairs, key)


@timed
def _match(
    a: Model, b: Model, *, key: jax.Array, data: Any = None, layers: Layers = None, return_units: bool = False
) -> TestResult:
    start = time.perf_counter()
    stats, pairs = _one_pass(a, b, data, layers, "match")
    seconds_pass = time.perf_counter() - start  # 0 when CSH (or a fingerprint) made the pass already
    if isinstance(stats, experts.ExpertPass) and upcycling.applies(a.config, b.config):
        result = upcycling.match_from_pass(a.params, a.config, b.params, b.config, stats, pairs, key)
    elif isinstance(stats, experts.ExpertPass):
        result = experts.match_from_pass(a.params, b.params, stats, pairs, key)
    else:
        result = match.match_from_pass(stats, pairs, key, return_units)
    return result.replace(extra={**result.extra, "seconds_pass": seconds_pass})


@timed
def _l2(
    a: Model,
    b: Model,
    *,
    key: jax.Array,
    data: Any = None,
    layers: Layers = None,
    num_perms: int = 999,
    layer_shards: int = 0,
) -> TestResult:
    _same_config(a, b, "l2")
    chosen = None if layers is None else same_layer_pairs(resolve_pairs(layers, a.config, b.config, "l2"), "l2")
    return permtest.permtest(
        a.params,
        a.config,
        b.params,
        b.config,
        key=key,
        num_perms=num_perms,
        statistic="l2",
        layers=chosen,
        layer_shards=layer_shards,
    )


@timed
def _mc(
    a: Model,
    b: Model,
    *,
    key: jax.Array,
    data: Any = None,
    layers: Layers = None,
    num_perms: int = 999,
    mc_sequences: int = 4,
) -> TestResult:
    _same_config(a, b, "mc")
    TokenData.of(data, "mc").require_shared_tokens("mc")
    TokenData.of(data, "mc").require_unpadded("mc")
    tokens = TokenData.of(data, "mc").tokens[:mc_sequences]
    return permtest.permtest(
        a.params, a.config, b.params, b.config, key=key, num_perms=num_perms, statistic="mc", tokens=tokens
    )


@timed
def _jsd(a: Model, b: Model, *, key: jax.Array, data: Any = None, layers: Layers = None) -> TestResult:
    vocab = min(a.config.vocab_size, b.config.vocab_size)
    TokenData.of(data, "jsd").require_shared_tokens("jsd")
    TokenData.of(data, "jsd").require_unpadded("jsd")
    return divergence.jsd(a.logits, b.logits, TokenData.of(data, "jsd").batches(), vocab)


@timed
def _localized(
    a: Model,
    b: Model,
    *,
    key: jax.Array,
    data: Any = None,
    layers: Layers = None,
    alpha: float = 0.01,
    heatmap_path: str | None = None,
    memory_budget_bytes: int = 2 * 2**30,
) -> TestResult:
    _require_glu(a, b, "localized testing")
    if _moe(a, b):
        raise JaxindError("localized testing is not implemented for mixtures of experts: use --tests=match per layer")
    batches = TokenData.of(data, "localized testing").batches()
    labels = (str(a.meta.get("source", "model A")), str(b.meta.get("source", "model B")))
    return localized.localized_test(
        a.params,
        a.config,
        b.params,
        b.config,
        batches,
        key=key,
        layers=layers,
        alpha=alpha,
        memory_budget_bytes=memory_budget_bytes,
        heatmap_path=heatmap_path,
        labels=labels,
    )


@timed
def _generalized(
    a: Model, b: Model, *, key: jax.Array, data: Any = None, layers: Layers = None, **options: Any
) -> TestResult:
    return generalized.generalized_test(a.params, a.config, b.params, b.config, key=key, layers=layers, **options)


def _shared_tokens(a: Model, b: Model) -> SharedTokens:
    """The tokens A and B share: by string where both sources have a tokenizer (read once when both name the
    same one), else by id."""
    spec_a, spec_b = a.meta.get("tokenizer"), b.meta.get("tokenizer")
    tok_a = a.tokenizer if spec_a else None
    tok_b = tok_a if spec_b and spec_b == spec_a else (b.tokenizer if spec_b else None)
    return shared_tokens(tok_a, tok_b, a.config.vocab_size, b.config.vocab_size)


@timed
def _csu_aligned(a: Model, b: Model, *, key: jax.Array, data: Any = None, layers: Layers = None) -> TestResult:
    _csu_aligned_applies(a.config, b.config)  # before the tokenizers are read
    return _csu_aligned_kernel(
        a.params, a.config, b.params, b.config, key=key, layers=layers, shared=_shared_tokens(a, b)
    )


_RUNS: Mapping[str, tuple[TestFn, Mapping[str, str]]] = {
    "csu": (_csu, {}),
    "csh": (_csh, {}),
    "csu_all": (_csu_all, {}),
    "l2": (_l2, {"num_perms": "num_perms", "layer_shards": "permtest_layer_shards"}),
    "mc": (_mc, {"num_perms": "num_perms", "mc_sequences": "mc_sequences"}),
    "jsd": (_jsd, {}),
    "match": (_match, {}),
    "localized": (_localized, {"heatmap_path": "heatmap_path"}),
    "generalized": (_generalized, {"steps": "generalized_steps"}),
    "csu_aligned": (_csu_aligned, {}),
}
# A run that forwards **options to a kernel takes that kernel's options; these are not options.
_FORWARDS: Mapping[str, Callable[..., Any]] = {"generalized": generalized.generalized_test}
_NOT_OPTIONS = ("a", "b", "key", "data", "layers", "layer_pairs", "params_a", "cfg_a", "params_b", "cfg_b")
TESTS: Mapping[str, TestSpec] = {
    name: TestSpec(**dataclasses.asdict(info), run=_RUNS[name][0], cli_options=_RUNS[name][1])
    for name, info in CATALOG.items()
}
assert set(TESTS) == set(get_args(TestName)), "every TestName is registered, and only those"
