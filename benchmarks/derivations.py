"""Derivations seen in the wild (issue 18): every registered test on every pair of a small zoo, one table per
derivation type -- detection rate at alpha on dependent pairs, false-positive rate on independent ones, AUC.

The zoo (benchmarks/derivation_zoo.py): trained Llama-architecture bases and their fine-tunes, permuted+rotated
copies, pruned, depth up-scaled, upcycled (dense -> MoE), vocabulary-extended, tokenizer-transplanted, layer-stacked
merges, distilled students and independent models. Per derivation and seed ``s``: the dependent pair
``(base s, derived s)`` and the independent pair ``(base s, derived s+1)``. Every test of ``jaxind.TESTS`` runs on
every pair (tests added later are picked up); a test the catalog says does not apply to the pair's kind is recorded
as ``n/a`` with the catalog's reason (``jaxind.pair.catalog.not_applicable``). Data: windows of the bundled corpus,
each model reading it through its own tokenizer (aligned positions where the tokenizers differ).

Results: ``--out`` (JSON of every p-value, written atomically after each pair; a rerun skips the pairs already
there) and the tables next to it (the same path with ``.md``). ``--real`` adds pairs of the real SmolLM2-135M and
derivations of it (weights only: no training at that size; no independent model of its shape, so no FPR or AUC).

    python benchmarks/derivations.py --out benchmarks/results/derivations_tiny.json   # ~15 min on 2 loaded cores
    python benchmarks/derivations.py --quick --out /tmp/d.json                        # 2 seeds, few steps
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import derivation_zoo as dz  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from jaxind.errors import JaxindError  # noqa: E402
from jaxind.pair import catalog  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The benchmark's flags, defined when it runs as a program (importing it, as its test does, defines none:
    other modules of the same process define --out, --tests, --alpha ...)."""
    flags.DEFINE_list("sizes", ["tiny"], f"model sizes of the zoo: {', '.join(dz.SIZES)}")
    flags.DEFINE_integer("seeds", 5, "bases per size: each derivation gets this many dependent and independent pairs")
    flags.DEFINE_string("out", "benchmarks/results/derivations_tiny.json", "results JSON (the tables: same path, .md)")
    flags.DEFINE_boolean("real", False, "also the real SmolLM2-135M and derivations of it (slower)")
    flags.DEFINE_boolean("quick", False, "2 seeds, short training, 19 permutations: a 2-minute smoke run")
    flags.DEFINE_list("derivations", list(dz.DERIVATIONS), "derivations to run")
    flags.DEFINE_list("tests", None, "tests to run (default: every registered test)")
    flags.DEFINE_integer("num_perms", 99, "PERMTEST draws (l2, mc); p-values are at least 1/(num_perms+1)")
    flags.DEFINE_integer("generalized_steps", 200, "distillation steps per MLP block of the generalized test")
    flags.DEFINE_float("alpha", 0.01, "level of the detection and false-positive rates")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run computes (stored in the JSON; a rerun with other settings is refused)."""

    sizes: tuple[str, ...]
    seeds: int
    derivations: tuple[str, ...]
    tests: tuple[str, ...]
    num_perms: int
    generalized_steps: int
    steps: dict[str, Any]
    num_sequences: int = 16
    seq_len: int = 32

    def settings(self) -> dict[str, Any]:
        """The part of the plan that must match for stored pairs to be reused."""
        return {"num_perms": self.num_perms, "generalized_steps": self.generalized_steps, "steps": self.steps,
                "num_sequences": self.num_sequences, "seq_len": self.seq_len}  # fmt: skip


def pair_jobs(plan: Plan) -> list[tuple[str, str, int, bool]]:
    """``(size, derivation, seed, dependent)`` of every pair, seed-major (a stopped run has every derivation)."""
    return [
        (size, name, seed, dep)
        for size in plan.sizes
        for seed in range(plan.seeds)
        for name in plan.derivations
        for dep in (True, False)
    ]


def pair_key(size: str, name: str, seed: int, dependent: bool) -> str:
    return f"{size}/{name}/{seed}/{'dependent' if dependent else 'independent'}"


def run_tests(
    a: dz.Member, b: dz.Member, tests: Sequence[str], plan: Plan, seed: int, layers: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """Every test in ``tests`` on the pair: ``{"kinds": [...], "tests": {test: {pvalue, log10_pvalue, seconds, na,
    error}}}``; ``layers``: the layer-wise tests' selection (default: every layer pair)."""
    from jaxind.io import token_source
    from jaxind.io.loaded_model import from_params
    from jaxind.pair import runner
    from jaxind.pair.registry import TESTS
    from jaxind.pair.token_data import TokenData

    ma, mb = from_params(a.cfg, a.params, "A"), from_params(b.cfg, b.params, "B")
    spec = token_source.DataSpec(
        kind="text", path=dz.CORPUS, num_sequences=plan.num_sequences, seq_len=plan.seq_len, seed=seed
    )
    tokens = token_source.make_tokens(spec, a.cfg.vocab_size, b.cfg.vocab_size, a.tokenizer, b.tokenizer)
    data = TokenData.wrap(tokens)
    kinds = catalog.pair_kinds(a.cfg, b.cfg, same_tokenizer=data.aligned is None)
    settings = runner.Settings(
        tests=tuple(tests), data=spec, num_perms=plan.num_perms, generalized_steps=plan.generalized_steps, layers=layers
    )
    out: dict[str, Any] = {"kinds": list(kinds), "tests": {}}
    for name in tests:
        reason = catalog.not_applicable(name, kinds)
        if reason is not None:
            out["tests"][name] = {"na": reason}
            continue
        r = runner.run_test(TESTS[name], ma, mb, settings, data)
        out["tests"][name] = {"pvalue": r.pvalue, "log10_pvalue": r.log10_pvalue, "seconds": round(r.seconds, 3),
                              "error": r.error}  # fmt: skip
    return out


