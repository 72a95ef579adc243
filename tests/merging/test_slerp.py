"""Tests for cljax.merging.slerp against float64 NumPy transcriptions of mergekit's formulas."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cljax.merging import slerp as slerplib


def _tree(rng, scale=1.0):
  return {'dense': {'kernel': scale * rng.normal(size=(4, 3)), 'bias': scale * rng.normal(size=3)},
          'head': {'kernel': scale * rng.normal(size=(3, 2))}}


def _models(n, seed=0):
  rng = np.random.default_rng(seed)
  base = _tree(rng)
  models = [{k: {kk: base[k][kk] + _tree(rng, 0.5)[k][kk] for kk in base[k]} for k in base}
            for _ in range(n)]
  as_jnp = lambda t: {k: {kk: jnp.asarray(v, jnp.float32) for kk, v in d.items()}
                      for k, d in t.items()}
  return base, models, as_jnp(base), [as_jnp(m) for m in models]


def np_slerp(t, v0, v1, threshold=0.9995, eps=1e-8):
  """mergekit slerp, float64."""
  norm = lambda v: v / np.linalg.norm(v) if np.linalg.norm(v) > eps else v
  dot = np.sum(norm(v0) * norm(v1))
  if abs(dot) > threshold:
    return (1 - t) * v0 + t * v1
  theta = np.arccos(dot)
  return (np.sin(theta - theta * t) * v0 + np.sin(theta * t) * v1) / np.sin(theta)


def np_nuslerp_rows(t, v0, v1, eps=1e-8):
  """nuslerp of the rows of 2-D arrays (vectors along the last axis)."""
  out = np.empty_like(v0)
  for r in range(v0.shape[0]):
    a, b = v0[r], v1[r]
    cos = np.dot(a / max(np.linalg.norm(a), 1e-7), b / max(np.linalg.norm(b), 1e-7))
    theta = np.arccos(np.clip(cos, -1, 1))
    if abs(np.sin(theta)) < eps:
      out[r] = (1 - t) * a + t * b
    else:
      out[r] = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
  return out


def np_multislerp(vs, w, eps=1e-8):
  vs = np.stack([v.reshape(-1) for v in vs])
  w = np.asarray(w) / np.sum(w)
  norms = np.linalg.norm(vs, axis=1)
  u = vs / (norms[:, None] + eps)
  m = (u * w[:, None]).sum(0)
  m /= np.linalg.norm(m)
  g = u - (u @ m)[:, None] * m
  s = (g * w[:, None]).sum(0)
  sn = np.linalg.norm(s) + eps
  return (m * np.cos(sn) + s * np.sin(sn) / sn) * np.sum(norms * w)


@pytest.mark.parametrize('t', [0.0, 0.3, 1.0])
def test_slerp_matches_numpy(t):
  base, models, jbase, jmodels = _models(1)
  out = slerplib.slerp(jbase, jmodels[:1], t=t)
  for k in base:
    for kk in base[k]:
      expected = np_slerp(t, base[k][kk].reshape(-1), models[0][k][kk].reshape(-1))
      np.testing.assert_allclose(np.asarray(out[k][kk]).reshape(-1), expected, rtol=1e-5,
                                 atol=1e-5)


def test_slerp_of_two_finetuned_models_matches_numpy():
  base, models, jbase, jmodels = _models(2, seed=5)
  out = slerplib.slerp(jbase, jmodels, t=0.7)
  for k in base:
    for kk in base[k]:
      expected = np_slerp(0.7, models[0][k][kk].reshape(-1), models[1][k][kk].reshape(-1))
      np.testing.assert_allclose(np.asarray(out[k][kk]).reshape(-1), expected, rtol=1e-5,
                                 atol=1e-5)


def test_slerp_by_hand_quarter_circle():
  # e1 -> e2 at t = 1/2 is (e1 + e2) / sqrt(2), not the lerp (e1 + e2) / 2.
  out = slerplib.slerp({'w': jnp.array([1.0, 0.0])}, [{'w': jnp.array([0.0, 1.0])}], t=0.5)
  np.testing.assert_allclose(out['w'], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)


def test_slerp_colinear_falls_back_to_lerp():
  out = slerplib.slerp({'w': jnp.array([1.0, 2.0])}, [{'w': jnp.array([3.0, 6.0])}], t=0.25)
  np.testing.assert_allclose(out['w'], [1.5, 3.0], rtol=1e-6)


def test_slerp_exclude_keeps_base_and_refuses_two_models():
  _, _, jbase, jmodels = _models(2)
  out = slerplib.slerp(jbase, jmodels[:1], t=0.5, exclude='head/.*')
  np.testing.assert_array_equal(out['head']['kernel'], jbase['head']['kernel'])
  with pytest.raises(ValueError, match='1 to 2'):
    slerplib.slerp(jbase, jmodels + jmodels[:1], t=0.5)
  with pytest.raises(ValueError, match='t must lie'):
    slerplib.slerp(jbase, jmodels[:1], t=1.5)


def test_slerp_names_non_finite_input():
  _, _, jbase, jmodels = _models(1)
  jmodels[0]['dense']['bias'] = jmodels[0]['dense']['bias'].at[0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"finetuned\[0\].*'dense'.*'bias'"):
    slerplib.slerp(jbase, jmodels, t=0.5)


def test_nuslerp_flattened_task_vectors_match_numpy():
  base, models, jbase, jmodels = _models(2, seed=1)
  out = slerplib.nuslerp(jbase, jmodels, weights=(1.0, 3.0))
  t = 0.75
  for k in base:
    for kk in base[k]:
      b = base[k][kk]
      tv = [(m[k][kk] - b).reshape(1, -1) for m in models]
      expected = b + np_nuslerp_rows(t, *tv).reshape(b.shape)
      np.testing.assert_allclose(out[k][kk], expected, rtol=1e-5, atol=1e-5)


def test_nuslerp_axis0_is_mergekit_rows_of_torch_layout():
  base, models, jbase, jmodels = _models(2, seed=2)
  out = slerplib.nuslerp(jbase, jmodels, weights=(2.0, 1.0), axis=0, relative_to_base=False)
  t = 1 / 3
  k = base['dense']['kernel']   # (in, out): torch's rows are its columns
  expected = np_nuslerp_rows(t, models[0]['dense']['kernel'].T, models[1]['dense']['kernel'].T).T
  np.testing.assert_allclose(out['dense']['kernel'], expected, rtol=1e-5, atol=1e-5)
  bias = np_nuslerp_rows(t, models[0]['dense']['bias'][None], models[1]['dense']['bias'][None])
  np.testing.assert_allclose(out['dense']['bias'], bias[0], rtol=1e-5, atol=1e-5)
  assert k.shape == out['dense']['kernel'].shape


def test_multislerp_matches_numpy_and_two_model_identity():
  base, models, jbase, jmodels = _models(3, seed=3)
  w = [1.0, 2.0, 0.5]
  out = slerplib.multislerp(jbase, jmodels, weights=w)
  for k in base:
    for kk in base[k]:
      b = base[k][kk]
      expected = b + np_multislerp([m[k][kk] - b for m in models], w).reshape(b.shape)
      np.testing.assert_allclose(out[k][kk], expected, rtol=1e-5, atol=1e-5)


def test_multislerp_antipodal():
  base = {'w': jnp.zeros(2)}
  pair = [{'w': jnp.array([1.0, 0.0])}, {'w': jnp.array([-1.0, 0.0])}]
  np.testing.assert_allclose(slerplib.multislerp(base, pair)['w'], [0.0, 0.0], atol=1e-7)
  with pytest.raises(ValueError, match="'w'.*antipodal"):
    slerplib.multislerp(base, pair + [{'w': jnp.array([0.0, 0.0])}], weights=[1, 1, 1])
