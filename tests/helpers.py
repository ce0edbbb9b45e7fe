"""Helpers shared by the tests: param trees near or far from each other, and running the
command lines in a child process against this checkout."""

from __future__ import annotations

import os
import subprocess
import sys

import jax

from jaxind import model
from jaxind.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_noise(params, key, scale):
    """A copy of ``params`` with every leaf moved by ``scale * N(0, 1)`` (one key per leaf)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [w + scale * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys)])


def perturb(params, key, rel=0.5, std=0.02):
    """A copy of ``params`` with every leaf moved by N(0, (rel * std)^2): with ``std`` the init
    scale, ``rel=0.5`` is a fine-tune proxy and ``rel=3`` a weak relation."""
    return add_noise(params, key, rel * std)


def near_copy(params, seed, scale=1e-2):
    """``params`` moved by ``scale * N(0, 1)`` per entry, keyed by ``seed``."""
    return add_noise(params, jax.random.key(seed), scale)


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.3, noise: float = 0.3, noise_offset: int = 1000):
    """An independent random model whose norm weights and biases are randomised too (iid across
    seeds, so the null holds), so that folding and every leaf's role are really exercised:
    ``init_params(std)`` plus ``noise * N(0, 1)`` keyed by ``seed + noise_offset``."""
    params = model.init_params(cfg, jax.random.key(seed), std=std)
    return add_noise(params, jax.random.key(seed + noise_offset), noise)


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args...`` in a child process, from the repository root, importing this
    checkout; output captured as text."""
    return run_python("-m", module, *args)


def run_python(*args: str) -> subprocess.CompletedProcess:
    """``python args...`` in a child process, from the repository root, importing this checkout."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO
    )
