"""What each test is, without running anything: names, settings, what the p-value means.

Kept free of heavy imports (no JAX), so the CLI can validate ``--tests`` and print ``--help``
before it loads anything. :mod:`jaxind.pair.registry` attaches the functions that run each test; the
README table and the ``--tests`` help are generated from here (docs/DESIGN.md §5.3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args

__all__ = [
    "ALL_TESTS",
    "CATALOG",
    "DEFAULT_TESTS",
    "Setting",
    "TestInfo",
    "TestName",
    "markdown_table",
    "tests_help",
    "APPLICABILITY",
    "PAIR_KINDS",
    "pair_kinds",
    "not_applicable",
    "applicability_table",
]

TestName = Literal["csu", "csh", "csu_all", "l2", "mc", "jsd", "match", "localized", "generalized", "csu_aligned"]
Setting = Literal["constrained", "unconstrained", "none"]


@dataclasses.dataclass(frozen=True)
class TestInfo:
    """A test's description.

    Attributes:
      name: the test's name (``--tests`` value, key in the results JSON).
      setting: "constrained" (the suspect did not permute/rotate weights), "unconstrained"
        (robust to that), or "none" (not a test).
      pvalue: what the p-value is (README table).
      compares: what the test compares (README table).
      meaning: a few words for the report table.
      needs_data: the test runs the models on tokens.
      layerwise: the test takes a layer selection (``--layers`` / ``--layer_pairs``).
    """

    __test__ = False  # not a pytest test class

    name: TestName
    setting: Setting
    pvalue: str
    compares: str
    meaning: str
    needs_data: bool
    layerwise: bool


_SPEARMAN = "exact (Spearman of a uniformly random matching under H0; Fisher over layers)"
_INFOS = (
    TestInfo(
        "csu",
        "constrained",
        _SPEARMAN,
        "up-projection weight rows, matched by cosine similarity",
        "up-projection weights matched (exact p)",
        needs_data=False,
        layerwise=True,
    ),
    TestInfo(
        "csh",
        "constrained",
        "exact, same construction",
        "up-projection activations over the tokens",
        "up-projection activations matched (exact p)",
        needs_data=True,
        layerwise=True,
    ),
    TestInfo(
        "csu_all",
        "constrained",
        "heuristic (`exact: false`): only MLP units are a symmetry",
        "every equally shaped 2-D weight",
        "all 2-D weights matched (heuristic)",
        needs_data=False,
        layerwise=False,
    ),
    TestInfo(
        "l2",
        "constrained",
        "exact PERMTEST, `(1 + #{stat_t >= stat_0}) / (T + 1)`, per layer and total (or over `--layers`)",
        "minus the weight distance",
        "weight distance, PERMTEST (exact p)",
        needs_data=False,
        layerwise=True,
    ),
    TestInfo(
        "mc",
        "constrained",
        "exact PERMTEST",
        "minus the loss of the averaged model (needs trained models to have power)",
        "mode connectivity, PERMTEST (exact p)",
        needs_data=True,
        layerwise=False,
    ),
    TestInfo(
        "jsd",
        "none",
        "none: invariant under the symmetry group, reported as a number",
        "next-token distributions",
        "output divergence (no p-value)",
        needs_data=True,
        layerwise=False,
    ),
    TestInfo(
        "match",
        "unconstrained",
        "Spearman of gate vs up matchings, Fisher over layers (approximate, as in the paper)",
        "activations; robust to permutation, rotation, pruning (rectangular LAP)",
        "gate vs up matchings agree (robust)",
        needs_data=True,
        layerwise=True,
    ),
    TestInfo(
        "localized",
        "unconstrained",
        "MATCH per layer pair; Bonferroni over the matrix (approximate)",
        "every layer of A with every layer of B: layer map (several B layers may share one A layer: "
        "`duplicated_layers`), kept units, heatmap; screened above 64 pairs",
        "MATCH on every layer pair (robust)",
        needs_data=True,
        layerwise=True,
    ),
    TestInfo(
        "generalized",
        "unconstrained",
        "as `match`, on GLU students distilled on Gaussian inputs",
        "any MLP block, GLU or not, or retrained",
        "distilled MLPs, MATCH (robust)",
        needs_data=False,
        layerwise=True,
    ),
    TestInfo(
        "csu_aligned",
        "constrained",
        "exact, as `csu` (B's MLP units exchangeable under H0; the residual map is fitted on embeddings)",
        "up-projection weights after mapping B's residual stream onto A's (orthogonal Procrustes on the embeddings "
        "of tokens both vocabularies share): robust to residual rotations and permutations, not to permuted MLP "
        "units",
        "up-projection weights, residual streams aligned (exact p)",
        needs_data=False,
        layerwise=True,
    ),
)
CATALOG: Mapping[str, TestInfo] = {info.name: info for info in _INFOS}
assert set(CATALOG) == set(get_args(TestName)), "every TestName is described, and only those"
ALL_TESTS: tuple[str, ...] = tuple(CATALOG)
DEFAULT_TESTS: tuple[TestName, ...] = ("csu", "l2", "jsd", "match")


def tests_help() -> str:
    """The ``--tests`` flag's help: every test with a few words."""
    return "Tests to run (comma-separated): " + "; ".join(f"{s.name}: {s.meaning}" for s in CATALOG.values()) + "."


