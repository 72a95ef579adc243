"""Tests for cljax.merging.wudi against a float64 NumPy reference (analytic gradient, Adam)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax.merging import wudi as wudilib


def np_wudi(tvs, steps, lr):
  """The authors' loop on (out, in) task vectors: Adam on sum_i |(M - T_i) T_i^T|^2 / |T_i|^2."""
  m = np.sum(tvs, 0)
  mu, nu = np.zeros_like(m), np.zeros_like(m)
  losses = []
  for t in range(1, steps + 1):
    grad, loss = np.zeros_like(m), 0.0
    for tau in tvs:
      n2 = (tau ** 2).sum()
      prod = (m - tau) @ tau.T
      loss += (prod ** 2).sum() / n2
      grad += 2 * prod @ tau / n2
    losses.append(loss)
    mu = 0.9 * mu + 0.1 * grad
    nu = 0.999 * nu + 0.001 * grad ** 2
    m = m - lr * (mu / (1 - 0.9 ** t)) / (np.sqrt(nu / (1 - 0.999 ** t)) + 1e-8)
  return m, np.array(losses)


def _setup(seed=0):
  rng = np.random.default_rng(seed)
  base = {'kernel': rng.normal(size=(5, 3)), 'bias': rng.normal(size=3)}
  models = [{k: v + rng.normal(size=v.shape) for k, v in base.items()} for _ in range(3)]
  j = lambda t: {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}
  return base, models, j(base), [j(m) for m in models]


def test_interference_loss_by_hand():
  # tau_1 = [[1, 0]], tau_2 = [[0, 2]], merged = their sum [[1, 2]]:
  # (M - tau_1) tau_1^T = [[0, 2]] . [1, 0] = 0; (M - tau_2) tau_2^T = [[1, 0]] . [0, 2] = 0.
  tvs = jnp.array([[[1.0, 0.0]], [[0.0, 2.0]]])
  assert float(wudilib.interference_loss(jnp.array([[1.0, 2.0]]), tvs)) == 0.0
  # merged = [[1, 1]]: task 1 sees (0, 1) . (1, 0) = 0; task 2 (1, -1) . (0, 2) = -2 -> 4 / 4.
  np.testing.assert_allclose(wudilib.interference_loss(jnp.array([[1.0, 1.0]]), tvs), 1.0)


@pytest.mark.parametrize('layout', ['in_out', 'out_in'])
def test_matches_numpy_adam(layout):
  base, models, jb, jm = _setup()
  out = wudilib.wudi(jb, jm, num_steps=20, learning_rate=1e-2, kernel_layout=layout)
  tvs = [m['kernel'] - base['kernel'] for m in models]
  if layout == 'in_out':
    merged, _ = np_wudi([t.T for t in tvs], 20, 1e-2)
    merged = merged.T
  else:
    merged, _ = np_wudi(tvs, 20, 1e-2)
  np.testing.assert_allclose(out['kernel'], base['kernel'] + merged, rtol=1e-4, atol=1e-4)
  mean_bias = np.mean([m['bias'] - base['bias'] for m in models], axis=0)
  np.testing.assert_allclose(out['bias'], base['bias'] + mean_bias, rtol=1e-5, atol=1e-5)


def test_loss_decreases_and_zero_task_vector_is_refused():
  base, models, jb, jm = _setup(seed=1)
  tvs = jnp.stack([m['kernel'].T - jb['kernel'].T for m in jm])
  _, losses = wudilib.wudi_matrix(tvs, optimizer=optax.adam(1e-2), num_steps=30)
  assert float(losses[-1]) < float(losses[0])
  with pytest.raises(ValueError, match="zero at 'kernel'"):
    wudilib.wudi(jb, [jm[0], jb], num_steps=1)
  out = wudilib.wudi(jb, [jm[0], jb], num_steps=1, average_only='kernel')
  np.testing.assert_allclose(out['kernel'], (jb['kernel'] + jm[0]['kernel']) / 2, rtol=1e-6)
