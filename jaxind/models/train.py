"""A small next-token trainer (optax AdamW), for the demo's model zoo and the tests' fine-tunes.

Not a training framework: it exists so the project can make *trained* models offline --
a base model, a fine-tuned copy, an independently trained model -- deterministically.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxind.models import model
from jaxind.models.config import ModelConfig

__all__ = ["next_token_loss", "train", "warmup_cosine_adamw"]


def next_token_loss(params: Any, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]`` (scalar)."""
    logits, _ = model.forward(params, cfg, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer"))
def _step(params, opt_state, cfg, optimizer, tokens):
    loss, grads = jax.value_and_grad(next_token_loss)(params, cfg, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.lru_cache(maxsize=8)
def warmup_cosine_adamw(learning_rate: float, steps: int) -> optax.GradientTransformation:
    """AdamW with warm-up and cosine decay (cached: the same object keeps the jitted step warm)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10), steps)
    return optax.adamw(schedule, weight_decay=0.01)


def train(
    params: Any,
    cfg: ModelConfig,
    corpus: np.ndarray,
    *,
    steps: int,
    batch_size: int = 16,
    seq_len: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> tuple[Any, list[float]]:
    """Trains on random windows of ``corpus`` (1-D token ids); returns ``(params, losses)``.

    Deterministic for a given ``seed``: windows are drawn from ``numpy.random.default_rng(seed)``.
    """
    optimizer = warmup_cosine_adamw(learning_rate, steps)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        starts = rng.integers(0, corpus.shape[0] - seq_len - 1, batch_size)
        tokens = jnp.asarray(np.stack([corpus[s : s + seq_len + 1] for s in starts]), jnp.int32)
        params, opt_state, loss = _step(params, opt_state, cfg, optimizer, tokens)
        losses.append(float(loss))
    return params, losses
