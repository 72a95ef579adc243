"""Tests for cljax.merging.continual: OPCM against numpy's SVD, recurrences, constant-size state."""

from __future__ import annotations

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from cljax import merging


def _models(n, seed=0):
  """A base and n finetuned models: two 2-D kernels (both orientations), a bias, a head."""
  rng = np.random.default_rng(seed)
  shapes = {'a': {'kernel': (6, 4), 'bias': (4,)}, 'b': {'kernel': (3, 5)},
            'head': {'kernel': (4, 2)}}
  base = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))
  models = [jax.tree.map(lambda b: b + jnp.asarray(rng.normal(size=b.shape), jnp.float32), base)
            for _ in range(n)]
  return base, models


def _run(merge, base, models, update=None):
  update = merge.update if update is None else update
  state = merge.init(base)
  for m in models:
    state = update(state, m)
  return state


CONSTRUCTORS = {
    'average': merging.continual_average,
    'task_arithmetic': functools.partial(merging.continual_task_arithmetic, scaling=0.3),
    'ties': functools.partial(merging.continual_ties, scaling=0.5),
    'opcm': functools.partial(merging.opcm, alpha=0.5),
}


# ---------------------------------------------------------------------------------------------
# An independent numpy OPCM: full SVD (U m x m, V n x n), float64.
# ---------------------------------------------------------------------------------------------


def _np_rank(s, alpha):
  share = np.cumsum(s) / np.sum(s)
  return int(np.argmax(share >= alpha)) + 1   # smallest r with share_r >= alpha


def _np_project(tau, merged, alpha):
  u, s, vt = np.linalg.svd(merged, full_matrices=True)
  r = _np_rank(s, alpha)
  c = u.T @ tau @ vt.T                         # (m, n) coefficients in the singular bases
  np.fill_diagonal(c, 0.0)
  c[:r, :r] = 0.0
  return u @ c @ vt


def _np_opcm(base, models, alpha, merged_paths):
  flat = lambda t: {k: np.asarray(v, np.float64) for k, v in
                    zip(merging.leaf_names(t), jax.tree.leaves(t))}
  b = flat(base)
  acc, norms, outputs = None, [], []
  for model in models:
    tau = {k: v - b[k] for k, v in flat(model).items() if k in merged_paths}
    norms.append(np.sqrt(sum(np.sum(v ** 2) for v in tau.values())))
    if acc is None:
      acc = tau
    else:
      acc = {k: acc[k] + (_np_project(tau[k], acc[k], alpha) if tau[k].ndim == 2 else tau[k])
             for k in acc}
    scale = np.mean(norms) / np.sqrt(sum(np.sum(v ** 2) for v in acc.values()))
    outputs.append({k: b[k] + (scale * acc[k] if k in acc else 0.0) for k in b})
  return outputs


