"""Param-tree helpers shared by the tests."""

import jax


def perturb(params, key, rel=0.5, std=0.02):
    """A copy of ``params`` with every leaf moved by N(0, (rel * std)^2): with ``std`` the init
    scale, ``rel=0.5`` is a fine-tune proxy and ``rel=3`` a weak relation."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [w + rel * std * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys)])
