"""The built-in demo: a small model zoo built offline, deterministically, and tested.

Zoo (byte-level Llama-architecture models trained on the bundled corpus,
``jaxind/data/demo_corpus.txt``, written for the project):

* ``base``: trained from seed 0;
* ``finetuned``: ``base`` trained further on the second half of the corpus;
* ``independent``: same recipe as ``base`` from another seed;
* ``permuted+rotated``: ``finetuned`` with every MLP's hidden units permuted and the residual
  stream rotated -- the same function in disguise.

Pairs tested: base vs each of the others. Expected: CSU and L2 detect the fine-tune and
not the independent model; only MATCH (activations, robust to both disguises) detects the
permuted+rotated copy.
"""

from __future__ import annotations

import importlib.resources
import time
from typing import Any

import jax
import numpy as np

from jaxind.models import model, symmetry
from jaxind.models.config import ModelConfig
from jaxind.models.train import train

DEMO_CONFIG = ModelConfig(
    family="llama",
    vocab_size=256,
    d_model=64,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_ff=192,
    rope_theta=10000.0,
)
PAIRS = (("base", "finetuned"), ("base", "independent"), ("base", "permuted+rotated"))


def corpus_bytes() -> np.ndarray:
    """The bundled corpus as byte token ids ``(n,)``."""
    text = importlib.resources.files("jaxind").joinpath("data/demo_corpus.txt").read_text(encoding="utf-8")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def build_zoo(
    seed: int = 0, steps: int = 200, finetune_steps: int = 60, log=print
) -> dict[str, tuple[ModelConfig, Any]]:
    """Builds the zoo; returns ``{name: (config, params)}``. Deterministic for a seed."""
    corpus = corpus_bytes()
    half = corpus[corpus.shape[0] // 2 :]
    cfg = DEMO_CONFIG
    start = time.perf_counter()
    base, losses = train(model.init_params(cfg, jax.random.key(seed)), cfg, corpus, steps=steps, seed=seed)
    log(f"  base: trained {steps} steps, loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    finetuned, losses = train(base, cfg, half, steps=finetune_steps, learning_rate=1e-3, seed=seed + 1)
    log(f"  finetuned: +{finetune_steps} steps on the second half, loss {losses[-1]:.2f}")
    independent, losses = train(
        model.init_params(cfg, jax.random.key(seed + 1000)), cfg, corpus, steps=steps, seed=seed + 2
    )
    log(f"  independent: trained {steps} steps from another seed, loss {losses[-1]:.2f}")
    k_perm, k_rot = jax.random.split(jax.random.key(seed + 2000))
    disguised = symmetry.apply_permutation(finetuned, cfg, symmetry.draw_permutations(k_perm, cfg))
    disguised, disguised_cfg = symmetry.rotate_residual(disguised, cfg, symmetry.random_orthogonal(k_rot, cfg.d_model))
    log(
        "  permuted+rotated: finetuned with hidden units permuted and residual rotated "
        f"({time.perf_counter() - start:.0f}s so far)"
    )
    return {
        "base": (cfg, base),
        "finetuned": (cfg, finetuned),
        "independent": (cfg, independent),
        "permuted+rotated": (disguised_cfg, disguised),
    }


def run_demo(settings, output: str | None = None, quick: bool = False, log=print, layout=None) -> int:
    """Builds the zoo, runs ``settings.tests`` on each pair over windows of the corpus, prints
    one table per pair; with ``output`` (a directory) writes one results JSON per pair. With a
    ``layout`` (:class:`jaxind.parallel.sharding.Layout`) the trained models are sharded over its mesh."""
    import dataclasses
    import os

    from jaxind.io import token_source
    from jaxind.io.loaded_model import from_params
    from jaxind.pair import report, runner
    from jaxind.stats import results

    start = time.perf_counter()
    log("jaxind demo: building a small model zoo from the bundled corpus (deterministic) ...")
    steps, finetune_steps = (60, 20) if quick else (200, 60)
    zoo = build_zoo(seed=settings.data.seed, steps=steps, finetune_steps=finetune_steps, log=log)
    if quick:
        settings = dataclasses.replace(settings, num_perms=min(settings.num_perms, 99))
    spec = dataclasses.replace(settings.data, kind="text", path="jaxind/data/demo_corpus.txt")
    tokens = token_source.windows(corpus_bytes(), spec)
    for name_a, name_b in PAIRS:
        a = from_params(*zoo[name_a], name=name_a, layout=layout)
        b = from_params(*zoo[name_b], name=name_b, layout=layout)
        log(f"\n=== {name_a} vs {name_b} ===")
        result = runner.run_pair(a, b, dataclasses.replace(settings, data=spec), log=lambda m: None, tokens=tokens)
        log(report.format_table(result))
        if output:
            os.makedirs(output, exist_ok=True)
            results.write_json(os.path.join(output, f"{name_a}__{name_b}.json".replace("+", "_")), result.to_json())
    log(
        f"\nExpected: the fine-tune is detected by every test with a p-value; the independent model by none;"
        f"\nthe permuted+rotated copy only by MATCH, which looks at activations (CSU and L2 compare weights"
        f"\nin a fixed basis, which the disguise scrambles). Total {time.perf_counter() - start:.0f}s."
    )
    if output:
        log(f"results written to {os.path.abspath(output)}/")
    return 0