class OPCMTest(parameterized.TestCase):

  @parameterized.parameters(0.5, 1.0)
  def test_count_rule_over_every_2d_leaf_against_numpy_svd(self, alpha):
    base, models = _models(4, seed=1)
    merge = merging.opcm(alpha=alpha, rank_rule='count', project='.*', exclude='head/.*')
    expected = _np_opcm(base, models, alpha, {'a/kernel', 'a/bias', 'b/kernel'})
    state = merge.init(base)
    for model, want in zip(models, expected):
      state = merge.update(state, model)
      got = dict(zip(merging.leaf_names(base), jax.tree.leaves(merge.params(state))))
      for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=2e-5, err_msg=name)

  def test_first_update_is_the_first_model(self):
    base, models = _models(1)
    merge = merging.opcm(alpha=0.5)
    chex.assert_trees_all_close(merge.params(_run(merge, base, models)), models[0],
                                rtol=1e-6, atol=1e-6)

  def test_merged_norm_is_mean_task_vector_norm(self):
    base, models = _models(5, seed=2)
    merge = merging.opcm(alpha=0.5, exclude='head/.*')
    state = _run(merge, base, models)
    tvs = [merging.task_vector(base, m, exclude='head/.*') for m in models]
    mean_norm = np.mean([float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(t))))
                         for t in tvs])
    merged = merging.task_vector(base, merge.params(state))
    self.assertAlmostEqual(float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(merged)))),
                           mean_norm, places=4)
    np.testing.assert_array_equal(merge.params(state)['head']['kernel'], base['head']['kernel'])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((5, 4), (4, 5))
  def test_projection_zeroes_diagonal_and_leading_block(self, m, n):
    # merged = U diag(4, 3, 2, 1) V^T: shares 0.4, 0.7, 0.9, 1.0, so alpha 0.6 gives r = 2.
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.zeros((m, n))
    s[:4, :4] = np.diag([4.0, 3.0, 2.0, 1.0])
    merged = u @ s @ v.T
    tau = rng.normal(size=(m, n))
    project = functools.partial(merging.opcm_projection, alpha=0.6, rank_rule='count')
    out = np.asarray(self.variant(project)(jnp.asarray(tau, jnp.float32),
                                           jnp.asarray(merged, jnp.float32)), np.float64)
    before, after = u.T @ tau @ v, u.T @ out @ v
    removed = np.eye(m, n, dtype=bool)
    removed[:2, :2] = True
    np.testing.assert_allclose(after[removed], 0.0, atol=1e-5)
    np.testing.assert_allclose(after[~removed], before[~removed], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out, _np_project(tau, merged, 0.6), rtol=1e-4, atol=1e-5)

  def test_index_rule_zeroes_one_row_and_column_less(self):
    # Shares 0.4, 0.7, 0.9, 1.0: alpha 0.6 first exceeded at index 1, a 1 x 1 block (count: 2).
    rng = np.random.default_rng(4)
    u, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    v, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    merged = u[:, :4] @ np.diag([4.0, 3.0, 2.0, 1.0]) @ v.T
    tau = rng.normal(size=(5, 4))
    out = np.asarray(merging.opcm_projection(jnp.asarray(tau, jnp.float32),
                                             jnp.asarray(merged, jnp.float32), alpha=0.6),
                     np.float64)
    before, after = u.T @ tau @ v, u.T @ out @ v
    removed = np.eye(5, 4, dtype=bool)   # the diagonal and the 1 x 1 block (on it)
    np.testing.assert_allclose(after[removed], 0.0, atol=1e-5)
    np.testing.assert_allclose(after[~removed], before[~removed], rtol=1e-4, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_split_index_by_hand(self):
    s = jnp.array([4.0, 3.0, 2.0, 1.0])   # shares 0.4, 0.7, 0.9, 1.0
    split = self.variant(merging.split_index)
    for alpha, r in ((0.1, 0), (0.39, 0), (0.4, 1), (0.6, 1), (0.7, 2), (0.75, 2), (0.95, 3),
                     (1.0, 0)):   # alpha = 1: no share exceeds it, torch's argmax is 0
      self.assertEqual(int(split(s, alpha)), r, msg=f'alpha={alpha}')
    self.assertEqual(int(split(jnp.zeros(3), 0.5)), 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mass_rank_by_hand(self):
    s = jnp.array([4.0, 3.0, 2.0, 1.0])
    rank = self.variant(merging.mass_rank)
    for alpha, r in ((0.1, 1), (0.4, 1), (0.41, 2), (0.6, 2), (0.7, 2), (0.75, 3), (0.95, 4),
                     (1.0, 4)):
      self.assertEqual(int(rank(s, alpha)), r, msg=f'alpha={alpha}')
    self.assertEqual(int(rank(jnp.zeros(3), 0.5)), 0)

  def test_zero_merged_leaf_is_not_projected(self):
    tau = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(merging.opcm_projection(tau, jnp.zeros((2, 3)), alpha=0.5), tau)

  @parameterized.parameters(0.0, -0.5, 1.5, float('nan'))
  def test_alpha_out_of_range(self, alpha):
    with pytest.raises(ValueError, match=r'alpha must lie in \(0, 1\]'):
      merging.opcm(alpha=alpha)
    with pytest.raises(ValueError, match=r'alpha must lie in \(0, 1\]'):
      merging.opcm_projection(jnp.ones((2, 2)), jnp.eye(2), alpha=alpha)


class RecurrenceTest(parameterized.TestCase):

  @parameterized.parameters(1, 3, 6)
  def test_continual_average_equals_static_average(self, n):
    base, models = _models(n, seed=4)
    merge = merging.continual_average(exclude='head/.*')
    chex.assert_trees_all_close(merge.params(_run(merge, base, models)),
                                merging.average(base, models, exclude='head/.*'),
                                rtol=1e-6, atol=1e-6)

  def test_continual_task_arithmetic_equals_static(self):
    base, models = _models(4, seed=5)
    merge = merging.continual_task_arithmetic(scaling=0.3)
    chex.assert_trees_all_close(merge.params(_run(merge, base, models)),
                                merging.task_arithmetic(base, models, scaling=0.3),
                                rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_continual_ties_by_hand(self):
    # scaling 0.5, density 0.5 (3 of 6 kept), disjoint sum:
    #   m1 = 0.5 tau1 = [1.5, -0.5, 0.25, -2, 1, -0.1]
    #   trim m1 -> [1.5, 0, 0, -2, 1, 0]; trim tau2 -> [-2, 5, 0, 0, -3, 0]
    #   summed mass [-0.5, 5, 0, -2, -2, 0] -> signs [-, +, 0, -, -, 0]
    #   disjoint sum [-2, 5, 0, -2, -3, 0]
    #   m2 = m1 + 0.5 * that = [0.5, 2, 0.25, -3, -0.5, -0.1]
    base = {'w': jnp.full(6, 1.0)}
    tau1 = np.array([3.0, -1.0, 0.5, -4.0, 2.0, -0.2], np.float32)
    tau2 = np.array([-2.0, 5.0, -0.1, 1.0, -3.0, 0.3], np.float32)
    merge = merging.continual_ties(scaling=0.5, density=0.5)
    update = self.variant(merge.update)
    state = update(merge.init(base), {'w': base['w'] + tau1})
    np.testing.assert_allclose(merge.params(state)['w'], 1.0 + 0.5 * tau1, rtol=1e-6)
    state = update(state, {'w': base['w'] + tau2})
    np.testing.assert_allclose(merge.params(state)['w'],
                               1.0 + np.array([0.5, 2.0, 0.25, -3.0, -0.5, -0.1]), rtol=1e-6)
    self.assertEqual(int(state.count), 2)

  def test_initial_params_are_the_base(self):
    base, _ = _models(0)
    for constructor in CONSTRUCTORS.values():
      merge = constructor()
      chex.assert_trees_all_close(merge.params(merge.init(base)), base)


class ConstantMemoryTest(parameterized.TestCase):

  @parameterized.named_parameters(*CONSTRUCTORS.items())
  def test_jitted_donated_update_with_constant_size_state(self, constructor):
    base, models = _models(10, seed=7)
    merge = constructor(exclude='head/.*')
    update = jax.jit(merge.update, donate_argnums=0)
    state = merge.init(base)
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')   # CPU may decline some donations
      for i, model in enumerate(models):
        state = update(state, model)
        if i == 1:
          after_2 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    after_10 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    self.assertEqual(jax.tree.structure(after_2), jax.tree.structure(after_10))
    self.assertEqual(jax.tree.leaves(after_2), jax.tree.leaves(after_10))
    self.assertEqual(len(jax.tree.leaves(after_10)), len(jax.tree.leaves(merge.init(base))))
    self.assertEqual(int(state.count), 10)
    # The jitted, donated run agrees with the eager one, and the caller's base is still alive.
    chex.assert_trees_all_close(merge.params(state), merge.params(_run(merge, base, models)),
                                rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merge.params(state)['head']['kernel'], base['head']['kernel'])


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(*CONSTRUCTORS.items())
  def test_mismatch_names_path(self, constructor):
    base, models = _models(1)
    merge = constructor()
    state = merge.init(base)
    bad = dict(models[0], b={'kernel': jnp.zeros((5, 3))})
    with pytest.raises(ValueError, match=r"\['b'\]\['kernel'\]: shape \(5, 3\) != \(3, 5\)"):
      merge.update(state, bad)
    bad = dict(models[0], b={'kernel': models[0]['b']['kernel'].astype(jnp.float16)})
    with pytest.raises(ValueError, match=r"\['b'\]\['kernel'\]: dtype float16 != float32"):
      jax.jit(merge.update)(state, bad)
    bad = dict(models[0], a={'kernel': models[0]['a']['kernel']})
    with pytest.raises(ValueError, match=r"lacks the leaf|\['a'\]\['bias'\]"):
      merge.update(state, bad)

  @parameterized.named_parameters(*CONSTRUCTORS.items())
  def test_nan_is_reported(self, constructor):
    base, models = _models(1)
    merge = constructor()
    bad = dict(models[0], a=dict(models[0]['a'], bias=models[0]['a']['bias'].at[2].set(np.inf)))
    with pytest.raises(ValueError, match=r"finetuned has non-finite values at \['a'\]\['bias'\] "
                                         r"\(0 NaN, 1 Inf\)"):
      merge.update(merge.init(base), bad)
    with pytest.raises(ValueError, match=r"base has non-finite values at \['a'\]\['bias'\]"):
      merge.init(bad)

  @parameterized.named_parameters(*CONSTRUCTORS.items())
  def test_exclude_matching_nothing(self, constructor):
    base, _ = _models(0)
    with pytest.raises(ValueError, match='matches no parameter'):
      constructor(exclude='heads/.*').init(base)

  @parameterized.parameters(-0.1, 1.1, float('nan'))
  def test_ties_density(self, density):
    with pytest.raises(ValueError, match=r'density must lie in \[0, 1\]'):
      merging.continual_ties(scaling=1.0, density=density)

  def test_other_hyperparameters(self):
    with pytest.raises(ValueError, match='scaling must be finite'):
      merging.continual_task_arithmetic(scaling=float('inf'))
    with pytest.raises(ValueError, match='trim must be one of'):
      merging.continual_ties(scaling=1.0, trim='row')
    with pytest.raises(ValueError, match='reduce must be one of'):
      merging.continual_ties(scaling=1.0, reduce='max')
