"""Tests for cljax.merging.sparsify (Breadcrumbs, DELLA): by hand and float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.merging import sparsify


def np_breadcrumbs_mask(tv, density, gamma):
  n = tv.size
  if density >= 1:
    return np.ones(tv.shape, bool)
  keep, n_top = int(density * n), int(gamma * n)
  n_bot = n - keep - n_top
  if n_bot < 0:
    n_top, n_bot = n_top + n_bot, 0
  order = np.argsort(np.abs(tv).reshape(-1), kind='stable')
  mask = np.zeros(n, bool)
  mask[order[n_bot:n - n_top]] = True
  return mask.reshape(tv.shape)


def np_disjoint_mean(xs):
  x = np.stack(xs)
  sign = np.sign(x.sum(0))
  agree = (np.sign(x) == sign) & (x != 0)
  return (x * agree).sum(0) / np.maximum(agree.sum(0), 1)


def _models(n=3, seed=0):
  rng = np.random.default_rng(seed)
  base = {'kernel': rng.normal(size=(5, 4)), 'bias': rng.normal(size=6)}
  models = [{k: v + rng.normal(size=v.shape) for k, v in base.items()} for _ in range(n)]
  j = lambda t: {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}
  return base, models, j(base), [j(m) for m in models]


def test_breadcrumbs_mask_by_hand():
  tv = jnp.array([0.1, -5.0, 2.0, -0.3, 1.0, 0.2, -4.0, 0.5, 3.0, -0.05])
  # n = 10, density 0.5 keeps 5; gamma 0.2 drops the 2 largest (|-5|, |-4|), then the 3
  # smallest (0.05, 0.1, 0.2): kept 3.0, 2.0, 1.0, 0.5, -0.3.
  mask = sparsify.breadcrumbs_mask(tv, density=0.5, gamma=0.2)
  np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1, 0, 0, 1, 1, 0])
  # gamma too large for the density: fewer outliers dropped (n_top = 10 - 8 = 2 -> 2 - 0).
  mask = sparsify.breadcrumbs_mask(tv, density=0.8, gamma=0.3)
  np.testing.assert_array_equal(mask, [1, 0, 1, 1, 1, 1, 0, 1, 1, 1])
  # gamma 0 drops no outlier (mergekit's slice would keep nothing).
  assert int(sparsify.breadcrumbs_mask(tv, density=0.3, gamma=0.0).sum()) == 3


@pytest.mark.parametrize('merge', ['task_arithmetic', 'ties'])
def test_breadcrumbs_matches_numpy(merge):
  base, models, jb, jm = _models()
  out = sparsify.breadcrumbs(jb, jm, density=0.6, gamma=0.1, scaling=0.7, merge=merge)
  for k, b in base.items():
    masked = [np.where(np_breadcrumbs_mask(m[k] - b, 0.6, 0.1), m[k] - b, 0) for m in models]
    merged = sum(masked) if merge == 'task_arithmetic' else np_disjoint_mean(masked)
    np.testing.assert_allclose(out[k], b + 0.7 * merged, rtol=1e-5, atol=1e-5)


def test_breadcrumbs_ties_with_ties_in_magnitude_is_stable():
  tv = jnp.array([1.0, -1.0, 1.0, 2.0])   # equal magnitudes: the first ones rank lowest
  np.testing.assert_array_equal(sparsify.breadcrumbs_mask(tv, density=0.5, gamma=0.0),
                                [0, 0, 1, 1])


def np_magprune_probs(tv, density, epsilon, rowwise):
  view = tv.reshape(-1, tv.shape[-1]) if (rowwise and tv.ndim >= 2) else tv.reshape(-1, 1)
  n = view.shape[0]
  ranks = np.argsort(np.argsort(np.abs(view), axis=0, kind='stable'), axis=0, kind='stable') + 1
  return (density - epsilon + 2 * epsilon * (ranks - 1) / (n - 1)).reshape(tv.shape)


def test_magprune_probabilities_by_hand_and_numpy():
  tv = jnp.array([0.3, -2.0, 0.1, 1.0, -0.5])   # ranks 2, 5, 1, 4, 3
  probs = sparsify.magprune_probabilities(tv, density=0.5, epsilon=0.2)
  np.testing.assert_allclose(probs, [0.4, 0.7, 0.3, 0.6, 0.5], rtol=1e-6)
  x = np.random.default_rng(1).normal(size=(6, 3))
  for rowwise, gran in ((True, 'row'), (False, 'tensor')):
    got = sparsify.magprune_probabilities(jnp.asarray(x), density=0.4, epsilon=0.1,
                                          granularity=gran)
    np.testing.assert_allclose(got, np_magprune_probs(x, 0.4, 0.1, rowwise), rtol=1e-6)


def test_magprune_out_in_ranks_each_pytorch_row():
  x = np.random.default_rng(4).normal(size=(3, 7))   # (out, in): mergekit ranks along dim 1
  got = sparsify.magprune_probabilities(jnp.asarray(x), density=0.5, epsilon=0.3,
                                        kernel_layout='out_in')
  ranks = np.argsort(np.argsort(np.abs(x), axis=1, kind='stable'), axis=1, kind='stable') + 1
  np.testing.assert_allclose(got, 0.2 + 0.6 * (ranks - 1) / 6, rtol=1e-6)


@pytest.mark.parametrize('rescale', ['inverse_probability', 'l1', 'none'])
def test_della_matches_numpy_given_the_documented_draws(rescale):
  base, models, jb, jm = _models(seed=2)
  key = jax.random.PRNGKey(7)
  out = sparsify.della(jb, jm, key=key, density=0.5, epsilon=0.2, scaling=0.9, rescale=rescale)
  leaf_names = sorted(base)   # dict flattening order: 'bias', 'kernel'
  for j, k in enumerate(leaf_names):
    b = base[k]
    pruned = []
    for i, m in enumerate(models):
      t = m[k] - b
      probs = np_magprune_probs(t, 0.5, 0.2, True)
      u = np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, i), j),
                                        t.shape))
      kept = np.where(u < probs, t, 0.0)
      if rescale == 'inverse_probability':
        kept = kept / probs
      elif rescale == 'l1':
        kept = kept * np.abs(t).sum() / np.abs(kept).sum()
      pruned.append(kept)
    np.testing.assert_allclose(out[k], b + 0.9 * np_disjoint_mean(pruned), rtol=1e-4, atol=1e-5)


def test_della_refuses_bad_hyperparameters():
  _, _, jb, jm = _models()
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match='density \\+- epsilon'):
    sparsify.della(jb, jm, key=key, density=0.9, epsilon=0.2, scaling=1.0)
  with pytest.raises(ValueError, match='granularity'):
    sparsify.della(jb, jm, key=key, density=0.5, epsilon=0.1, scaling=1.0, granularity='col')
  out = sparsify.della(jb, jm, key=key, density=0.5, epsilon=0.1, scaling=1.0, exclude='bias')
  np.testing.assert_array_equal(out['bias'], jb['bias'])
