"""CSU after aligning the residual streams: a rotation-robust weight test without data (docs/DESIGN.md §5.16).

A suspect may rotate its residual stream (``x -> x R``, ``R`` orthogonal, norm gains folded first:
:func:`jaxind.models.symmetry.rotate_residual`) and permute its MLP units. Plain CSU compares up-projection
columns in residual coordinates, so a rotation hides the copy. Here the map between the two residual streams
is fitted first, by orthogonal Procrustes on the embedding rows of the tokens both vocabularies share
(:mod:`jaxind.io.shared_vocab`): ``R = argmin_{R orthogonal} |E_A[shared] R - E_B[shared]|_F``, the ``U V^T`` of
the SVD of ``E_A^T E_B`` (what :func:`scipy.linalg.orthogonal_procrustes` returns). Each layer's MLP-norm gain
is folded into its up-projection (``diag(g) W_up``, as :func:`~jaxind.models.symmetry.fold_norms` does before a
rotation), B's folded up-projection is brought into A's coordinates (``R W_up,B``), and CSU runs on the pair:
units matched by cosine (LAP), Spearman of matched vs own index, Fisher over layers.

The p-value is exact under the same assumption as CSU's: under H0, B's hidden units of each layer are
exchangeable (a uniform permutation ``t_l`` independent of everything else). ``R`` depends on the embeddings
only, which ``t_l`` does not move, and the mlp gain is per residual coordinate, so ``t_l`` only permutes the
columns of the cosine matrix; with the LAP's keyed relabelling of ties the matching is uniform given the rest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxind.errors import JaxindError
from jaxind.io.shared_vocab import SharedTokens, shared_by_id
from jaxind.models.config import ModelConfig
from jaxind.models.layer_selection import Layers, resolve_pairs
from jaxind.parallel import sharding
from jaxind.stats.constrained import cosine_matrix, matched_spearman
from jaxind.stats.results import LayerResult, TestResult, fisher_result, timed
from jaxind.types import Params

__all__ = ["csu_aligned", "check_models", "procrustes", "folded_up", "NOTE"]

NOTE = (
    "exact under CSU's assumption (B's MLP units exchangeable under H0): the residual map is fitted on "
    "embeddings, which B's unit order does not move"
)


def procrustes(emb_a: jax.Array, emb_b: jax.Array) -> tuple[np.ndarray, float]:
    """The orthogonal ``R (d, d)`` minimising ``|emb_a R - emb_b|_F`` over rows ``(n, d)`` of both, and the fit's
    relative residual ``min_{s, R} |s emb_a R - emb_b|_F / |emb_b|_F`` (0: an exact scaled rotation; near 1:
    unrelated embeddings), i.e. ``sqrt(1 - (sum sigma)^2 / (|emb_a|^2 |emb_b|^2))`` with ``sigma`` the singular
    values of ``emb_a^T emb_b``."""
    a, b = jnp.asarray(emb_a, jnp.float32), jnp.asarray(emb_b, jnp.float32)
    cross = sharding.to_host(jnp.matmul(a.T, b, precision=jax.lax.Precision.HIGHEST)).astype(np.float64)
    u, sigma, vt = np.linalg.svd(cross)
    norms = float(sharding.to_host(jnp.sum(a * a))) * float(sharding.to_host(jnp.sum(b * b)))
    fit = float(sigma.sum()) ** 2 / max(norms, 1e-300)
    return u @ vt, float(np.sqrt(max(0.0, 1.0 - fit)))


def folded_up(params: Params, cfg: ModelConfig, layer: int) -> jax.Array:
    """Layer ``layer``'s up-projection ``(d, h)`` with its MLP-norm gain folded into the rows (``diag(off + g)
    W_up``; unchanged where no norm weight reads the MLP input, e.g. OLMo 2's post-norms), in float32."""
    up = jnp.asarray(params["layers"]["up"][layer], jnp.float32)
    if "mlp_norm" not in params["layers"]:
        return up
    gain = cfg.norm_offset + jnp.asarray(params["layers"]["mlp_norm"][layer], jnp.float32)
    return gain[:, None] * up


