"""Tests for cljax.merging.adamerging against a float64 NumPy reference (analytic entropy
gradient of a linear softmax model, Adam written out)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax.merging import adamerging as ada

EPS = 1e-8


def linear(params, x):
  return x @ params['w'] + params['b']


def doubled(params, x):
  return 2.0 * linear(params, x)


def np_entropy_grad(z):
  """(mean entropy, dH/dz) for logits (B, K), H = -sum p log(p + eps)."""
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  h = -(p * np.log(p + EPS)).sum(1).mean()
  g = -(np.log(p + EPS) + p / (p + EPS))
  dz = p * (g - (p * g).sum(1, keepdims=True))
  return h, dz / z.shape[0]


def np_adamerging(base, taus, xs, scales, layer, init, steps, lr):
  n = len(taus)
  lam = np.full((n, 2) if layer else (n,), init)
  m, v = np.zeros_like(lam), np.zeros_like(lam)
  losses = []
  for t in range(1, steps + 1):
    coef = lam if layer else np.repeat(lam[:, None], 2, 1)
    w = base['w'] + sum(coef[i, 1] * taus[i]['w'] for i in range(n))   # leaves: b (0), w (1)
    b = base['b'] + sum(coef[i, 0] * taus[i]['b'] for i in range(n))
    gw, gb, loss = np.zeros_like(w), np.zeros_like(b), 0.0
    for x, c in zip(xs(t - 1) if callable(xs) else xs, scales):
      h, dz = np_entropy_grad(c * (x @ w + b))
      loss += h
      gw += c * x.T @ dz
      gb += c * dz.sum(0)
    losses.append(loss)
    grad = np.stack([[(gb * tau['b']).sum(), (gw * tau['w']).sum()] for tau in taus])
    if not layer:
      grad = grad.sum(1)
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad ** 2
    lam = lam - lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
  return lam, np.array(losses)


def _setup(seed=0, n=2):
  rng = np.random.default_rng(seed)
  base = {'w': rng.normal(size=(4, 3)), 'b': rng.normal(size=3)}
  taus = [{'w': rng.normal(size=(4, 3)), 'b': rng.normal(size=3)} for _ in range(n)]
  xs = [rng.normal(size=(6, 4)) for _ in range(n)]
  j = lambda t: {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}
  models = [j({k: base[k] + tau[k] for k in base}) for tau in taus]
  return base, taus, xs, j(base), models


@pytest.mark.parametrize('granularity', ['task', 'layer'])
def test_matches_numpy_adam_on_entropy(granularity):
  base, taus, xs, jb, jm = _setup()
  params, info = ada.adamerging_with_info(
      jb, jm, apply_fn=(linear, doubled), test_inputs=[jnp.asarray(x, jnp.float32) for x in xs],
      granularity=granularity, init=0.3, num_steps=5, learning_rate=0.05)
  lam, losses = np_adamerging(base, taus, xs, (1.0, 2.0), granularity == 'layer', 0.3, 5, 0.05)
  np.testing.assert_allclose(info.coefficients, lam, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(info.loss, losses, rtol=1e-5, atol=1e-6)
  coef = lam if granularity == 'layer' else np.repeat(lam[:, None], 2, 1)
  expected_w = base['w'] + sum(coef[i, 1] * taus[i]['w'] for i in range(2))
  np.testing.assert_allclose(params['w'], expected_w, rtol=1e-4, atol=1e-4)


def test_the_entropy_goes_down_and_merge_with_coefficients_agrees():
  base, taus, xs, jb, jm = _setup(seed=1)
  xs = [jnp.asarray(x, jnp.float32) for x in xs]
  params, info = ada.adamerging_with_info(jb, jm, apply_fn=linear, test_inputs=xs, num_steps=40,
                                          learning_rate=0.05)
  assert float(info.loss[-1]) < float(info.loss[0])
  again = ada.merge_with_coefficients(jb, jm, info.coefficients)
  np.testing.assert_allclose(again['w'], params['w'], rtol=1e-6)
  with pytest.raises(ValueError, match=r'coefficients of shape \(3,\)'):
    ada.merge_with_coefficients(jb, jm, jnp.ones(3))


def test_entropy_by_hand():
  # Uniform over 4 classes: log 4 (up to eps); a one-hot-like row ~ 0.
  z = jnp.array([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(ada.entropy(z), np.log(4) / 2, rtol=1e-5)


def test_clamp_excludes_and_errors():
  _, _, xs, jb, jm = _setup()
  xs = [jnp.asarray(x, jnp.float32) for x in xs]
  params, info = ada.adamerging_with_info(jb, jm, apply_fn=linear, test_inputs=xs, num_steps=3,
                                          granularity='task', exclude='b',
                                          optimizer=optax.sgd(1e3), clamp=True)
  np.testing.assert_array_equal(params['b'], jb['b'])
  lam = np.clip(np.asarray(info.coefficients), 0, 1)
  expected = jb['w'] + sum(l * (m['w'] - jb['w']) for l, m in zip(lam, jm))
  np.testing.assert_allclose(params['w'], expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='test_inputs must be a sequence of 2 arrays'):
    ada.adamerging(jb, jm, apply_fn=linear, test_inputs=xs[:1], num_steps=1)
  with pytest.raises(ValueError, match='2 callables'):
    ada.adamerging(jb, jm, apply_fn=(linear,), test_inputs=xs, num_steps=1)


def test_batches_cycle_in_order():
  base, taus, xs, jb, jm = _setup(seed=2)
  # batch_size 4 of 6 rows: step s uses rows 4s .. 4s + 3 mod 6: (0-3), (4, 5, 0, 1), (2-5).
  xs32 = [jnp.asarray(x, jnp.float32) for x in xs]
  lam_jax = ada.adamerging_with_info(jb, jm, apply_fn=linear, test_inputs=xs32, num_steps=3,
                                     batch_size=4, learning_rate=0.01)[1]
  batches = lambda s: [x[(4 * s + np.arange(4)) % 6] for x in xs]
  lam, losses = np_adamerging(base, taus, batches, (1.0, 1.0), True, 0.3, 3, 0.01)
  np.testing.assert_allclose(lam_jax.loss, losses, rtol=1e-5)
  np.testing.assert_allclose(lam_jax.coefficients, lam, rtol=1e-4, atol=1e-6)