def load_doc(path: str, plan: Plan) -> dict[str, Any]:
    """The stored results at ``path`` (a new document if there are none).

    Raises:
      JaxindError: the stored results were made with other settings.
    """
    if not os.path.exists(path):
        return {"benchmark": "derivations", "settings": plan.settings(), "pairs": {}}
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if doc.get("settings") != json.loads(json.dumps(plan.settings())):
        raise JaxindError(f"--out={path} holds results made with other settings: pass the same flags or another --out")
    return doc


def save(path: str, doc: dict[str, Any], plan: Plan, alpha: float) -> None:
    """The JSON and the markdown tables, each written atomically."""
    from jaxind.io import destinations

    destinations.write_text(path, json.dumps(doc, indent=1) + "\n", "--out")
    destinations.write_text(os.path.splitext(path)[0] + ".md", markdown(doc, plan, alpha), "--out")


def auc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """P(score of a dependent pair > score of an independent one) + half the ties: Mann-Whitney U / (n1 n0)."""
    from scipy.stats import mannwhitneyu

    if not positive or not negative:
        return None
    return float(mannwhitneyu(positive, negative).statistic) / (len(positive) * len(negative))


def summarize(doc: dict[str, Any], size: str, name: str, test: str, alpha: float) -> dict[str, Any]:
    """One table row: detection and false-positive counts at ``alpha``, AUC on -log10 p, n/a reasons, errors."""
    threshold = math.log10(alpha)
    rows = [r for k, r in doc["pairs"].items() if k.startswith(f"{size}/{name}/")]
    scores: dict[bool, list[float]] = {True: [], False: []}
    na, errors = set(), set()
    for r in rows:
        rec = r["tests"].get(test)
        if rec is None:
            continue
        if rec.get("na"):
            na.add(rec["na"])
        elif rec.get("error"):
            errors.add(rec["error"])
        elif rec.get("log10_pvalue") is not None:
            scores[r["dependent"] and dz.DERIVATIONS[name].dependent].append(-rec["log10_pvalue"])
    dep, ind = scores[True], scores[False]
    return {
        "detected": (sum(s >= -threshold for s in dep), len(dep)),
        "false_positives": (sum(s >= -threshold for s in ind), len(ind)),
        "auc": auc(dep, ind),
        "median_log10": (_median(dep), _median(ind)),
        "na": sorted(na),
        "errors": sorted(errors),
    }


def _median(values: list[float]) -> float | None:
    import numpy as np

    return None if not values else -float(np.median(values))


def _cell(counts: tuple[int, int]) -> str:
    hit, n = counts
    return "-" if n == 0 else f"{hit}/{n}"


