"""Tests for cljax.merging.emr: a hand-worked example and a float64 NumPy transcription."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cljax.merging import emr as emrlib


def np_emr(tvs_by_leaf):
  """tvs_by_leaf: {leaf: [tau_t]} -> (unified, masks, rescalers), as the authors' emr_merge."""
  n = len(next(iter(tvs_by_leaf.values())))
  unified, masks = {}, {}
  scales, new_scales = np.zeros(n), np.zeros(n)
  for k, tvs in tvs_by_leaf.items():
    flag = np.where(np.sum(tvs, 0) > 0, 1.0, -1.0)
    masks[k] = [t * flag > 0 for t in tvs]
    unified[k] = np.max([np.abs(t * m) for t, m in zip(tvs, masks[k])], 0) * flag
    scales += [np.abs(t).mean() for t in tvs]
  for k in tvs_by_leaf:
    new_scales += [np.abs(unified[k] * m).mean() for m in masks[k]]
  return unified, masks, scales / new_scales


def test_by_hand():
  base = {'w': jnp.zeros(4)}
  models = [{'w': jnp.array([1.0, -2.0, 0.5, 0.0])}, {'w': jnp.array([3.0, 1.0, -0.5, 0.0])}]
  res = emrlib.emr(base, models)
  # sums [4, -1, 0, 0] -> signs [+, -, -, -] (0 counts as negative)
  # masks: t0 [1, 1, 0, 0], t1 [1, 0, 1, 0]; tau_uni = [3, -2, -0.5, 0]
  np.testing.assert_allclose(res.unified['w'], [3.0, -2.0, -0.5, 0.0])
  np.testing.assert_array_equal(res.masks[0]['w'], [1, 1, 0, 0])
  np.testing.assert_array_equal(res.masks[1]['w'], [1, 0, 1, 0])
  # lambda_0 = mean(1, 2, .5, 0) / mean(3, 2, 0, 0) = 3.5 / 5; lambda_1 = 4.5 / 3.5
  np.testing.assert_allclose(res.rescalers, [0.7, 4.5 / 3.5], rtol=1e-6)
  np.testing.assert_allclose(emrlib.emr_task_model(base, res, 1)['w'],
                             4.5 / 3.5 * np.array([3.0, 0.0, -0.5, 0.0]), rtol=1e-6)


def test_matches_numpy_with_exclusion():
  rng = np.random.default_rng(0)
  base = {'a': rng.normal(size=(3, 4)), 'b': rng.normal(size=5), 'head': rng.normal(size=2)}
  models = [{k: v + rng.normal(size=v.shape) for k, v in base.items()} for _ in range(3)]
  j = lambda t: {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}
  res = emrlib.emr(j(base), [j(m) for m in models], exclude='head')
  unified, masks, rescalers = np_emr({k: [m[k] - base[k] for m in models] for k in ('a', 'b')})
  np.testing.assert_allclose(res.rescalers, rescalers, rtol=1e-5)
  for k in ('a', 'b'):
    np.testing.assert_allclose(res.unified[k], unified[k], rtol=1e-5, atol=1e-6)
    for t in range(3):
      np.testing.assert_array_equal(res.masks[t][k], masks[k][t])
  np.testing.assert_array_equal(res.unified['head'], 0.0)
  model = emrlib.emr_task_model(j(base), res, 2)
  np.testing.assert_allclose(model['a'], base['a'] + rescalers[2] * masks['a'][2] * unified['a'],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model['head'], base['head'], rtol=1e-6)
  with pytest.raises(ValueError, match='task must be'):
    emrlib.emr_task_model(j(base), res, 3)


def test_zero_task_vector_is_refused():
  base = {'w': jnp.zeros(2)}
  with pytest.raises(ValueError, match=r'finetuned\[1\]'):
    emrlib.emr(base, [{'w': jnp.array([1.0, 2.0])}, {'w': jnp.zeros(2)}])
