"""Dense vs mixture of experts (sparse upcycling), and mixtures of experts of different expert counts
(docs/DESIGN.md §5.13, "Upcycling").

Sparse upcycling turns a dense model into a MoE by copying each layer's MLP into every expert (then training on);
fine-grained variants split it into narrower experts. So a MoE layer's experts are compared with the dense layer's
MLP one by one. A layer is read as a list of **blocks**, each a SwiGLU MLP with its own hidden units: a dense layer
is one block (``"mlp"``), a MoE layer one block per routed expert (``0 .. E-1``) plus its shared expert
(``"shared"``, Qwen2-MoE). For a layer pair, every block of A is tested against every block of B, with the units
matched by a (rectangular) LAP, as for two dense MLPs:

- **CSU**: cosine of the blocks' up-projection weight columns, then Spearman of the matching (exact per block pair);
- **CSH**: the same on up-projection activations over the tokens;
- **MATCH**: the gate and the up matchings of the two blocks on the same tokens, Spearman of one against the other
  (approximate, as MATCH).

Activations come from the one pass of :mod:`jaxind.stats.experts` (input Grams: every block of a layer reads the same
normed input, so a block's unit Grams are ``W_A^T (x_A^T x_B) W_B``).

**Combining.** Let ``n_in <= n_out`` be the two sides' block counts (dense vs MoE: ``n_in = 1``). For each block
``j`` of the larger side, ``q_j = min(1, n_in min_i p_ij)`` (Bonferroni over the smaller side); the layer's p-value
is Sidak's ``1 - (1 - min_j q_j)^n_out``; Fisher over layers. Validity (CSU, CSH): under H0 the side with ``n_out``
blocks is distributed as its image under a uniform group element, whose unit permutations are uniform and
independent across its blocks and of everything else; ``q_j`` depends on the data only through block ``j``'s unit
permutation (given the rest), so the ``q_j`` are independent, each valid by Bonferroni, and Sidak's formula is
valid (exact when ``n_in = 1``: then the ``q_j`` are the uniform per-expert p-values themselves). Layers have
independent group elements, so Fisher is exact as for dense CSU. MATCH's per-block p-values are approximate as
MATCH's, and combined the same way.

**Which experts derive from which layer**: every block pair's own p-value is valid, so Holm's step-down over all
of them (all layers) at ``alpha`` names the derived blocks with the family-wise error bounded by ``alpha``
(``extra["derived_experts"]``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxind.errors import JaxindError
from jaxind.models import model as model_lib
from jaxind.models.config import ModelConfig
from jaxind.models.layer_selection import Layers, resolve_pairs
from jaxind.stats import constrained, convention, experts, match, pvalues
from jaxind.stats import grams as grams_lib
from jaxind.stats.results import LayerResult, TestResult, fisher_result, timed
from jaxind.types import LayerPair, Params

__all__ = [
    "ALPHA",
    "Block",
    "Label",
    "NOTE",
    "PairTest",
    "applies",
    "blocks",
    "combine_layer",
    "csh_from_pass",
    "csu",
    "derived_experts",
    "format_derived",
    "match_from_pass",
    "sidak_log10",
    "sparse_upcycle",
]

ALPHA = 0.01  # the level of the derived-experts map
NOTE = (
    "{how}: every MLP block (dense MLP, each expert, the shared expert) of A against every block of B, units "
    "matched by LAP; per layer, Bonferroni over the side with fewer blocks, then Sidak over the other; Fisher over "
    "layers (docs/DESIGN.md 5.13)"
)

Label = int | str  # an expert's index, "mlp" (a dense layer) or "shared"


def applies(cfg_a: ModelConfig, cfg_b: ModelConfig) -> bool:
    """The pair's layer-wise tests compare blocks with blocks here: a dense model vs a MoE, or two MoEs with
    different expert counts or one shared expert less (two MoEs alike stay with :mod:`jaxind.stats.experts`)."""
    if cfg_a.moe != cfg_b.moe:
        return True
    return cfg_a.moe and (cfg_a.n_experts != cfg_b.n_experts or cfg_a.shared_expert != cfg_b.shared_expert)


class Block(NamedTuple):
    """One SwiGLU MLP of a layer, by reference into the param tree: ``label``; the stacked gate and up leaves
    (``(L, d, h)``, or ``(L, E, d, h)`` for routed experts; gate None without a GLU), ``layer`` and ``expert``
    (the index into the expert axis, None for a dense MLP or the shared expert). Nothing is sliced out eagerly."""

    label: Label
    gate: jax.Array | None
    up: jax.Array
    layer: int
    expert: int | None


def blocks(params: Params, cfg: ModelConfig, layer: int) -> list[Block]:
    """The MLP blocks of one layer: the dense MLP, or each routed expert and the shared expert."""
    leaves = params["layers"]
    if not cfg.moe:
        return [Block("mlp", leaves["gate"] if cfg.glu else None, leaves["up"], layer, None)]
    out = [Block(e, leaves["expert_gate"], leaves["expert_up"], layer, e) for e in range(cfg.n_experts)]
    if cfg.shared_expert:
        out.append(Block("shared", leaves["gate"], leaves["up"], layer, None))
    return out


@functools.partial(jax.jit, static_argnames=("routed_a", "routed_b", "cosine"))
def _block_pair(
    leaf_a, layer_a, expert_a, leaf_b, layer_b, expert_b, space: experts.Space, *, routed_a, routed_b, cosine
):
    """One block of each model (indices traced: one compilation per shape), read in ``space``: their units'
    cosines ``(h_A, h_B)`` or ``(inner, sq_norm_a, sq_norm_b)``."""
    w_a = (leaf_a[layer_a, expert_a] if routed_a else leaf_a[layer_a]).astype(jnp.float32)
    w_b = (leaf_b[layer_b, expert_b] if routed_b else leaf_b[layer_b]).astype(jnp.float32)
    grams = experts.unit_grams(w_a, w_b, space)
    return experts._cosines(*grams) if cosine else grams


def _pair_of(a: Block, b: Block, proj: str, space: experts.Space, cosine: bool):
    leaf_a, leaf_b = getattr(a, proj), getattr(b, proj)
    return _block_pair(
        leaf_a, a.layer, a.expert or 0, leaf_b, b.layer, b.expert or 0, space,
        routed_a=a.expert is not None, routed_b=b.expert is not None, cosine=cosine,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Combining the block pairs of a layer, in log10.


def sidak_log10(log10_p: float, n: int) -> float:
    """``log10(1 - (1 - p)^n)``, finite where ``p`` underflows (then ``log10(n p)`` to float precision)."""
    if n == 1 or log10_p == 0.0:
        return min(0.0, log10_p)
    if log10_p < -15:
        return min(0.0, math.log10(n) + log10_p)
    p = 10.0**log10_p
    return min(0.0, math.log10(-math.expm1(n * math.log1p(-p))))


def combine_layer(log10_p: np.ndarray) -> tuple[float, tuple[int, int]]:
    """The layer's log10 p-value from its block pairs' ``log10_p (n_a, n_b)`` (module doc) and the block pair
    that gave it."""
    n_a, n_b = log10_p.shape
    inner_axis = 0 if n_a <= n_b else 1  # Bonferroni over the side with fewer blocks
    n_in, n_out = log10_p.shape[inner_axis], log10_p.shape[1 - inner_axis]
    q = np.minimum(0.0, math.log10(n_in) + np.min(log10_p, axis=inner_axis))
    best = int(np.argmin(q))
    inner = int(np.argmin(np.take(log10_p, best, axis=1 - inner_axis)))
    pair = (inner, best) if inner_axis == 0 else (best, inner)
    return sidak_log10(float(q[best]), n_out), pair


# --------------------------------------------------------------------------------------------
# The tests.

PairTest = Callable[[Block, Block, experts.Space, jax.Array], pvalues.SpearmanResult]


def _csu_pair(a: Block, b: Block, space: experts.Space, key: jax.Array) -> pvalues.SpearmanResult:
    cos = np.asarray(_pair_of(a, b, "up", space, cosine=True))
    return constrained.matched_spearman(cos, key)[0]


def _match_pair(a: Block, b: Block, space: experts.Space, key: jax.Array) -> pvalues.SpearmanResult:
    d_gate, d_up = (
        grams_lib.sq_distances(*(np.asarray(x) for x in _pair_of(a, b, proj, space, cosine=False)))
        for proj in ("gate", "up")
    )
    return match.match_units(d_gate, d_up, key).spearman


def _layer_record(
    la: int, lb: int, blocks_a: list[Block], blocks_b: list[Block], space: experts.Space, key: jax.Array, test: PairTest
) -> LayerResult:
    """Every block of A against every block of B on one layer pair; the layer's combined record."""
    grid = list(itertools.product(range(len(blocks_a)), range(len(blocks_b))))
    logs = np.zeros((len(blocks_a), len(blocks_b)))
    pairs: list[dict[str, Any]] = []
    for (i, j), k in zip(grid, jax.random.split(key, len(grid))):
        result = test(blocks_a[i], blocks_b[j], space, k)
        logs[i, j] = result.log10_pvalue
        pairs.append(
            {
                "expert_a": blocks_a[i].label,
                "expert_b": blocks_b[j].label,
                "statistic": float(result.rho),
                "log10_pvalue": float(result.log10_pvalue),
            }
        )
    log10_p, (i, j) = combine_layer(logs)
    return LayerResult(
        layer_a=la,
        layer_b=lb,
        pvalue=10.0**log10_p,
        log10_pvalue=log10_p,
        statistic=pairs[i * len(blocks_b) + j]["statistic"],
        extra={"part": "blocks", "best": [blocks_a[i].label, blocks_b[j].label], "block_pairs": pairs},
    )


