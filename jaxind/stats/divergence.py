"""Output divergence: the Jensen-Shannon divergence of two models' next-token distributions.

JSD is invariant under the symmetry group (a permuted or rotated copy computes the same
function), so no PERMTEST can be built on it: it is reported as a number, not a p-value, as prior
work did (docs/DESIGN.md §1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxind.parallel import sharding
from jaxind.stats.results import TestResult, timed

__all__ = ["NOTE", "jsd", "jsd_sum"]

NOTE = "JSD is invariant under the symmetry group: a similarity number, not a test"


@jax.jit
def jsd_sum(logits_a: jax.Array, logits_b: jax.Array, mask: jax.Array) -> jax.Array:
    """Per sequence ``(B,)``, the sum over positions (weighted by ``mask (B, T)``) of the JSD (bits) of two
    next-token distributions given as logits ``(B, T, V)`` (sequences are added up on the host, in order, so the
    total does not depend on how a mesh splits the batch)."""
    la = jax.nn.log_softmax(logits_a, axis=-1)
    lb = jax.nn.log_softmax(logits_b, axis=-1)
    lm = jnp.logaddexp(la, lb) - jnp.log(2.0)
    kl_a = jnp.sum(jnp.exp(la) * (la - lm), axis=-1)
    kl_b = jnp.sum(jnp.exp(lb) * (lb - lm), axis=-1)
    return jnp.sum(0.5 * (kl_a + kl_b) * mask, axis=-1) / jnp.log(2.0)


@timed
def jsd(
    logits_fn_a: Callable[[np.ndarray], jax.Array],
    logits_fn_b: Callable[[np.ndarray], jax.Array],
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    vocab: int,
) -> TestResult:
    """Mean Jensen-Shannon divergence (bits, in [0, 1]) of the next-token distributions over
    all positions; distributions are restricted to the shared vocabulary prefix ``[0, vocab)``.

    Args:
      logits_fn_a, logits_fn_b: ``tokens (B, T) -> logits (B, T, V)`` (e.g.
        :func:`jaxind.models.model.forward_logits`).
      batches: ``(tokens (B, T), mask (B, T))`` pairs (see :func:`jaxind.io.token_source.batches`).

    Returns:
      A :class:`TestResult` with ``pvalue=None`` and the mean JSD as ``statistic``.
    """
    total, count = 0.0, 0.0
    for tokens, mask in batches:
        logits_a, logits_b = logits_fn_a(tokens), logits_fn_b(tokens)
        layout = sharding.layout_of(logits_a)
        placed = mask if layout is None else layout.batch(mask)
        total += float(np.sum(sharding.to_host(jsd_sum(logits_a[..., :vocab], logits_b[..., :vocab], placed))))
        count += float(mask.sum())
    return TestResult(test="jsd", pvalue=None, log10_pvalue=None, exact=False, statistic=total / count, note=NOTE)
