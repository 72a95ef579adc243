"""Tests for cljax.merging.frank_wolfe_soft against a float64 NumPy reference: cross-entropy
gradients, the cosine oracle over distinct models, and AdaMerging written out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.merging import frank_wolfe_soft as fws
from tests.merging.test_adamerging import linear
from tests.merging.test_adamerging import np_adamerging


def np_ce_grad(params, x, y):
  z = x @ params['w'] + params['b']
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  dz = (p - np.eye(z.shape[1])[y]) / len(y)
  return {'b': dz.sum(0), 'w': x.T @ dz}


def np_score(grad, x):
  total = 0.0
  for k in ('b', 'w'):
    total += (grad[k] * x[k]).sum() / (np.linalg.norm(grad[k]) * np.linalg.norm(x[k]))
  return total


def _setup(seed=0):
  rng = np.random.default_rng(seed)
  base = {'w': rng.normal(size=(4, 3)), 'b': rng.normal(size=3)}
  models = [{k: v + rng.normal(size=v.shape) for k, v in base.items()} for _ in range(3)]
  data = [(rng.normal(size=(8, 4)), rng.integers(0, 3, size=8)) for _ in range(2)]
  test_x = [rng.normal(size=(5, 4)) for _ in range(2)]
  return base, models, data, test_x


def _jax(tree):
  return {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}


def _ce(x, y):
  def loss(params):
    logp = jax.nn.log_softmax(linear(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
  return loss


def test_two_iterations_match_numpy():
  base, models, data, test_x = _setup()
  loss_fns = [_ce(jnp.asarray(x, jnp.float32), jnp.asarray(y)) for x, y in data]
  params, info = fws.soft_frank_wolfe_with_info(
      _jax(base), [_jax(m) for m in models], loss_fns=loss_fns, apply_fn=linear,
      test_inputs=[jnp.asarray(x, jnp.float32) for x in test_x], num_iterations=2, ada_steps=4,
      ada_init=0.1, learning_rate=0.05)
  merged = base
  expected_picks = []
  for s in range(2):
    picks = []
    for x, y in data:
      g = np_ce_grad(merged, x, y)
      scores = [(np_score(g, m), i) for i, m in enumerate(models) if i not in picks]
      picks.append(min(scores)[1])
    expected_picks.append(picks)
    taus = [{k: models[i][k] - merged[k] for k in merged} for i in picks]
    lam, _ = np_adamerging(merged, taus, test_x, (1.0, 1.0), True, 0.3 if s == 0 else 0.1, 4,
                           0.05)
    merged = {'b': merged['b'] + sum(lam[i, 0] * taus[i]['b'] for i in range(2)),
              'w': merged['w'] + sum(lam[i, 1] * taus[i]['w'] for i in range(2))}
  np.testing.assert_array_equal(info.selected, expected_picks)
  assert info.entropy.shape == (2, 4)
  np.testing.assert_allclose(params['w'], merged['w'], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(params['b'], merged['b'], rtol=1e-4, atol=1e-4)


def test_task_arithmetic_step():
  base, models, data, test_x = _setup(seed=1)
  loss_fns = [_ce(jnp.asarray(x, jnp.float32), jnp.asarray(y)) for x, y in data]
  params, info = fws.soft_frank_wolfe_with_info(
      _jax(base), [_jax(m) for m in models], loss_fns=loss_fns, apply_fn=linear,
      test_inputs=[jnp.asarray(x, jnp.float32) for x in test_x], num_iterations=2,
      merge_fn='task_arithmetic', step_size=0.5, score_on='task_vectors')
  merged = base
  for s, gamma in enumerate([1.0, 2.0 / 3.0 * 0.5]):
    picks = []
    for x, y in data:
      g = np_ce_grad(merged, x, y)
      tvs = [{k: m[k] - base[k] for k in base} for m in models]
      picks.append(min((np_score(g, t), i) for i, t in enumerate(tvs) if i not in picks)[1])
    np.testing.assert_array_equal(info.selected[s], picks)
    merged = {k: merged[k] + 0.3 * gamma * sum(models[i][k] - merged[k] for i in picks)
              for k in merged}
  np.testing.assert_allclose(params['w'], merged['w'], rtol=1e-5, atol=1e-5)


def test_errors():
  base, models, data, test_x = _setup()
  loss_fns = [_ce(jnp.asarray(x, jnp.float32), jnp.asarray(y)) for x, y in data]
  with pytest.raises(ValueError, match='one array per task'):
    fws.soft_frank_wolfe(_jax(base), [_jax(m) for m in models], loss_fns=loss_fns,
                         apply_fn=linear, test_inputs=[jnp.asarray(test_x[0])])
  with pytest.raises(ValueError, match='merge_fn'):
    fws.soft_frank_wolfe(_jax(base), [_jax(m) for m in models], loss_fns=loss_fns,
                         apply_fn=linear, test_inputs=test_x, merge_fn='ties')
