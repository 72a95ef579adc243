"""Diagonal Fisher information of a classifier, shared by EWC and Fisher merging.

For a model with predictive distribution p(c | x, theta), the diagonal Fisher is

    F = E_x E_{c ~ p(c|x)} [ (d log p(c|x, theta) / d theta)^2 ]            (1)

``estimator='exact'`` (the default) computes the inner expectation in closed form, summing over
all classes weighted by the model's own probabilities: one backward pass per class per example,
no sampling noise, and no dependence on the labels. This is the "true" Fisher of Kirkpatrick et
al. (2017) evaluated exactly, rather than with a single sample (``'sampled'``), or the "empirical
Fisher" that puts the true label in place of the expectation (``'empirical'``), which Kunstner et
al. (NeurIPS 2019) show can be a poor curvature estimate.

The outer expectation is the mean over the examples given. Outputs outside an example's mask
(another task's head) have probability 0 and contribute nothing.

References:
  Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017, Eq. 3.
  Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022, Eq. 4.
  Kunstner, Hennig & Balles, "Limitations of the empirical Fisher approximation", NeurIPS 2019.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import core

Params = Any
ESTIMATORS = ('exact', 'sampled', 'empirical')


def _log_probs(apply_fn, params, x, mask):
  """log p(. | x) for one example: (K,)."""
  logits = apply_fn(params, x[None], train=False)
  return jax.nn.log_softmax(core.masked_logits(logits, None if mask is None else mask[None]).astype(jnp.float32))[0]


def _example_fisher(apply_fn, estimator, params, x, y, mask, key):
  """The squared-gradient term of Eq. (1) for a single example."""
  if estimator == 'exact':
    jac = jax.jacrev(functools.partial(_log_probs, apply_fn), argnums=0)(params, x, mask)
    probs = jax.lax.stop_gradient(jnp.exp(_log_probs(apply_fn, params, x, mask)))
    return jax.tree.map(lambda j: jnp.tensordot(probs, jnp.square(j), axes=1), jac)
  if estimator == 'sampled':
    logp = _log_probs(apply_fn, params, x, mask)
    label = jax.random.categorical(key, jax.lax.stop_gradient(logp))
  else:  # 'empirical'
    label = y
  grads = jax.grad(lambda p: _log_probs(apply_fn, p, x, mask)[label])(params)
  return jax.tree.map(jnp.square, grads)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chunk_fisher_sum(apply_fn, estimator, params, x, y, mask, valid, keys):
  per_example = jax.vmap(functools.partial(_example_fisher, apply_fn, estimator),
                         in_axes=(None, 0, 0, 0, 0))(params, x, y, mask, keys)
  weights = valid.astype(jnp.float32)
  return jax.tree.map(lambda f: jnp.tensordot(weights, f, axes=1), per_example)


def diagonal_fisher(
    apply_fn: core.ApplyFn,
    params: Params,
    data: core.Batch,
    *,
    estimator: str = 'exact',
    key: Optional[jax.Array] = None,
    batch_size: int = 32,
) -> Params:
  """Diagonal Fisher information, Eq. (1), averaged over the examples in ``data``.

  Args:
    apply_fn: ``apply_fn(params, x, train=False) -> logits`` (B, K).
    params: parameter pytree of float arrays.
    data: `Batch` of host or device arrays: x (N, ...), y (N,) int, mask (N, K) bool.
    estimator: 'exact' (sum over classes, weighted by the model's probabilities), 'sampled'
      (one label sampled from the model per example; needs ``key``) or 'empirical' (true labels).
    key: PRNG key, required for 'sampled'.
    batch_size: examples per jitted chunk; memory is about batch_size * K * num_params floats for
      'exact'.

  Returns:
    A pytree like ``params``, float32, non-negative: mean over examples of the squared score.

  Raises:
    ValueError: unknown estimator, empty data, or 'sampled' without a key.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f'unknown Fisher estimator {estimator!r}; choose one of {ESTIMATORS}')
  n = data.size
  if n == 0:
    raise ValueError('diagonal_fisher needs at least one example')
  if estimator == 'sampled' and key is None:
    raise ValueError("estimator='sampled' needs a PRNG key")
  keys = jax.random.split(key if key is not None else jax.random.key(0), n)
  total = optax.tree.zeros_like(jax.tree.map(lambda p: p.astype(jnp.float32), params))
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    idx = np.arange(start, start + batch_size).clip(max=n - 1)  # Pad to one compiled shape.
    valid = np.arange(start, start + batch_size) < stop
    chunk = [None if a is None else np.asarray(a)[idx] for a in (data.x, data.y, data.mask)]
    total = optax.tree.add(total, _chunk_fisher_sum(apply_fn, estimator, params, *chunk,
                                                    jnp.asarray(valid), keys[idx]))
  return optax.tree.scale(1.0 / n, total)
