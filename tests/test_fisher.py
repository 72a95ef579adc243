"""Diagonal Fisher against the closed form of a linear softmax model.

For logits z = x W (W: (d, K)), d log p_c / d W[j, k] = x_j (delta_ck - p_k), so
  exact:     F[j, k] = mean_n x_nj^2 sum_c p_c (delta_ck - p_k)^2 = mean_n x_nj^2 p_nk (1 - p_nk)
  empirical: F[j, k] = mean_n x_nj^2 (delta_{y_n k} - p_nk)^2
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import fisher
from cljax import core


def apply_fn(params, x, *, train=False, rngs=None):
  del train, rngs
  return x.reshape(x.shape[0], -1) @ params['w']


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture
def problem():
  rng = np.random.default_rng(0)
  n, d, k = 7, 5, 4
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, k, size=n).astype(np.int32)
  w = rng.normal(size=(d, k)).astype(np.float32)
  return {'w': jnp.asarray(w)}, core.Batch(x, y, np.ones((n, k), bool))


def test_exact_matches_closed_form(problem):
  params, data = problem
  p = _softmax(data.x @ np.asarray(params['w'], np.float64))
  expected = np.mean(data.x[:, :, None] ** 2 * (p * (1 - p))[:, None, :], axis=0)
  got = fisher.diagonal_fisher(apply_fn, params, data, estimator='exact', batch_size=3)
  np.testing.assert_allclose(got['w'], expected, rtol=1e-5, atol=1e-7)


def test_empirical_matches_closed_form(problem):
  params, data = problem
  p = _softmax(data.x @ np.asarray(params['w'], np.float64))
  onehot = np.eye(4)[data.y]
  expected = np.mean(data.x[:, :, None] ** 2 * ((onehot - p) ** 2)[:, None, :], axis=0)
  got = fisher.diagonal_fisher(apply_fn, params, data, estimator='empirical', batch_size=4)
  np.testing.assert_allclose(got['w'], expected, rtol=1e-5, atol=1e-7)


def test_sampled_converges_to_exact(problem):
  params, data = problem
  many = jax.tree.map(lambda a: np.repeat(a, 600, axis=0), data)
  exact = fisher.diagonal_fisher(apply_fn, params, data)
  sampled = fisher.diagonal_fisher(apply_fn, params, many, estimator='sampled',
                                   key=jax.random.key(1), batch_size=600)
  np.testing.assert_allclose(sampled['w'], exact['w'], rtol=0.15, atol=0.01)


def test_mask_restricts_to_the_task_head(problem):
  params, data = problem
  mask = np.zeros((7, 4), bool)
  mask[:, :2] = True  # this task's head is outputs 0 and 1
  p = _softmax(data.x @ np.asarray(params['w'], np.float64)[:, :2])
  expected = np.zeros((5, 4))
  expected[:, :2] = np.mean(data.x[:, :, None] ** 2 * (p * (1 - p))[:, None, :], axis=0)
  got = fisher.diagonal_fisher(apply_fn, params, core.Batch(data.x, data.y % 2, mask))
  assert np.isfinite(np.asarray(got['w'])).all()
  np.testing.assert_allclose(got['w'], expected, rtol=1e-5, atol=1e-7)


def test_errors(problem):
  params, data = problem
  with pytest.raises(ValueError, match='unknown Fisher estimator'):
    fisher.diagonal_fisher(apply_fn, params, data, estimator='kfac')
  with pytest.raises(ValueError, match='PRNG key'):
    fisher.diagonal_fisher(apply_fn, params, data, estimator='sampled')
  empty = core.Batch(data.x[:0], data.y[:0], data.mask[:0])
  with pytest.raises(ValueError, match='at least one example'):
    fisher.diagonal_fisher(apply_fn, params, empty)
