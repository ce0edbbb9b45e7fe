"""A cheap screen of layer pairs for localized testing (docs/DESIGN.md, "Screening layer pairs").

Localized testing runs MATCH (two ``h_A x h_B`` LAPs and their ``h x h`` output Grams) on every
layer pair; for a deep pair (SmolLM2 up-scaled 30 -> 44 layers: 1,320 pairs, 2,640 LAPs of side
1,536) that is the whole cost. The screen decides, from the MLP-input cross-Grams the pass has
already accumulated, which pairs can be dependent at all, and localized testing solves the LAPs
only for those.

**Statistic.** Take ``m`` units of the narrower model (a fixed random subset, the same for every
pair). For each, its nearest unit of the other model under each projection: the argmax over
columns of the column-centred output cross-Gram ``G_r^T G_c - mean_r(G_r^T G_c)``, which for a
square LAP is the same objective as MATCH's squared distances (row and column constants do not
change which assignment is optimal). These are ``m`` rows of the output Gram,
``W_r[:, S]^T (x_r^T x_c) W_c``: ``m (d_r d_c + d_c h_c)`` multiply-adds instead of
``h_r d_r d_c + h_r h_c d_c`` and no LAP. A dependent pair's gate and up nearest units agree (a
copied layer: on nearly every sampled unit); an independent pair's agree only by chance, on about
``k0 = sum_c n_gate(c) n_up(c) / m`` units, where ``n(c)`` counts the sampled units whose nearest
unit is ``c`` (the expected agreements if the gate and up choices were paired at random: it
accounts for hub units that many rows prefer). The score is ``excess = k - k0``.

**Which pairs get the full test.** A pair is tested when its excess reaches
``max(min_excess, z sqrt(k0 + 1))`` (above chance), or when it has the largest excess in its
column (every layer of B gets its best candidate tested). All other pairs are *screened out*:
they are not tested and can be in neither the layer map nor the minimum.

**What stays guaranteed.** The Bonferroni threshold still divides ``alpha`` by all ``L_A L_B``
pairs, so the layer map is a subset of the map the full test would give on the same data and keys
(tested pairs get the same keys, hence bit-identical p-values) and the family-wise error rate stays
``<= alpha``; the overall p-value ``min(1, L_A L_B min_tested p)`` is at least the full test's, so
it remains a valid (at worst more conservative) p-value. What the screen gives up is power, and only
on a pair the full test flags whose sampled units show no more gate/up agreement than chance; the
tests (tests/test_localized_depth.py) and the benchmark check that on up-scaled, partly shared and
null pairs the screened and full maps are identical. ``screen=False`` runs the full test.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxind.parallel import sharding
from jaxind.stats import grams

__all__ = ["MIN_EXCESS", "NUM_UNITS", "Screen", "Z", "sample_units", "screen"]

MIN_EXCESS = 3.0  # agreements above chance a pair needs to be tested (besides its column's best)
Z = 4.0  # ... and standard deviations (sqrt(k0 + 1), Poisson-like) above chance
NUM_UNITS = 128  # sampled units of the narrower model


@dataclasses.dataclass
class Screen:
    """The screen's numbers for the pairs of one chunk: rows are A layers, columns B layers.

    Attributes:
      agree: ``k``, sampled units whose gate and up nearest units agree.
      chance: ``k0``, the agreements expected by chance (see the module doc).
      num_units: ``m``, units sampled.
    """

    agree: np.ndarray
    chance: np.ndarray
    num_units: int

    @property
    def excess(self) -> np.ndarray:
        """``k - k0`` per pair."""
        return self.agree - self.chance

    def candidates(self, min_excess: float = MIN_EXCESS, z: float = Z) -> np.ndarray:
        """Bool ``(n_a, n_b)``: the pairs to test (above chance, or their column's best)."""
        excess = self.excess
        above = excess >= np.maximum(min_excess, z * np.sqrt(self.chance + 1.0))
        best = np.zeros_like(above)
        best[np.argmax(excess, axis=0), np.arange(excess.shape[1])] = True
        return above | best


def sample_units(h_a: int, h_b: int, key: jax.Array, num_units: int = NUM_UNITS) -> np.ndarray:
    """Sorted indices of ``min(num_units, min(h_a, h_b))`` units of the narrower model (A on ties)."""
    h = min(h_a, h_b)
    return np.sort(np.asarray(jax.random.permutation(key, h)[: min(num_units, h)]))


@functools.partial(jax.jit, static_argnames=("rows_are_a",))
def _agreement(cross, wa_g, wa_u, wb_g, wb_u, units, rows_are_a: bool):
    """``(k, k0)`` for one A layer against a stack of B layers.

    Args:
      cross: ``(n_b, d_A, d_B)`` input cross-Grams of one A layer with each B layer.
      wa_g, wa_u: ``(d_A, h_A)`` gate/up kernels of the A layer; wb_g, wb_u: ``(n_b, d_B, h_B)``.
      units: sampled unit indices of the narrower model (rows).
      rows_are_a: whether the rows are A's units (else B's).
    """
    hi = jax.lax.Precision.HIGHEST

    def nearest(wa, wb):
        wa, wb = wa.astype(jnp.float32), wb.astype(jnp.float32)
        if rows_are_a:  # rows: W_a[:, S]^T C W_b (n_b, m, h_B); column means over all A units
            left = jnp.einsum("dm,bde->bme", wa[:, units], cross, precision=hi)
            mean = jnp.einsum("d,bde->be", wa.mean(axis=1), cross, precision=hi)
            rows = jnp.einsum("bme,beh->bmh", left, wb, precision=hi)
            col_mean = jnp.einsum("be,beh->bh", mean, wb, precision=hi)
        else:  # rows: W_b[:, S]^T C^T W_a (n_b, m, h_A)
            left = jnp.einsum("bem,bde->bmd", wb[:, :, units], cross, precision=hi)
            mean = jnp.einsum("be,bde->bd", wb.mean(axis=2), cross, precision=hi)
            rows = jnp.einsum("bmd,dh->bmh", left, wa, precision=hi)
            col_mean = jnp.einsum("bd,dh->bh", mean, wa, precision=hi)
        return jnp.argmax(rows - col_mean[:, None, :], axis=-1)  # (n_b, m)

    near_g, near_u = nearest(wa_g, wb_g), nearest(wa_u, wb_u)
    m = near_g.shape[1]
    n_cols = wb_g.shape[2] if rows_are_a else wa_g.shape[1]
    counts = jax.vmap(lambda g, u: (jnp.bincount(g, length=n_cols), jnp.bincount(u, length=n_cols)))(near_g, near_u)
    agree = jnp.sum(near_g == near_u, axis=1)
    chance = jnp.sum(counts[0] * counts[1], axis=1) / m
    return agree, chance


def screen(stats: grams.PassStats, key: jax.Array, num_units: int = NUM_UNITS) -> Screen:
    """The screen for every pair of all-pairs pass statistics (:func:`jaxind.stats.grams.accumulate`
    with ``outer=True``): ``m`` units sampled with ``key`` (the same for every pair)."""
    wa, wb = stats.weights_a, stats.weights_b
    h_a, h_b = wa["gate"].shape[-1], wb["gate"].shape[-1]
    units = jnp.asarray(sample_units(h_a, h_b, key, num_units))
    lb = jnp.asarray(stats.layers_b)
    wb_g, wb_u = wb["gate"][lb], wb["up"][lb]
    agree = np.zeros((len(stats.layers_a), len(stats.layers_b)))
    chance = np.zeros_like(agree)
    for ia, a in enumerate(stats.layers_a):
        k, k0 = _agreement(stats.cross[ia], wa["gate"][a], wa["up"][a], wb_g, wb_u, units, rows_are_a=h_a <= h_b)
        agree[ia], chance[ia] = sharding.to_host(k), sharding.to_host(k0)
    return Screen(agree=agree, chance=chance, num_units=int(units.shape[0]))
