"""Core types shared by every layer: `Batch`, the model function type, losses and evaluation sums.

A model is the pair ``(apply_fn, params)`` with ``apply_fn(params, x, *, train=False, rngs=None)
-> logits``, either ``(B, K)`` (one prediction per example: classifiers) or ``(B, L, V)`` (one per
position: language models). Labels are ``(B,)`` or ``(B, L)`` to match, and every loss and metric
here is a *weighted mean over labelled positions*: ``Batch.weights`` gives each example or token
its weight (padding 0), so packed token batches, padded evaluation batches and class-balanced
losses are one code path.

This module imports nothing of cljax (the bottom of the import graph).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
ApplyFn = Callable[..., jax.Array]

# An empty `aux`, shared and never mutated: use ``batch.with_aux(name=array)`` to add entries.
_NO_AUX: Mapping[str, Any] = {}


class Batch(NamedTuple):
  """A batch of examples, or a whole task's data when its arrays are host numpy arrays.

  Attributes:
    x: inputs, e.g. (B, H, W, C) float32 images in [0, 1] or (B, L) int32 token ids.
    y: labels, (B,) int32 (one per example) or (B, L) int32 (one per token), indices into the
      model's outputs.
    mask: None, or (B, K) bool: the outputs each example may use. Task-incremental streams give
      each task its own head (a disjoint block of outputs); masking the other outputs is exactly
      training/evaluating that head alone. None means every output (class- and
      domain-incremental streams, language models).
    weights: None, or float32 (B,) per example or (B, L) per token: each labelled position's
      weight in losses and metrics (padding 0). None weighs every position 1.
    aux: ``{name: array with leading axis B}``, method-specific arrays travelling with the
      examples (e.g. ``'teacher_logits'`` recorded by LwF, ``'projected_inputs'`` by GPM).
      Never mutate it: `with_aux` returns a new batch.

  Batches are pytrees; ``jax.tree.map(fn, batch)`` maps every array and skips absent (None)
  fields.
  """

  x: Any
  y: Any
  mask: Any = None
  weights: Any = None
  aux: Mapping[str, Any] = _NO_AUX

  @property
  def size(self) -> int:
    """Number of examples (the leading axis of ``y``)."""
    return int(self.y.shape[0])

  def with_aux(self, **arrays: Any) -> 'Batch':
    """A copy whose ``aux`` also holds ``arrays``."""
    return self._replace(aux={**self.aux, **arrays})


class Evaluation(NamedTuple):
  """Accuracy (fraction in [0, 1]) and mean negative log-likelihood (nats) over labelled
  positions; scalars, or (T,) arrays for one accuracy-matrix row."""

  accuracy: Any
  nll: Any


def masked_logits(logits: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """Sets the logits of outputs outside ``mask`` to a very negative finite value.

  A finite value rather than ``-inf`` keeps ``p * log p`` at exactly 0 (not NaN) for masked
  classes, which the exact Fisher sums over.

  Args:
    logits: (B, K) or (B, L, K) float.
    mask: (B, K) bool (broadcast over positions), or None for no masking.

  Returns:
    Logits of the same shape and dtype.
  """
  if mask is None:
    return logits
  if logits.ndim == 3:
    mask = mask[:, None, :]
  return jnp.where(mask, logits, jnp.asarray(-1e9, logits.dtype))


def position_weights(labels: jax.Array, weights: Optional[jax.Array]) -> jax.Array:
  """The float32 weight of every labelled position, shaped like ``labels``.

  Args:
    labels: (B,) or (B, L) int.
    weights: None (all 1), (B,) per example (broadcast over positions) or ``labels.shape``.

  Raises:
    ValueError: ``weights`` has neither shape.
  """
  if weights is None:
    return jnp.ones(labels.shape, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape == labels.shape:
    return weights
  if weights.shape == labels.shape[:1]:
    return jnp.broadcast_to(weights.reshape(weights.shape + (1,) * (labels.ndim - 1)),
                            labels.shape)
  raise ValueError(f'Batch.weights has shape {weights.shape}; expected {labels.shape[:1]} '
                   f'(per example) or {labels.shape} (per position)')


def _check_shapes(logits: jax.Array, labels: jax.Array) -> None:
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f'logits {logits.shape} do not match labels {labels.shape}: expected '
                     'logits (B, K) for labels (B,) or (B, L, V) for labels (B, L)')


def token_nll(logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """Per-position softmax cross-entropy (nats), float32, shaped like ``labels``.

  Args:
    logits: (B, K) or (B, L, V) float.
    labels: (B,) or (B, L) int, each inside its example's mask.
    mask: (B, K) bool or None.
  """
  _check_shapes(logits, labels)
  logits = masked_logits(logits, mask).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None,
                  weights: Optional[jax.Array] = None) -> jax.Array:
  """Weighted mean softmax cross-entropy over labelled positions, restricted to ``mask``.

  ``sum(w * nll) / sum(w)`` (0 when every weight is 0); the plain mean when ``weights`` is None.

  Args:
    logits: (B, K) or (B, L, V) float.
    labels: (B,) or (B, L) int.
    mask: (B, K) bool or None.
    weights: None, (B,) or ``labels.shape`` float (see `position_weights`).

  Returns:
    Scalar float32, in nats.
  """
  nll = token_nll(logits, labels, mask)
  if weights is None:
    return nll.mean()
  w = position_weights(labels, weights)
  return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1e-12)


def batch_loss(logits: jax.Array, batch: Batch) -> jax.Array:
  """`cross_entropy` of ``logits`` on ``batch``'s labels, mask and weights."""
  return cross_entropy(logits, batch.y, batch.mask, batch.weights)


class EvalSums(NamedTuple):
  """Sums over a batch's labelled positions: ``correct`` (weighted count of arg-max hits),
  ``nll`` (weighted NLL, nats) and ``weight`` (sum of weights); float32 scalars."""

  correct: jax.Array
  nll: jax.Array
  weight: jax.Array


def eval_sums(logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None,
              weights: Optional[jax.Array] = None) -> EvalSums:
  """Weighted sums for accuracy (correct / weight) and mean NLL (nll / weight) over positions.

  Args:
    logits: (B, K) or (B, L, V) float.
    labels: (B,) or (B, L) int.
    mask: (B, K) bool or None.
    weights: None, (B,) or ``labels.shape`` (padding rows or tokens 0).
  """
  w = position_weights(labels, weights)
  hits = jnp.argmax(masked_logits(logits, mask), axis=-1) == labels
  return EvalSums(jnp.sum(w * hits), jnp.sum(w * token_nll(logits, labels, mask)), jnp.sum(w))


def concatenate(batches: Sequence[Batch]) -> Batch:
  """Concatenates host batches (e.g. several tasks' data) along the example axis.

  Raises:
    ValueError: no batches, or batches whose fields differ (e.g. one has weights).
  """
  if not batches:
    raise ValueError('concatenate needs at least one batch')
  structures = {jax.tree.structure(b) for b in batches}
  if len(structures) > 1:
    raise ValueError(f'cannot concatenate batches with different fields: {structures}')
  return jax.tree.map(lambda *parts: np.concatenate(parts, axis=0), *batches)