def markdown_table() -> str:
    """The README's table of tests (a test checks that the README holds exactly this)."""
    rows = ["| test | setting | p-value | what it compares | data | `--layers` |", "|---|---|---|---|---|---|"]
    for s in CATALOG.values():
        setting = "-" if s.setting == "none" else s.setting
        rows.append(
            f"| `{s.name}` | {setting} | {s.pvalue} | {s.compares} | {'tokens' if s.needs_data else '-'} "
            f"| {'yes' if s.layerwise else '-'} |"
        )
    return "\n".join(rows)


# --- which tests apply to which kind of pair (the README's applicability table; benchmarks/derivations.py) ---

PairKind = Literal["same", "mlp_width", "residual_width", "depth", "moe", "tokenizer", "gguf"]
PAIR_KINDS: Mapping[PairKind, str] = {
    "same": "same architecture (fine-tune, permuted/rotated copy, layer-stacked merge)",
    "mlp_width": "other MLP width (pruned units)",
    "residual_width": "other residual width (another family, pruned residual)",
    "depth": "other depth (depth up-scaling, dropped layers)",
    "moe": "dense vs MoE, or MoEs of other expert counts (upcycling)",
    "tokenizer": "other tokenizer or vocabulary (extension, transplant)",
    "gguf": "GGUF quantized (dequantised on load)",
}
Applies = Literal["yes", "partly", "no"]
_SAME_CONFIG = "PERMTEST permutes B's weights against A's: needs one architecture and config"
_WIDTH = "compares weight rows in residual coordinates: needs the same d_model"
_GGUF: tuple[Applies, str] = ("yes", "dequantised on load; the quantisation error acts like a small fine-tune")
_ALIGNED: tuple[Applies, str] = ("yes", "on text each model reads its own tokens; activations at aligned positions")
APPLICABILITY: Mapping[str, Mapping[PairKind, tuple[Applies, str]]] = {
    "csu": {
        "same": ("yes", ""),
        "mlp_width": ("yes", "rectangular matching of the units"),
        "residual_width": ("no", _WIDTH),
        "depth": ("yes", "layer l with layer l, or `--layer_pairs`"),
        "moe": ("yes", "every MLP block against every block (Bonferroni + Sidak)"),
        "tokenizer": ("yes", "weights only: the tokenizers do not matter"),
        "gguf": _GGUF,
    },
    "csu_aligned": {
        "same": ("yes", ""),
        "mlp_width": ("yes", "rectangular matching of the units"),
        "residual_width": ("no", "the residual map is an orthogonal d x d Procrustes fit: needs the same d_model"),
        "depth": ("yes", "layer l with layer l, or `--layer_pairs`"),
        "moe": ("no", "compares dense MLPs: use `match`"),
        "tokenizer": (
            "yes",
            "weights only; the residual map is fitted on the tokens both vocabularies share by string",
        ),
        "gguf": _GGUF,
    },
    "csh": {
        "same": ("yes", ""),
        "mlp_width": ("yes", "rectangular matching of the units"),
        "residual_width": ("yes", "activations: any two widths"),
        "depth": ("yes", "layer l with layer l, or `--layer_pairs`"),
        "moe": ("yes", "every MLP block against every block"),
        "tokenizer": _ALIGNED,
        "gguf": _GGUF,
    },
    "csu_all": {
        "same": ("yes", ""),
        "mlp_width": ("partly", "only the equally shaped matrices (attention) are compared"),
        "residual_width": ("no", _WIDTH),
        "depth": ("yes", "the layers both models have"),
        "moe": ("partly", "expert tensors are skipped"),
        "tokenizer": ("partly", "embeddings of other vocabulary sizes are skipped"),
        "gguf": _GGUF,
    },
    "l2": {
        "same": ("yes", ""),
        "mlp_width": ("no", _SAME_CONFIG),
        "residual_width": ("no", _SAME_CONFIG),
        "depth": ("no", _SAME_CONFIG),
        "moe": ("no", _SAME_CONFIG),
        "tokenizer": ("no", _SAME_CONFIG + " (vocabulary size included)"),
        "gguf": _GGUF,
    },
    "mc": {
        "same": ("yes", ""),
        "mlp_width": ("no", _SAME_CONFIG),
        "residual_width": ("no", _SAME_CONFIG),
        "depth": ("no", _SAME_CONFIG),
        "moe": ("no", _SAME_CONFIG),
        "tokenizer": ("no", "feeds one id array to both models, and needs one config"),
        "gguf": _GGUF,
    },
    "jsd": {
        "same": ("yes", ""),
        "mlp_width": ("yes", ""),
        "residual_width": ("yes", ""),
        "depth": ("yes", ""),
        "moe": ("yes", ""),
        "tokenizer": ("no", "feeds one id array to both models: only `--data=random` over shared ids"),
        "gguf": _GGUF,
    },
    "match": {
        "same": ("yes", ""),
        "mlp_width": ("yes", "rectangular LAPs"),
        "residual_width": ("yes", "activations: any two widths"),
        "depth": ("yes", "layer l with layer l, or `--layer_pairs`; `localized` finds the map"),
        "moe": ("yes", "every MLP block against every block"),
        "tokenizer": _ALIGNED,
        "gguf": _GGUF,
    },
    "localized": {
        "same": ("yes", ""),
        "mlp_width": ("yes", "names the kept units"),
        "residual_width": ("yes", ""),
        "depth": ("yes", "maps every layer of B to A's (duplicated layers named)"),
        "moe": ("no", "not implemented for mixtures of experts"),
        "tokenizer": _ALIGNED,
        "gguf": _GGUF,
    },
    "generalized": {
        "same": ("yes", ""),
        "mlp_width": ("yes", ""),
        "residual_width": ("no", "students are distilled on Gaussian inputs of one width: needs the same d_model"),
        "depth": ("yes", "layer l with layer l, or `--layer_pairs`"),
        "moe": ("yes", "each MoE block as a function"),
        "tokenizer": ("yes", "weights only (Gaussian inputs)"),
        "gguf": _GGUF,
    },
}


