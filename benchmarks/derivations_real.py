"""The real SmolLM2-135M rows of benchmarks/derivations.py (``--real``): SmolLM2 against derivations of it made
from its weights (no training at this size on a CPU box), one pair each, on three layers.

Derivations: a fine-tune proxy (every leaf moved by 5% of its std), that proxy with its hidden units permuted and
its residual stream rotated, and magnitude pruning of 25% of the MLP units (plus the same noise). There is no
independent model of SmolLM2's shape offline, so these rows give p-values, not rates.
"""

from __future__ import annotations

import os
import time
from typing import Any

import derivation_zoo as dz
import jax
import numpy as np

from jaxind.models import symmetry

REAL_TESTS = ("csu", "csh", "l2", "jsd", "match")
LAYERS = (0, 15, 29)


def _noise(params: Any, seed: int, rel: float = 0.05) -> Any:
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (np.asarray(x) + rel * float(np.std(x)) * rng.standard_normal(np.shape(x))).astype(np.float32),
        params,
    )


def derived(base: dz.Member) -> dict[str, dz.Member]:
    """The real derivations of ``base`` (SmolLM2)."""
    ft = dz.Member(base.cfg, _noise(base.params, 1), base.tokenizer)
    k_perm, k_rot = jax.random.split(jax.random.key(2000))
    pr = symmetry.apply_permutation(ft.params, ft.cfg, symmetry.draw_permutations(k_perm, ft.cfg))
    pr, cfg_rot = symmetry.rotate_residual(pr, ft.cfg, symmetry.random_orthogonal(k_rot, ft.cfg.d_model))
    up = np.asarray(base.params["layers"]["up"])
    keep = np.sort(np.argsort(np.linalg.norm(up, axis=1).sum(0))[::-1][: base.cfg.d_ff * 3 // 4])
    layers = dict(ft.params["layers"])
    layers["gate"], layers["up"] = layers["gate"][..., keep], layers["up"][..., keep]
    layers["down"] = layers["down"][:, keep, :]
    return {
        "finetune": ft,
        "permute_rotate": dz.Member(cfg_rot, pr, base.tokenizer),
        "prune": dz.Member(base.cfg.replace(d_ff=len(keep)), dict(ft.params, layers=layers), base.tokenizer),
    }


def run(out: str, plan: Any) -> dict[str, Any]:
    """Adds the real pairs missing from ``out`` (keys ``real/<derivation>/0/dependent``)."""
    import dataclasses

    import derivations as bench

    from converters.sources import load_model

    doc = bench.load_doc(out, plan)
    start = time.perf_counter()
    m = load_model("smollm2")
    base = dz.Member(m.config, m.params, m.tokenizer)
    real_plan = dataclasses.replace(plan, tests=tuple(t for t in REAL_TESTS if t in plan.tests), seq_len=64)
    for name, member in derived(base).items():
        key = f"real/{name}/0/dependent"
        if key in doc["pairs"]:
            continue
        t0 = time.perf_counter()
        record = bench.run_tests(base, member, real_plan.tests, real_plan, 0, layers=LAYERS)
        record.update(size="real", derivation=name, seed=0, partner_seed=0, dependent=True,
                      seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
        doc["pairs"][key] = record
        bench.save(out, doc, plan, 0.01)
    doc["seconds_real"] = round(time.perf_counter() - start, 1)
    bench.save(out, doc, plan, 0.01)
    return doc


def markdown(doc: dict[str, Any]) -> str:
    """One table: a row per real derivation, log10 p of each test (n/a with the reason's first words)."""
    pairs = {r["derivation"]: r for k, r in doc["pairs"].items() if k.startswith("real/")}
    if not pairs:
        return ""
    tests = list(next(iter(pairs.values()))["tests"])
    rows = [f"#### SmolLM2-135M (real), layers {', '.join(map(str, LAYERS))}: log10 p of each test", "",
            "| derivation | " + " | ".join(f"`{t}`" for t in tests) + " | seconds |",
            "|---" * (len(tests) + 2) + "|"]  # fmt: skip
    for name, r in pairs.items():
        cells = []
        for t in tests:
            rec = r["tests"][t]
            if rec.get("na") or rec.get("error"):
                cells.append("n/a")
            else:
                cells.append("-" if rec.get("log10_pvalue") is None else f"{rec['log10_pvalue']:.1f}")
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {r['seconds']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(os.path.basename(__file__), "is run by benchmarks/derivations.py --real")