def check_models(cfg_a: ModelConfig, cfg_b: ModelConfig) -> None:
    """Refuses pairs the test does not apply to (before any tokenizer is read).

    Raises:
      JaxindError: different residual widths, or a model without a dense MLP (a mixture of experts).
    """
    if cfg_a.d_model != cfg_b.d_model:
        raise JaxindError(
            f"csu_aligned maps one residual stream onto the other, so it needs the same residual width "
            f"(d={cfg_a.d_model} vs {cfg_b.d_model}): use --tests=match for models of different widths"
        )
    if cfg_a.moe or cfg_b.moe or not (cfg_a.d_ff and cfg_b.d_ff):
        raise JaxindError("csu_aligned compares dense MLPs; for a mixture of experts use --tests=match")


def _check_shared(shared: SharedTokens, d: int) -> None:
    if len(shared) < d:
        raise JaxindError(
            f"csu_aligned found {len(shared):,} tokens both vocabularies share (by {shared.by}), fewer than the "
            f"residual width d={d} the map between the two residual streams needs: use --tests=match "
            "(activations on text, robust to rotations)"
        )


@timed
def csu_aligned(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    *,
    key: jax.Array,
    layers: Layers = None,
    shared: SharedTokens | None = None,
    return_map: bool = False,
) -> TestResult:
    """CSU on up-projections after mapping B's residual stream onto A's (module doc).

    Args:
      layers: a layer selection (:mod:`jaxind.models.layer_selection`), default ``(l, l)`` for the shared depth.
      shared: the tokens both vocabularies share (:func:`jaxind.io.shared_vocab.shared_tokens`); default: ids
        as strings, ``0 .. min(vocab) - 1``.
      return_map: also put the map ``R (d, d)`` in ``extra["procrustes"]["map"]`` (``d^2`` numbers in the JSON).

    Returns:
      A Fisher-combined :class:`TestResult`; ``extra["procrustes"]``: ``shared_tokens`` (count), ``by``
      (``"string"``/``"id"``), ``residual`` (the fit's relative residual) and ``trace`` (``tr(R) / d``: 1 for the
      identity, near 0 for a random rotation).

    Raises:
      JaxindError: different widths, a mixture of experts, or fewer shared tokens than the width.
    """
    shared = shared_by_id(cfg_a.vocab_size, cfg_b.vocab_size) if shared is None else shared
    check_models(cfg_a, cfg_b)
    _check_shared(shared, cfg_a.d_model)
    pairs = resolve_pairs(layers, cfg_a, cfg_b, "csu_aligned")
    emb_a = jnp.take(params_a["embed"], jnp.asarray(shared.ids_a), axis=0)
    emb_b = jnp.take(params_b["embed"], jnp.asarray(shared.ids_b), axis=0)
    rotation, residual = procrustes(emb_a, emb_b)
    rot = jnp.asarray(rotation, jnp.float32)
    records = []
    for (la, lb), k in zip(pairs, jax.random.split(key, len(pairs))):
        aligned_b = jnp.matmul(rot, folded_up(params_b, cfg_b, lb), precision=jax.lax.Precision.HIGHEST)
        sim = cosine_matrix(folded_up(params_a, cfg_a, la), aligned_b)
        result, _, _ = matched_spearman(sharding.to_host(sim), k)
        records.append(LayerResult.from_spearman(la, lb, result))
    info = {
        "shared_tokens": len(shared),
        "by": shared.by,
        "residual": residual,
        "trace": float(np.trace(rotation)) / cfg_a.d_model,
    }
    if return_map:
        info["map"] = rotation
    return fisher_result("csu_aligned", records, exact=True, note=NOTE, procrustes=info)