def pair_kinds(cfg_a: Any, cfg_b: Any, same_tokenizer: bool = True) -> tuple[PairKind, ...]:
    """The kinds of difference between two model configs (:class:`jaxind.models.config.ModelConfig`), ``("same",)``
    when there is none; ``same_tokenizer=False``: the two models read text with different tokenizers."""
    kinds: list[PairKind] = []
    if cfg_a.moe != cfg_b.moe or (cfg_a.moe and cfg_a.n_experts != cfg_b.n_experts):
        kinds.append("moe")
    elif cfg_a.d_ff != cfg_b.d_ff or cfg_a.d_expert != cfg_b.d_expert:
        kinds.append("mlp_width")
    if cfg_a.d_model != cfg_b.d_model:
        kinds.append("residual_width")
    if cfg_a.n_layers != cfg_b.n_layers:
        kinds.append("depth")
    if cfg_a.vocab_size != cfg_b.vocab_size or not same_tokenizer:
        kinds.append("tokenizer")
    return tuple(kinds) or ("same",)


def not_applicable(test: str, kinds: Iterable[PairKind]) -> str | None:
    """Why ``test`` does not apply to a pair of these kinds (:func:`pair_kinds`), or None where it does."""
    table = APPLICABILITY.get(test, {})
    for kind in kinds:
        status, why = table.get(kind, ("yes", ""))
        if status == "no":
            return f"{PAIR_KINDS[kind].split(' (')[0]}: {why}"
    return None


def applicability_table() -> str:
    """The README's table of which tests apply to which kind of pair (a test checks the README holds it)."""
    kinds = list(PAIR_KINDS)
    rows = ["| test | " + " | ".join(PAIR_KINDS[k] for k in kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name in CATALOG:
        cells = []
        for kind in kinds:
            status, why = APPLICABILITY.get(name, {}).get(kind, ("?", "not stated"))
            cells.append(status if not why else f"{status}: {why}")
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)
