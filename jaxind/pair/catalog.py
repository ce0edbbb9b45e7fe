"""What each test is, without running anything: names, settings, what the p-value means.

Kept free of heavy imports (no JAX), so the CLI can validate ``--tests`` and print ``--help``
before it loads anything. :mod:`jaxind.pair.registry` attaches the functions that run each test; the
README table and the ``--tests`` help are generated from here (docs/DESIGN.md §5.3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal, get_args

__all__ = ["ALL_TESTS", "CATALOG", "DEFAULT_TESTS", "Setting", "TestInfo", "TestName", "markdown_table", "tests_help"]

TestName = Literal["csu", "csh", "csu_all", "l2", "mc", "jsd", "match", "localized", "generalized"]
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
