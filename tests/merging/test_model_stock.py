"""Tests for cljax.merging.model_stock: hand cases and a float64 NumPy reference."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from cljax.merging import model_stock as ms


def np_stock(w0, ws, rows=None):
  """Model Stock on float64 arrays; ``rows``: a function giving the (units, d) view."""
  view = rows or (lambda x: x.reshape(1, -1))
  b = view(w0)
  offs = [view(w) - b for w in ws]
  cos = np.mean([np.clip((a * c).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) *
                                                      np.linalg.norm(c, axis=-1), 1e-6), -1, 1)
                 for a, c in itertools.combinations(offs, 2)], axis=0)[:, None]
  k = len(ws)
  t = k * cos / (1 + (k - 1) * cos)
  return t * np.mean([view(w) for w in ws], axis=0) + (1 - t) * b


def _models(k, seed=0):
  rng = np.random.default_rng(seed)
  base = {'kernel': rng.normal(size=(4, 3)), 'bias': rng.normal(size=3)}
  common = {n: rng.normal(size=v.shape) for n, v in base.items()}
  models = [{n: base[n] + common[n] + 0.7 * rng.normal(size=v.shape) for n, v in base.items()}
            for _ in range(k)]
  j = lambda t: {n: jnp.asarray(v, jnp.float32) for n, v in t.items()}
  return base, models, j(base), [j(m) for m in models]


def test_hand_two_models():
  # tau_1 = (1, 0), tau_2 = (1, 1): cos = 1/sqrt(2), t = 2c / (1 + c) = 2 / (sqrt(2) + 1).
  base = {'w': jnp.zeros(2)}
  models = [{'w': jnp.array([1.0, 0.0])}, {'w': jnp.array([1.0, 1.0])}]
  t = 2 / (np.sqrt(2) + 1)
  np.testing.assert_allclose(ms.model_stock(base, models)['w'], t * np.array([1.0, 0.5]),
                             rtol=1e-6)
  # Orthogonal task vectors: t = 0, the base; identical ones: t = 1, their average.
  orth = [{'w': jnp.array([1.0, 0.0])}, {'w': jnp.array([0.0, 2.0])}]
  np.testing.assert_allclose(ms.model_stock(base, orth)['w'], [0.0, 0.0], atol=1e-7)
  same = [{'w': jnp.array([1.0, 2.0])}] * 2
  np.testing.assert_allclose(ms.model_stock(base, same)['w'], [1.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize('k', [2, 4])
def test_matches_numpy_per_leaf(k):
  base, models, jb, jm = _models(k)
  out = ms.model_stock(jb, jm)
  for n in base:
    expected = np_stock(base[n], [m[n] for m in models]).reshape(base[n].shape)
    np.testing.assert_allclose(out[n], expected, rtol=1e-5, atol=1e-5)


def test_filter_wise_matches_numpy_per_output_column():
  base, models, jb, jm = _models(3, seed=1)
  out = ms.model_stock(jb, jm, filter_wise=True)
  cols = lambda x: x.T   # (in, out) -> one row per output unit
  expected = np_stock(base['kernel'], [m['kernel'] for m in models], rows=cols).T
  np.testing.assert_allclose(out['kernel'], expected, rtol=1e-5, atol=1e-5)
  # A bias is one row (mergekit's unsqueeze(0)): one ratio for the whole leaf.
  expected_b = np_stock(base['bias'], [m['bias'] for m in models]).reshape(-1)
  np.testing.assert_allclose(out['bias'], expected_b, rtol=1e-5, atol=1e-5)


def test_filter_wise_out_in_ranks_pytorch_rows():
  base, models, _, _ = _models(3, seed=4)
  t = lambda tree: {'kernel': jnp.asarray(tree['kernel'].T, jnp.float32),
                    'bias': jnp.asarray(tree['bias'], jnp.float32)}
  out = ms.model_stock(t(base), [t(m) for m in models], filter_wise=True, kernel_layout='out_in')
  expected = np_stock(base['kernel'].T, [m['kernel'].T for m in models], rows=lambda x: x)
  np.testing.assert_allclose(out['kernel'], expected, rtol=1e-5, atol=1e-5)


def test_needs_two_models_and_keeps_excluded():
  _, _, jb, jm = _models(2)
  with pytest.raises(ValueError, match='at least 2'):
    ms.model_stock(jb, jm[:1])
  out = ms.model_stock(jb, jm, exclude='bias')
  np.testing.assert_array_equal(out['bias'], jb['bias'])