def derived_experts(records: Sequence[LayerResult], alpha: float = ALPHA) -> list[dict[str, Any]]:
    """The block pairs whose Holm-adjusted p-value (over every block pair of every layer) is at most ``alpha``:
    ``{"layer_a", "layer_b", "expert_a", "expert_b", "log10_pvalue"}`` (adjusted), strongest first."""
    flat = [(r, p) for r in records for p in r.extra["block_pairs"]]
    if not flat:
        return []
    adjusted = pvalues.adjust_log10([p["log10_pvalue"] for _, p in flat], "holm")
    out = [
        {
            "layer_a": r.layer_a,
            "layer_b": r.layer_b,
            "expert_a": p["expert_a"],
            "expert_b": p["expert_b"],
            "log10_pvalue": float(adj),
        }  # fmt: skip
        for (r, p), adj in zip(flat, adjusted)
        if adj <= math.log10(alpha)
    ]
    return sorted(out, key=lambda row: row["log10_pvalue"])


def _name(label: Label) -> str:
    return {"mlp": "MLP", "shared": "shared expert"}.get(str(label), f"expert {label}")


def format_derived(tests: dict[str, Any], limit: int = 12) -> list[str]:
    """Report lines naming the derived experts of each test that has them (results-document form)."""
    lines = []
    for name, test in tests.items():
        derived = test.get("derived_experts")
        if test.get("error") or not derived:
            continue
        lines += ["", f"{name}: {len(derived)} MLP block pairs derived (Holm at alpha={ALPHA}), strongest first:"]
        lines += [
            f"  B layer {d['layer_b']:>3} {_name(d['expert_b']):>13} <- A layer {d['layer_a']:>3} "
            f"{_name(d['expert_a'])} (log10 p = {d['log10_pvalue']:.1f})"
            for d in derived[:limit]
        ]
        if len(derived) > limit:
            lines.append(f"  ... and {len(derived) - limit} more (results JSON: derived_experts)")
    return lines


