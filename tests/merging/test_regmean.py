"""Tests for cljax.merging.regmean: least squares (NumPy lstsq), the alpha reduction, layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.merging import regmean as rm


def _setup(seed=0, n=3, d_in=5, d_out=4, rows=30):
  rng = np.random.default_rng(seed)
  base = {'dense': {'kernel': rng.normal(size=(d_in, d_out)), 'bias': rng.normal(size=d_out)}}
  models = [{'dense': {'kernel': base['dense']['kernel'] + rng.normal(size=(d_in, d_out)),
                       'bias': base['dense']['bias'] + rng.normal(size=d_out)}} for _ in range(n)]
  xs = [rng.normal(size=(rows, d_in)) * rng.uniform(0.5, 2.0, size=d_in) for _ in range(n)]
  j = lambda t: {'dense': {k: jnp.asarray(v, jnp.float32) for k, v in t['dense'].items()}}
  return base, models, xs, j(base), [j(m) for m in models]


def test_gram_matrices_average_over_batches():
  x = np.random.default_rng(1).normal(size=(2, 6, 3))   # (batch, seq, d): 12 rows
  np.testing.assert_allclose(rm.gram_matrix(jnp.asarray(x)),
                             x.reshape(-1, 3).T @ x.reshape(-1, 3) / 12, rtol=1e-5)
  got = rm.gram_matrices({'k': [jnp.asarray(x[0]), jnp.asarray(x[1, :2])]})['k']
  rows = np.concatenate([x[0], x[1, :2]])
  np.testing.assert_allclose(got, rows.T @ rows / 8, rtol=1e-5)
  with pytest.raises(ValueError, match="'k'"):
    rm.gram_matrices({'k': [jnp.zeros((2, 3)), jnp.zeros((2, 4))]})


def test_alpha_one_is_the_least_squares_merge():
  base, models, xs, jb, jm = _setup()
  grams = [rm.gram_matrices({'dense/kernel': jnp.asarray(x)}) for x in xs]
  out = rm.regmean(jb, jm, grams=grams, alpha=1.0)
  # Equal row counts: argmin_K sum_i |X_i K - X_i K_i|^2, by lstsq on the stacked system.
  a = np.concatenate(xs)
  b = np.concatenate([x @ m['dense']['kernel'] for x, m in zip(xs, models)])
  expected = np.linalg.lstsq(a, b, rcond=None)[0]
  np.testing.assert_allclose(out['dense']['kernel'], expected, rtol=1e-4, atol=1e-4)
  mean_bias = np.mean([m['dense']['bias'] for m in models], axis=0)
  np.testing.assert_allclose(out['dense']['bias'], mean_bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('layout', ['in_out', 'out_in'])
def test_reduced_grams_match_numpy(layout):
  base, models, xs, jb, jm = _setup(seed=2)
  alpha = 0.3
  gs = [x.T @ x / len(x) for x in xs]
  red = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in gs]
  kernels = [m['dense']['kernel'] for m in models]
  expected = np.linalg.inv(sum(red)) @ sum(r @ k for r, k in zip(red, kernels))
  if layout == 'out_in':   # the same layer stored as PyTorch's (out, in) weight
    jb = {'dense': {'kernel': jb['dense']['kernel'].T, 'bias': jb['dense']['bias']}}
    jm = [{'dense': {'kernel': m['dense']['kernel'].T, 'bias': m['dense']['bias']}} for m in jm]
    expected = expected.T
  grams = [{'dense/kernel': jnp.asarray(g, jnp.float32)} for g in gs]
  out = rm.regmean(jb, jm, grams=grams, alpha=alpha, kernel_layout=layout)
  np.testing.assert_allclose(out['dense']['kernel'], expected, rtol=1e-4, atol=1e-4)


def test_alpha_zero_weights_each_input_row_by_its_variance():
  # Diagonal Grams: row r of K is sum_i g_i[r] K_i[r] / sum_i g_i[r].
  base = {'k': jnp.zeros((2, 1))}
  models = [{'k': jnp.array([[1.0], [4.0]])}, {'k': jnp.array([[3.0], [0.0]])}]
  grams = [{'k': jnp.array([[1.0, 0.5], [0.5, 3.0]])}, {'k': jnp.array([[3.0, 9.0], [9.0, 1.0]])}]
  out = rm.regmean(base, models, grams=grams, alpha=0.0)
  np.testing.assert_allclose(out['k'], [[(1 * 1 + 3 * 3) / 4], [(3 * 4 + 1 * 0) / 4]], rtol=1e-6)


def test_bad_grams_are_named():
  _, _, xs, jb, jm = _setup()
  good = [{'dense/kernel': jnp.eye(5)} for _ in jm]
  with pytest.raises(ValueError, match='sequence of 3'):
    rm.regmean(jb, jm, grams=good[:2], alpha=0.5)
  with pytest.raises(ValueError, match="'dense/bias'.*2-D"):
    rm.regmean(jb, jm, grams=[{'dense/bias': jnp.eye(4)} for _ in jm], alpha=0.5)
  with pytest.raises(ValueError, match=r"grams\[1\]\['dense/kernel'\] has shape"):
    rm.regmean(jb, jm, grams=[good[0], {'dense/kernel': jnp.eye(4)}, good[2]], alpha=0.5)
  with pytest.raises(ValueError, match='not a merged leaf'):
    rm.regmean(jb, jm, grams=good, alpha=0.5, exclude='dense/kernel')
  with pytest.raises(ValueError, match="'dense/kernel' is singular"):
    rm.regmean(jb, jm, grams=[{'dense/kernel': jnp.zeros((5, 5))} for _ in jm], alpha=1.0)


def test_grams_from_a_flax_model_via_layer_representations():
  # The composition the module docstring names: Dense inputs recorded by
  # cljax.methods.projection.layer_representations, their Grams, RegMean.
  import flax.linen as nn
  from cljax.methods import projection

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      hidden = nn.relu(nn.Dense(5, name='Dense_0')(x))
      return nn.Dense(2, name='Dense_1')(hidden)

  module = MLP()
  apply_fn = lambda params, x, train=False: module.apply({'params': params}, x)
  rng = np.random.default_rng(3)
  base = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))['params']
  models = [jax.tree.map(lambda b: b + jnp.asarray(rng.normal(size=b.shape), jnp.float32), base)
            for _ in range(2)]
  xs = [jnp.asarray(rng.normal(size=(20, 4)), jnp.float32) for _ in range(2)]
  grams = []
  for m, x in zip(models, xs):
    reps = projection.layer_representations(apply_fn, m, x)
    grams.append(rm.gram_matrices({k: r.T for k, r in reps.items()}))
  assert sorted(grams[0]) == ['Dense_0/kernel', 'Dense_1/kernel']
  out = rm.regmean(base, models, grams=grams, alpha=1.0)
  x64 = [np.asarray(x, np.float64) for x in xs]
  k0 = [np.asarray(m['Dense_0']['kernel'], np.float64) for m in models]
  expected = np.linalg.lstsq(np.concatenate(x64), np.concatenate([x @ k for x, k in zip(x64, k0)]),
                             rcond=None)[0]
  np.testing.assert_allclose(out['Dense_0']['kernel'], expected, rtol=1e-4, atol=1e-4)
  # The second layer's Gram is of each model's own hidden activations.
  hidden = [np.maximum(x @ k + np.asarray(m['Dense_0']['bias']), 0)
            for x, k, m in zip(x64, k0, models)]
  np.testing.assert_allclose(grams[1]['Dense_1/kernel'], hidden[1].T @ hidden[1] / 20,
                             rtol=1e-4, atol=1e-5)