def overview(doc: dict[str, Any], plan: Plan, alpha: float) -> list[str]:
    """One table per size: a row per derivation, a column per test, "detected / false positives" in each cell."""
    out = []
    for size in plan.sizes:
        out += [f"#### All derivations ({size}): detected / false positives at {alpha}", "",
                "| derivation | " + " | ".join(f"`{t}`" for t in plan.tests) + " |",
                "|---" * (len(plan.tests) + 1) + "|"]  # fmt: skip
        for name in plan.derivations:
            cells = []
            for test in plan.tests:
                s = summarize(doc, size, name, test, alpha)
                if s["detected"][1] or s["false_positives"][1]:
                    det = _cell(s["detected"]) if dz.DERIVATIONS[name].dependent else "H0"
                    cells.append(f"{det} / {_cell(s['false_positives'])}")
                else:
                    cells.append("n/a" if s["na"] or s["errors"] else "-")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def markdown(doc: dict[str, Any], plan: Plan, alpha: float) -> str:
    """The overview, then one table per derivation type (and size): a row per test."""
    out = overview(doc, plan, alpha)
    for size in plan.sizes:
        for name in plan.derivations:
            d = dz.DERIVATIONS[name]
            out += [f"#### {name} ({size}): {d.about}", ""]
            out += [f"| test | detected at {alpha} | false positives at {alpha} | AUC | median log10 p (dep / ind) |",
                    "|---|---|---|---|---|"]  # fmt: skip
            for test in plan.tests:
                s = summarize(doc, size, name, test, alpha)
                if s["na"] and not s["detected"][1] and not s["false_positives"][1]:
                    out.append(f"| `{test}` | n/a: {'; '.join(s['na'])} | | | |")
                    continue
                if s["errors"] and not s["detected"][1] and not s["false_positives"][1]:
                    out.append(f"| `{test}` | error: {'; '.join(s['errors'])} | | | |")
                    continue
                if not s["detected"][1] and not s["false_positives"][1]:
                    out.append(f"| `{test}` | no p-value (a number, not a test) | | | |")
                    continue
                med = " / ".join("-" if m is None else f"{m:.1f}" for m in s["median_log10"])
                det = _cell(s["detected"]) if d.dependent else "- (H0 holds)"
                area = "-" if s["auc"] is None else f"{s['auc']:.2f}"
                out.append(f"| `{test}` | {det} | {_cell(s['false_positives'])} | {area} | {med} |")
            out.append("")
    import derivations_real

    return "\n".join(out) + derivations_real.markdown(doc)


def make_plan() -> Plan:
    from jaxind.pair.registry import TESTS

    tests = tuple(FLAGS.tests or TESTS)
    unknown = [t for t in tests if t not in TESTS]
    bad = [d for d in FLAGS.derivations if d not in dz.DERIVATIONS] + [s for s in FLAGS.sizes if s not in dz.SIZES]
    if unknown or bad:
        raise JaxindError(f"unknown test(s) or derivation(s)/size(s) {unknown + bad}: see --helpfull")
    steps = dz.QUICK_STEPS if FLAGS.quick else dz.Steps()
    return Plan(
        sizes=tuple(FLAGS.sizes),
        seeds=2 if FLAGS.quick else FLAGS.seeds,
        derivations=tuple(FLAGS.derivations),
        tests=tests,
        num_perms=19 if FLAGS.quick else FLAGS.num_perms,
        generalized_steps=50 if FLAGS.quick else FLAGS.generalized_steps,
        steps=dataclasses.asdict(steps),
    )


def run(plan: Plan, out: str, alpha: float, log=logging.info) -> dict[str, Any]:
    """Runs every pair of ``plan`` missing from ``out``; returns the document."""
    from jaxind.progress import bar

    doc = load_doc(out, plan)
    zoos = {size: dz.Zoo(size, dz.Steps(**plan.steps)) for size in plan.sizes}
    jobs = [j for j in pair_jobs(plan) if pair_key(*j) not in doc["pairs"]]
    for size, name, seed, dependent in bar(jobs, desc="pairs", unit="pair"):
        start = time.perf_counter()
        zoo = zoos[size]
        other = seed if dependent else ((seed + 1) % plan.seeds if plan.seeds > 1 else seed + 1)
        a, b = zoo.base(seed), zoo.derived(name, other)
        built = time.perf_counter() - start
        record = run_tests(a, b, plan.tests, plan, seed)
        record.update(size=size, derivation=name, seed=seed, partner_seed=other, dependent=dependent,
                      seconds_build=round(built, 1), seconds=round(time.perf_counter() - start, 1))  # fmt: skip
        doc["pairs"][pair_key(size, name, seed, dependent)] = record
        doc["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
        save(out, doc, plan, alpha)
        log(f"{pair_key(size, name, seed, dependent)}: {record['seconds']}s")
    save(out, doc, plan, alpha)
    return doc


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}: every option is a --flag", file=sys.stderr)
        return 1
    try:
        plan = make_plan()
        run(plan, FLAGS.out, FLAGS.alpha)
        if FLAGS.real:
            import derivations_real

            derivations_real.run(FLAGS.out, plan)
    except JaxindError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(open(os.path.splitext(FLAGS.out)[0] + ".md").read())
    return 0


if __name__ == "__main__":
    sys.modules.setdefault(
        "derivations", sys.modules[__name__]
    )  # derivations_real imports it: one module, one set of flags
    define_flags()
    app.run(main)
