"""The fused (unstacked) merge paths of cljax.merging.static: numpy references and value checks.

Average and task arithmetic check NaN/Inf on their result rather than reading every input
twice; these tests pin that nothing non-finite gets through and that the error still names the
input model and path. TIES, MagMax and TIES's per-model thresholds are checked against numpy on
a model large enough for the radix-select path (more than 2^16 entries per task vector).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import merging


def _models(n=5, seed=0, shapes=((300, 200), (200,), (200, 40), (40,))):
  rng = np.random.default_rng(seed)
  base = {f'l{i}': rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}
  models = [{k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32)
             for k, v in base.items()} for _ in range(n)]
  return base, models


def _numpy_ties(base, models, density, trim, scaling):
  keys = sorted(base)
  taus = [{k: m[k].astype(np.float64) - base[k] for k in keys} for m in models]

  def kth(values, k):
    return np.sort(np.abs(values))[::-1][k - 1]

  trimmed = []
  for tau in taus:
    if trim == 'global':
      flat = np.concatenate([tau[k].ravel() for k in keys])
      t = {k: kth(flat, int(round(density * flat.size))) for k in keys}
    else:
      t = {k: kth(tau[k].ravel(), int(round(density * tau[k].size))) for k in keys}
    trimmed.append({k: np.where(np.abs(tau[k]) >= t[k], tau[k], 0.0) for k in keys})
  out = {}
  for k in keys:
    x = np.stack([tr[k] for tr in trimmed])
    sign = np.sign(x.sum(0))
    agree = (np.sign(x) == sign) & (x != 0)
    merged = np.where(agree, x, 0).sum(0) / np.maximum(agree.sum(0), 1)
    out[k] = base[k] + scaling * merged
  return out


@pytest.mark.parametrize('trim', ['global', 'per_tensor'])
def test_ties_matches_numpy_on_a_radix_sized_model(trim):
  base, models = _models()
  got = merging.ties(jax.tree.map(jnp.asarray, base), [jax.tree.map(jnp.asarray, m) for m in models],
                     density=0.3, scaling=0.7, trim=trim)
  chex.assert_trees_all_close(got, _numpy_ties(base, models, 0.3, trim, 0.7), atol=1e-5)


def test_magmax_and_linear_merges_match_numpy():
  base, models = _models(n=4, seed=1)
  jb, jm = jax.tree.map(jnp.asarray, base), [jax.tree.map(jnp.asarray, m) for m in models]
  taus = {k: np.stack([m[k] - base[k] for m in models]).astype(np.float64) for k in base}
  pick = {k: np.take_along_axis(t, np.argmax(np.abs(t), 0)[None], 0)[0] for k, t in taus.items()}
  chex.assert_trees_all_close(merging.magmax(jb, jm, scaling=0.5),
                              {k: base[k] + 0.5 * pick[k] for k in base}, atol=1e-6)
  chex.assert_trees_all_close(merging.task_arithmetic(jb, jm, scaling=0.3),
                              {k: base[k] + 0.3 * taus[k].sum(0) for k in base}, atol=1e-5)
  chex.assert_trees_all_close(merging.average(jb, jm),
                              {k: base[k] + taus[k].mean(0) for k in base}, atol=1e-6)


@pytest.mark.parametrize('merge', [
    lambda b, m, **kw: merging.average(b, m, **kw),
    lambda b, m, **kw: merging.task_arithmetic(b, m, scaling=0.0, **kw),
])
@pytest.mark.parametrize('where, value', [('base', np.inf), ('model', np.nan), ('model', -np.inf)])
def test_linear_merges_refuse_non_finite_inputs_by_name(merge, where, value):
  base, models = _models(n=3, seed=2)
  if where == 'base':
    base['l1'] = base['l1'].copy()
    base['l1'][7] = value
    match = r"base has non-finite values at \['l1'\]"
  else:
    models[1]['l2'] = models[1]['l2'].copy()
    models[1]['l2'][3, 4] = value
    match = r"finetuned\[1\] has non-finite values at \['l2'\]"
  with pytest.raises(ValueError, match=match):
    merge(base, models)


def test_non_finite_excluded_leaf_is_still_refused():
  base, models = _models(n=2, seed=3)
  models[0]['l3'] = np.full_like(models[0]['l3'], np.nan)
  for merge in (merging.average, lambda b, m, exclude: merging.task_arithmetic(
      b, m, scaling=1.0, exclude=exclude)):
    with pytest.raises(ValueError, match=r"finetuned\[0\] has non-finite values at \['l3'\]"):
      merge(base, models, exclude='l3')


def test_overflow_of_finite_inputs_is_reported():
  big = np.float32(3e38)
  base = {'w': np.zeros(4, np.float32)}
  models = [{'w': np.array([big, 1.0, 2.0, big], np.float32)} for _ in range(2)]
  with pytest.raises(ValueError, match=r"not finite at \['w'\] although every input is"):
    merging.task_arithmetic(base, models, scaling=1.0)
  np.testing.assert_allclose(merging.task_arithmetic(base, models[:1], scaling=1.0)['w'],
                             models[0]['w'])