def _run(
    test_name: str,
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    pairs: Sequence[LayerPair],
    key: jax.Array,
    space_of: Callable[[int], experts.Space],
    test: PairTest,
    **extra: Any,
) -> TestResult:
    records = [
        _layer_record(la, lb, blocks(params_a, cfg_a, la), blocks(params_b, cfg_b, lb), space_of(p), k, test)
        for p, ((la, lb), k) in enumerate(zip(pairs, jax.random.split(key, len(pairs))))
    ]
    exact = test_name != "match"
    note = NOTE.format(how="exact (conservative for two MoEs)" if exact else "approximate, as MATCH")
    return fisher_result(test_name, records, exact=exact, note=note, derived_experts=derived_experts(records), **extra)


@timed
def csu(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    *legacy: Any,
    key: jax.Array | None = None,
    layers: Layers = None,
) -> TestResult:
    """CSU block by block (module doc): up-projection weight columns of every block pair. Exact."""
    key, layers = convention.key_and_layers("upcycling.csu", legacy, key, layers)
    if cfg_a.d_model != cfg_b.d_model:
        raise JaxindError(
            f"CSU compares weight rows, so it needs the same residual width ({cfg_a.d_model} vs {cfg_b.d_model}): "
            "use --tests=match for models of different widths"
        )
    pairs = resolve_pairs(layers, cfg_a, cfg_b, "CSU")
    return _run("csu", params_a, cfg_a, params_b, cfg_b, pairs, key, lambda p: experts.WEIGHTS, _csu_pair)


