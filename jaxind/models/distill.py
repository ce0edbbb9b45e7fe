"""Logit distillation (optax AdamW): a student trained only to imitate a teacher's next-token distributions.

A student built here from its own random initialisation satisfies the null hypothesis of independence
(docs/DESIGN.md §5.17): its loss depends on the student only through the function it computes, so the
training is equivariant under the student's symmetry group, and nothing of the teacher's weights reaches it
but its outputs. The tests use it to check that no test calls such a student dependent; benchmarks use it to
build a distilled model. Pure functions over param trees, like :mod:`jaxind.models.train`; every random choice
comes from an explicit key.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxind.errors import JaxindError
from jaxind.models import model, train
from jaxind.models.config import ModelConfig

__all__ = ["distill", "distill_loss", "kl_to_teacher"]


def _log_probs(params: Any, cfg: ModelConfig, tokens: jax.Array, temperature: float) -> jax.Array:
    logits, _ = model.forward(params, cfg, tokens)
    assert logits is not None  # return_logits=True
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def distill_loss(
    student: Any,
    student_cfg: ModelConfig,
    teacher_log_probs: jax.Array,
    tokens: jax.Array,
    temperature: float = 1.0,
) -> jax.Array:
    """``T^2`` times the mean over positions of ``KL(teacher_T || student_T)`` (scalar; Hinton et al.'s scaling,
    so gradients keep their size across temperatures). ``teacher_log_probs``: the teacher's log-softmax of
    ``logits / T`` on ``tokens``."""
    student_log_probs = _log_probs(student, student_cfg, tokens, temperature)
    kl = optax.losses.kl_divergence_with_log_targets(student_log_probs, teacher_log_probs)
    return temperature**2 * kl.mean()


def kl_to_teacher(
    student: Any,
    student_cfg: ModelConfig,
    teacher: Any,
    teacher_cfg: ModelConfig,
    tokens: np.ndarray | jax.Array,
    temperature: float = 1.0,
) -> float:
    """Mean over the positions of ``tokens (N, T)`` of ``KL(teacher || student)`` at ``temperature`` (nats)."""
    _check_vocab(student_cfg, teacher_cfg)
    tokens = jnp.asarray(tokens, jnp.int32)
    target = _log_probs(teacher, teacher_cfg, tokens, temperature)
    return float(distill_loss(student, student_cfg, target, tokens, temperature)) / temperature**2


@functools.partial(jax.jit, static_argnames=("student_cfg", "teacher_cfg", "optimizer", "temperature"))
def _step(student, opt_state, teacher, tokens, student_cfg, teacher_cfg, optimizer, temperature):
    target = jax.lax.stop_gradient(_log_probs(teacher, teacher_cfg, tokens, temperature))
    loss, grads = jax.value_and_grad(distill_loss)(student, student_cfg, target, tokens, temperature)
    updates, opt_state = optimizer.update(grads, opt_state, student)
    return optax.apply_updates(student, updates), opt_state, loss


def _check_vocab(student_cfg: ModelConfig, teacher_cfg: ModelConfig) -> None:
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise JaxindError(
            f"distillation needs the teacher's tokenizer: the student's vocabulary has {student_cfg.vocab_size} "
            f"entries, the teacher's {teacher_cfg.vocab_size}; give the student vocab_size={teacher_cfg.vocab_size}"
        )


def distill(
    student: Any,
    student_cfg: ModelConfig,
    teacher: Any,
    teacher_cfg: ModelConfig,
    corpus: np.ndarray,
    *,
    key: jax.Array,
    steps: int,
    temperature: float = 1.0,
    batch_size: int = 16,
    seq_len: int = 64,
    learning_rate: float = 3e-3,
) -> tuple[Any, list[float]]:
    """Trains ``student`` to imitate ``teacher`` by logit KL on random windows of ``corpus``.

    Args:
      student: the student's initial params (give it its own random init, e.g.
        ``model.init_params(student_cfg, key)``, for a student independent of the teacher under H0).
      student_cfg: the student's config; any width or depth, the teacher's vocabulary (same tokenizer).
      teacher, teacher_cfg: the teacher's params and config (never updated).
      corpus: 1-D token ids, the text the student sees (through the teacher's distributions only: the
        corpus's own next tokens are not a target).
      key: draws the windows (step ``i`` from ``fold_in(key, i)``); the same key gives the same student.
      steps, batch_size, seq_len, learning_rate: AdamW with warm-up and cosine decay, as
        :func:`jaxind.models.train.train`.
      temperature: both distributions are softmaxes of ``logits / temperature``; the loss is scaled by
        ``temperature ** 2``.

    Returns:
      ``(student params, losses)``: the loss of each step (``T^2`` times the mean KL of the batch).

    Raises:
      JaxindError: the vocabularies differ, the temperature is not positive or the corpus is shorter
        than one window.
    """
    _check_vocab(student_cfg, teacher_cfg)
    if not temperature > 0:
        raise JaxindError(f"distillation temperature must be positive (got {temperature})")
    corpus = np.asarray(corpus)
    if corpus.ndim != 1 or corpus.shape[0] < seq_len + 1:
        raise JaxindError(f"distillation needs a 1-D corpus of at least {seq_len + 1} tokens (seq_len + 1)")
    optimizer = train.warmup_cosine_adamw(learning_rate, steps)
    opt_state = optimizer.init(student)
    corpus_dev = jnp.asarray(corpus, jnp.int32)
    offsets = jnp.arange(seq_len)
    losses = []
    for i in range(steps):
        starts = jax.random.randint(jax.random.fold_in(key, i), (batch_size, 1), 0, corpus.shape[0] - seq_len + 1)
        tokens = corpus_dev[starts + offsets]
        student, opt_state, loss = _step(
            student, opt_state, teacher, tokens, student_cfg, teacher_cfg, optimizer, float(temperature)
        )
        losses.append(float(loss))
    return student, losses
