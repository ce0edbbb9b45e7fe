"""Merged models for the tests (tests/test_merges.py): layer-stacked merges ("frankenmerges") of tiny parents.

A layer-stacked merge takes whole layers from several parents and stacks them into one model; the embeddings,
final norm and head come from the first parent. It only works as a model when the parents' hidden states live in
one residual basis (fine-tunes of one base, as for Goliath-120B's parents). MATCH and localized testing compare
activations on the same inputs, so they can name the parent of a layer only where the merge's input to that layer
still resembles the parent's: the family built here gives the two parents one embedding matrix and weights at the
init scale (std 0.02), where each layer adds little to the residual stream, so the parents' hidden states stay
close as those of two light fine-tunes of one base do; their layers are independent draws. (With weights of std
0.3 the residual streams of the two parents part after a layer or two, and the second parent's layers are no
longer found by MATCH, though CSU, on weights alone, still finds that parent.)
"""

from __future__ import annotations

import os

import numpy as np
from helpers import numpy_noise, numpy_params, save_jaxind

from jaxind.models.config import ModelConfig

MERGE_CFG = ModelConfig(
    family="llama", vocab_size=128, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)


def layer_stacked_merge(parents: list[tuple[dict, range]]) -> dict:
    """Stacks the given layers of each parent, in order: ``[(params_1, range(0, 2)), (params_2, range(2, 5))]``
    gives layers 0-1 of the first parent then layers 2-4 of the second. Every leaf outside the layers (embeddings,
    final norm, head) comes from the first parent. Numpy trees in, a numpy tree out."""
    first = parents[0][0]
    layers = {
        name: np.concatenate([np.asarray(p["layers"][name])[list(r)] for p, r in parents], axis=0)
        for name in first["layers"]
    }
    return {**first, "layers": layers}


def frankenmerge_family(root: str, split: int = 2, std: float = 0.02, noise: float = 0.005) -> dict[str, str]:
    """Four tiny models (:data:`MERGE_CFG`) as jaxind checkpoints under ``root``: ``{name: path}``.

    ``p1`` and ``p2``: two parents sharing one embedding matrix, with independent layers (weights ``std N(0, 1)``);
    ``merge``: layers ``0 .. split-1`` of ``p1`` and ``split .. L-1`` of ``p2`` (embeddings, final norm and head of
    ``p1``), every weight moved by ``noise * N(0, 1)`` (a light fine-tune after merging); ``stranger``: an
    independent model with its own embeddings.
    """
    cfg = MERGE_CFG
    p1 = numpy_params(cfg, seed=31, std=std)
    p2 = dict(numpy_params(cfg, seed=32, std=std), embed=p1["embed"])
    merged = layer_stacked_merge([(p1, range(split)), (p2, range(split, cfg.n_layers))])
    zoo = {"p1": p1, "p2": p2, "merge": numpy_noise(merged, 33, noise), "stranger": numpy_params(cfg, 34, std)}
    return {name: save_jaxind(os.path.join(root, name), cfg, params, name) for name, params in zoo.items()}