def _require_glu(cfg_a: ModelConfig, cfg_b: ModelConfig, test: str) -> None:
    if not (cfg_a.glu and cfg_b.glu):
        raise JaxindError(f"{test} reads gate/up activations and needs gated (GLU) MLPs in both models")


@timed
def csh_from_pass(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    stats: experts.ExpertPass,
    pairs: Sequence[LayerPair],
    key: jax.Array,
) -> TestResult:
    """CSH block by block from one pass (:func:`jaxind.stats.experts.accumulate`): up-projection activations. Exact."""
    return _run(
        "csh", params_a, cfg_a, params_b, cfg_b, pairs, key, stats.space, _csu_pair, num_tokens=int(stats.count)
    )


@timed
def match_from_pass(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    stats: experts.ExpertPass,
    pairs: Sequence[LayerPair],
    key: jax.Array,
) -> TestResult:
    """MATCH block by block from one pass: the gate and up unit matchings of every block pair on the same
    tokens, Spearman of one against the other. Approximate, as MATCH."""
    _require_glu(cfg_a, cfg_b, "MATCH")
    return _run(
        "match", params_a, cfg_a, params_b, cfg_b, pairs, key, stats.space, _match_pair, num_tokens=int(stats.count)
    )


# --------------------------------------------------------------------------------------------
# Building an upcycled model (tests, benchmarks).


def sparse_upcycle(
    params: Params,
    cfg: ModelConfig,
    seed: int = 0,
    *,
    n_experts: int = 4,
    experts_per_token: int = 2,
    noise: float = 0.0,
    router_std: float = 0.02,
) -> tuple[Params, ModelConfig]:
    """Sparse upcycling (Komatsuzaki et al., 2023) of a dense SwiGLU model (llama family) into a Mixtral: every
    expert a copy of its layer's MLP plus ``noise * std(w)`` Gaussian noise, a random ``N(0, router_std^2)``
    router, everything else shared. Host numpy (no compilation), keyed by ``seed``. Returns ``(params, config)``."""
    if cfg.moe or not cfg.glu or cfg.family not in ("llama", "mistral"):
        raise JaxindError(f"sparse_upcycle takes a dense llama/mistral model, got {cfg.family}")
    moe_cfg = cfg.replace(
        family="mixtral", d_ff=0, n_experts=n_experts, experts_per_token=experts_per_token, d_expert=cfg.d_ff,
        norm_topk_prob=True,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    layers = dict(params["layers"])
    for name in ("gate", "up", "down"):
        w = np.asarray(layers.pop(name), np.float32)
        copies = np.repeat(w[:, None], n_experts, axis=1)
        layers[f"expert_{name}"] = copies + noise * float(w.std()) * rng.standard_normal(copies.shape, np.float32)
    layers["router"] = router_std * rng.standard_normal((cfg.n_layers, cfg.d_model, n_experts), np.float32)
    out = {**params, "layers": layers}
    shapes = {path: tuple(np.shape(leaf)) for path, leaf in model_lib.flatten_paths(out).items()}
    assert shapes == model_lib.param_shapes_flat(moe_cfg), "sparse_upcycle built a tree that does not fit the config"
    return out, moe_cfg
