"""Tests for cljax.merging.static: hand-computed merges, symmetry, exclusion and bad input."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from cljax import merging

# Three task vectors of length 6 for the TIES example (worked by hand in test_ties_by_hand).
TAU = np.array([
    [3.0, -1.0, 0.5, -4.0, 2.0, -0.2],
    [-2.0, 5.0, -0.1, 1.0, -3.0, 0.3],
    [1.0, -6.0, 4.0, -0.5, 0.4, -0.6],
], np.float32)
BASE6 = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], np.float32)


def _vector_models(taus, base=BASE6):
  return {'w': jnp.asarray(base)}, [{'w': jnp.asarray(base + t)} for t in taus]


def _random_models(n=3, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  def tree():
    return {'dense': {'kernel': rng.normal(size=(4, 3)), 'bias': rng.normal(size=(3,))},
            'head': {'kernel': rng.normal(size=(3, 2))}}
  base = jax.tree.map(lambda x: jnp.asarray(x, dtype), tree())
  models = [jax.tree.map(lambda b, d: (b + jnp.asarray(d, dtype)).astype(dtype), base, tree())
            for _ in range(n)]
  return base, models


class AverageAndTaskArithmeticTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_average_by_hand(self):
    base, models = _vector_models(TAU)
    out = self.variant(merging.average)(base, models)
    # mean of the three rows of TAU: [2/3, -2/3, 4.4/3, -3.5/3, -0.6/3, -0.5/3]
    expected = BASE6 + np.array([2.0, -2.0, 4.4, -3.5, -0.6, -0.5]) / 3.0
    np.testing.assert_allclose(out['w'], expected, rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_task_arithmetic_by_hand(self):
    base, models = _vector_models(TAU)
    out = self.variant(lambda b, m: merging.task_arithmetic(b, m, scaling=0.5))(base, models)
    expected = BASE6 + 0.5 * np.array([2.0, -2.0, 4.4, -3.5, -0.6, -0.5])
    np.testing.assert_allclose(out['w'], expected, rtol=1e-6, atol=1e-6)

  def test_scaling_is_traced_not_static(self):
    base, models = _vector_models(TAU)
    f = jax.jit(lambda b, m, s: merging.task_arithmetic(b, m, scaling=s))
    np.testing.assert_allclose(f(base, models, 0.0)['w'], BASE6)
    np.testing.assert_allclose(f(base, models, 1.0)['w'], BASE6 + TAU.sum(0), rtol=1e-6)

  def test_bfloat16_in_bfloat16_out(self):
    base, models = _random_models(dtype=jnp.bfloat16)
    out = merging.task_arithmetic(base, models, scaling=0.3)
    chex.assert_trees_all_equal_dtypes(out, base)


class TiesTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('global', 'per_tensor')
  def test_ties_by_hand(self, trim):
    # density 0.5 keeps 3 of 6 entries per vector:
    #   trim tau1 -> [ 3,  0,  0, -4,  2,  0]   (|4|, |3|, |2|)
    #   trim tau2 -> [-2,  5,  0,  0, -3,  0]   (|5|, |3|, |2|)
    #   trim tau3 -> [ 1, -6,  4,  0,  0,  0]   (|6|, |4|, |1|)
    #   summed mass  [ 2, -1,  4, -4, -1,  0]  -> elected signs [+, -, +, -, -, 0]
    #   disjoint mean: e0 mean(3, 1) = 2 (tau2's -2 disagrees); e1 -6 (tau2's +5 disagrees);
    #   e2 4; e3 -4; e4 -3 (tau1's +2 disagrees); e5 nothing agrees with sign 0 -> 0.
    base, models = _vector_models(TAU)
    merge = lambda b, m: merging.ties(b, m, density=0.5, scaling=0.5, trim=trim)
    out = self.variant(merge)(base, models)
    np.testing.assert_allclose(out['w'], BASE6 + 0.5 * np.array([2, -6, 4, -4, -3, 0]),
                               rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties_task_vectors_pure(self):
    tvs = [{'w': jnp.asarray(t)} for t in TAU]
    merge = functools.partial(merging.ties_task_vectors, density=0.5)
    out = self.variant(merge)(tvs)
    np.testing.assert_allclose(out['w'], [2, -6, 4, -4, -3, 0], atol=1e-6)
    out = self.variant(functools.partial(merging.ties_task_vectors, density=0.5, reduce='sum'))(tvs)
    np.testing.assert_allclose(out['w'], [4, -6, 4, -4, -3, 0], atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_global_versus_per_tensor_trim(self):
    tv = {'a': jnp.array([10.0, -20.0]), 'b': jnp.array([0.1, 0.2, -0.3])}
    # global: 5 entries, round(0.4 * 5) = 2 kept: -20 and 10, all of b dropped.
    out = self.variant(functools.partial(merging.trim_task_vector, density=0.4))(tv)
    np.testing.assert_allclose(out['a'], [10.0, -20.0])
    np.testing.assert_allclose(out['b'], [0.0, 0.0, 0.0])
    # per tensor: round(0.8) = 1 kept in a (-20), round(1.2) = 1 in b (-0.3).
    out = self.variant(functools.partial(merging.trim_task_vector, density=0.4,
                                         trim='per_tensor'))(tv)
    np.testing.assert_allclose(out['a'], [0.0, -20.0])
    np.testing.assert_allclose(out['b'], [0.0, 0.0, -0.3])

  def test_ties_on_a_large_model_against_numpy(self):
    # 75,100 entries per task vector: the global threshold takes the radix-select path.
    rng = np.random.default_rng(7)
    shapes = {'kernel': (300, 250), 'bias': (100,)}
    base = {k: jnp.asarray(rng.normal(size=v), jnp.float32) for k, v in shapes.items()}
    taus = [{k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
            for _ in range(3)]
    models = [{k: base[k] + t[k] for k in shapes} for t in taus]
    flat = np.stack([np.concatenate([t['bias'], t['kernel'].ravel()]) for t in taus])
    k = round(0.3 * flat.shape[1])
    thresholds = np.sort(np.abs(flat), axis=1)[:, -k]
    trimmed = np.where(np.abs(flat) >= thresholds[:, None], flat, 0.0)
    sign = np.sign(trimmed.sum(0))
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
    out = merging.ties(base, models, density=0.3, scaling=1.0)
    np.testing.assert_allclose(out['bias'], np.asarray(base['bias']) + merged[:100], atol=1e-5)
    np.testing.assert_allclose(out['kernel'],
                               np.asarray(base['kernel']) + merged[100:].reshape(300, 250),
                               atol=1e-5)

  def test_density_edges(self):
    tv = {'w': jnp.asarray(TAU[0])}
    np.testing.assert_array_equal(merging.trim_task_vector(tv, density=0.0)['w'], np.zeros(6))
    np.testing.assert_array_equal(merging.trim_task_vector(tv, density=1.0)['w'], TAU[0])

  def test_ties_density_one_single_model_is_task_arithmetic(self):
    base, models = _random_models(n=1)
    chex.assert_trees_all_close(merging.ties(base, models, density=1.0, scaling=0.7),
                                merging.task_arithmetic(base, models, scaling=0.7))


class KthLargestTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(300, 70_000)   # the sort path (<= 2^16 entries) and the radix path
  def test_against_numpy_sort(self, size):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(size,)).astype(np.float32)
    x[:40] = 0.0                     # many zeros
    x[40:60] = 1.25                  # ties
    x[60:70] = -1.25
    x[70:75] = 3e-39                 # subnormals
    leaves = [jnp.asarray(x[:100].reshape(10, 10)), jnp.asarray(x[100:])]
    expected = np.sort(np.abs(x))[::-1]
    for k in (1, 2, 17, 35, size // 2, size - 41, size - 40, size - 39, size):
      got = self.variant(merging.kth_largest_magnitude)(leaves, k)
      self.assertEqual(float(got), float(expected[k - 1]), msg=f'k={k}')


class DareTest(parameterized.TestCase):

  def test_expectation_equals_input(self):
    tau = jnp.asarray(np.random.default_rng(2).normal(size=(64,)), jnp.float32)
    p, n = 0.6, 4000
    sample = jax.jit(jax.vmap(
        lambda k: merging.dare_task_vectors(k, [{'w': tau}], drop_rate=p)[0]['w']))
    draws = np.asarray(sample(jax.random.split(jax.random.key(0), n)))
    # Each entry: mean of n draws of tau * Bernoulli(1 - p) / (1 - p); std tau sqrt(p/(1-p)/n).
    sigma = np.abs(np.asarray(tau)) * np.sqrt(p / (1 - p) / n)
    np.testing.assert_array_less(np.abs(draws.mean(0) - np.asarray(tau)), 5 * sigma + 1e-7)
    # Every draw entry is 0 or tau / (1 - p); about a fraction p of them are dropped.
    kept = draws != 0
    np.testing.assert_allclose(draws[kept], np.broadcast_to(tau / (1 - p), draws.shape)[kept],
                               rtol=1e-6)
    self.assertAlmostEqual(1 - kept.mean(), p, delta=0.01)

  @chex.variants(with_jit=True, without_jit=True)
  def test_edges_and_keys(self):
    tvs = [{'w': jnp.asarray(t)} for t in TAU]
    key = jax.random.key(3)
    same = self.variant(functools.partial(merging.dare_task_vectors, drop_rate=0.0))(key, tvs)
    chex.assert_trees_all_close(same, tvs)
    gone = self.variant(functools.partial(merging.dare_task_vectors, drop_rate=1.0))(key, tvs)
    chex.assert_trees_all_close(gone, [{'w': jnp.zeros(6)}] * 3)
    drop = functools.partial(merging.dare_task_vectors, drop_rate=0.5)
    a = self.variant(drop)(key, tvs)
    chex.assert_trees_all_close(a, self.variant(drop)(key, tvs))
    self.assertFalse(np.array_equal(np.stack([t['w'] for t in a]),
                                    np.stack([t['w'] for t in drop(jax.random.key(4), tvs)])))

  def test_dare_combines_with_ta_and_ties(self):
    # The same as TA / TIES applied to dare_task_vectors with the same key.
    base, models = _random_models()
    key = jax.random.key(0)
    tvs = [merging.task_vector(base, m) for m in models]
    dropped = merging.dare_task_vectors(key, tvs, drop_rate=0.5)
    expected_ta = merging.apply(base, jax.tree.map(lambda *x: sum(x), *dropped), scale=0.4)
    got_ta = merging.dare(base, models, key=key, drop_rate=0.5, scaling=0.4)
    chex.assert_trees_all_close(got_ta, expected_ta, rtol=1e-5, atol=1e-6)
    expected_ties = merging.apply(base, merging.ties_task_vectors(dropped, density=1.0), scale=0.4)
    got_ties = merging.dare(base, models, key=key, drop_rate=0.5, scaling=0.4, merge='ties')
    chex.assert_trees_all_close(got_ties, expected_ties, rtol=1e-5, atol=1e-6)


class MagmaxAndFisherTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_magmax_by_hand(self):
    taus = np.array([[1.0, -5.0, 2.0], [-3.0, 4.0, 0.5], [2.0, 1.0, -2.5]], np.float32)
    base = np.array([1.0, 1.0, 1.0], np.float32)
    b, models = _vector_models(taus, base)
    out = self.variant(merging.magmax)(b, models)
    np.testing.assert_allclose(out['w'], base + np.array([-3.0, -5.0, -2.5]))
    out = self.variant(lambda b, m: merging.magmax(b, m, scaling=0.5))(b, models)
    np.testing.assert_allclose(out['w'], base + 0.5 * np.array([-3.0, -5.0, -2.5]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_fisher_by_hand(self):
    base = {'w': jnp.array([0.5, 0.5])}
    models = [{'w': jnp.array([1.0, 2.0])}, {'w': jnp.array([3.0, 6.0])}]
    fishers = [{'w': jnp.array([1.0, 0.0])}, {'w': jnp.array([3.0, 0.0])}]
    # e0: (1*1 + 3*3) / (1 + 3) = 2.5; e1: both Fishers floored to epsilon -> (2 + 6) / 2 = 4.
    out = self.variant(lambda b, m, f: merging.fisher(b, m, fishers=f))(base, models, fishers)
    np.testing.assert_allclose(out['w'], [2.5, 4.0], rtol=1e-6)
    # Model weights (1, 3): e0 (1*1*1 + 3*3*3) / (1*1 + 3*3) = 2.8; e1 (1*2 + 3*6) / 4 = 5.
    out = self.variant(lambda b, m, f: merging.fisher(b, m, fishers=f, model_weights=[1.0, 3.0]))(
        base, models, fishers)
    np.testing.assert_allclose(out['w'], [2.8, 5.0], rtol=1e-6)

  def test_fisher_with_equal_fishers_is_average(self):
    base, models = _random_models()
    fishers = [jax.tree.map(lambda x: 2.0 * jnp.ones_like(x), base)] * 3
    chex.assert_trees_all_close(merging.fisher(base, models, fishers=fishers),
                                merging.average(base, models), rtol=1e-6, atol=1e-6)


def _quadratic_loss(target):
  def loss(params):
    return 0.5 * sum(jnp.sum((p - t) ** 2)
                     for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(target)))
  return loss


class FrankWolfeTest(parameterized.TestCase):

  @parameterized.parameters('cosine', 'inner')
  def test_reaches_vertex_optimum(self, criterion):
    # Candidates e1, e2, e3 (base 0): f = 0.5 ||theta - 2 e2||^2 is minimized over the simplex at
    # e2. Step 0 (gamma 1) jumps to e2; there the gap is 0 and every later step is skipped.
    base = {'w': jnp.zeros(3), 'b': jnp.ones(2)}
    models = [{'w': jnp.eye(3)[i], 'b': jnp.ones(2)} for i in range(3)]
    target = {'w': jnp.array([0.0, 2.0, 0.0]), 'b': jnp.ones(2)}
    params, info = merging.frank_wolfe_with_info(base, models, loss_fn=_quadratic_loss(target),
                                                 num_steps=4, criterion=criterion)
    np.testing.assert_allclose(params['w'], [0.0, 1.0, 0.0], atol=1e-7)
    np.testing.assert_array_equal(info.selected, [1, 1, 1, 1])
    np.testing.assert_allclose(info.step_size, [1.0, 0.0, 0.0, 0.0])

  @parameterized.parameters('cosine', 'inner')
  def test_iterates_by_hand(self, criterion):
    # Two candidates e1, e2; optimum (1/2, 1/2) inside the segment; start at e1.
    #   t=0: g = (1/2, -1/2) -> picks e2, gamma 1:   theta1 = (0, 1)
    #   t=1: g = (-1/2, 1/2) -> picks e1, gamma 2/3: theta2 = (2/3, 1/3)
    #   t=2: g = (1/6, -1/6) -> picks e2, gamma 1/2: theta3 = (1/3, 2/3)
    #   t=3: g = (-1/6, 1/6) -> picks e1, gamma 2/5: theta4 = (3/5, 2/5)
    base = {'w': jnp.zeros(2)}
    models = [{'w': jnp.array([1.0, 0.0])}, {'w': jnp.array([0.0, 1.0])}]
    loss = _quadratic_loss({'w': jnp.array([0.5, 0.5])})
    params, info = merging.frank_wolfe_with_info(base, models, loss_fn=loss, num_steps=4,
                                                 criterion=criterion, init_params=models[0])
    np.testing.assert_allclose(params['w'], [0.6, 0.4], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(info.selected, [1, 0, 1, 0])
    np.testing.assert_allclose(info.step_size, [1.0, 2 / 3, 1 / 2, 2 / 5], rtol=1e-6)
    # f(theta_t) for theta_0..theta_3 = e1, (0, 1), (2/3, 1/3), (1/3, 2/3).
    np.testing.assert_allclose(info.loss, [0.25, 0.25, 1 / 36, 1 / 36], rtol=1e-5)
    # FW gaps <g_t, theta_t - s_t>: (1/2, -1/2).(1, -1) = 1, then 1, (1/6, -1/6).(2/3, -2/3) = 2/9.
    np.testing.assert_allclose(info.gap, [1.0, 1.0, 2 / 9, 2 / 9], rtol=1e-5)

  def test_convergence_rate_bound(self):
    # f = 0.5 ||theta - theta*||^2 with theta* inside conv{e1..e4}: L = 1, diam^2 = 2, so
    # f(theta_t) <= 2 L diam^2 / (t + 2) = 4 / (t + 2) (Jaggi 2013, Thm. 1), and FW approaches
    # the known optimum theta*.
    star = jnp.array([0.1, 0.2, 0.3, 0.4])
    base = {'w': jnp.zeros(4)}
    models = [{'w': jnp.eye(4)[i]} for i in range(4)]
    params, info = merging.frank_wolfe_with_info(base, models, loss_fn=_quadratic_loss({'w': star}),
                                                 num_steps=200, criterion='inner')
    t = np.arange(200)
    np.testing.assert_array_less(np.asarray(info.loss)[1:], 4.0 / (t[1:] + 2 - 1))
    self.assertLess(float(jnp.linalg.norm(params['w'] - star)), 0.05)

  def test_excluded_leaves_stay_base(self):
    base, models = _random_models()
    loss = _quadratic_loss(models[2])
    out = merging.frank_wolfe(base, models, loss_fn=loss, num_steps=3, exclude='head/.*')
    np.testing.assert_array_equal(out['head']['kernel'], base['head']['kernel'])
    chex.assert_trees_all_close(out['dense'], models[2]['dense'])


class PermutationSymmetryTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('average', merging.average),
      ('task_arithmetic', functools.partial(merging.task_arithmetic, scaling=0.3)),
      ('ties_global', functools.partial(merging.ties, density=0.4, scaling=0.8)),
      ('ties_per_tensor', functools.partial(merging.ties, density=0.4, trim='per_tensor')),
      ('magmax', merging.magmax),
      ('dare_no_drop', functools.partial(merging.dare, key=jax.random.key(0), drop_rate=0.0,
                                         scaling=0.5, merge='ties', density=0.5)),
  )
  def test_order_does_not_matter(self, merge):
    base, models = _random_models(n=4)
    reference = merge(base, models)
    for order in ([3, 1, 0, 2], [2, 3, 1, 0]):
      chex.assert_trees_all_close(merge(base, [models[i] for i in order]), reference,
                                  rtol=1e-6, atol=1e-6)

  def test_fisher_order_does_not_matter(self):
    base, models = _random_models(n=3)
    rng = np.random.default_rng(5)
    fishers = [jax.tree.map(lambda x: jnp.asarray(rng.uniform(size=x.shape), x.dtype), base)
               for _ in models]
    weights = [0.2, 1.0, 0.5]
    reference = merging.fisher(base, models, fishers=fishers, model_weights=weights)
    order = [2, 0, 1]
    out = merging.fisher(base, [models[i] for i in order], fishers=[fishers[i] for i in order],
                         model_weights=[weights[i] for i in order])
    chex.assert_trees_all_close(out, reference, rtol=1e-6, atol=1e-6)


MERGES = {
    'average': merging.average,
    'task_arithmetic': functools.partial(merging.task_arithmetic, scaling=0.3),
    'ties': functools.partial(merging.ties, density=0.5),
    'dare': functools.partial(merging.dare, key=jax.random.key(0), drop_rate=0.3, scaling=0.3),
    'magmax': merging.magmax,
    'frank_wolfe': functools.partial(merging.frank_wolfe, loss_fn=lambda p: sum(
        jnp.sum(x ** 2) for x in jax.tree.leaves(p)), num_steps=2),
}


def _fisher_merge(base, models, **kw):
  return merging.fisher(base, models, fishers=[jax.tree.map(jnp.ones_like, base)] * len(models),
                        **kw)


MERGES['fisher'] = _fisher_merge


class ExcludeTest(parameterized.TestCase):

  @parameterized.named_parameters(*MERGES.items())
  def test_head_keeps_base_value(self, merge):
    base, models = _random_models()
    out = merge(base, models, exclude='head/.*')
    np.testing.assert_array_equal(out['head']['kernel'], base['head']['kernel'])
    self.assertFalse(np.array_equal(out['dense']['kernel'], base['dense']['kernel']))

  def test_global_trim_ignores_excluded_leaves(self):
    # A huge head task vector would take the whole global top-k budget if it were ranked.
    base = {'backbone': jnp.zeros(4), 'head': jnp.zeros(4)}
    model = {'backbone': jnp.array([1.0, -2.0, 3.0, -4.0]), 'head': jnp.full(4, 100.0)}
    out = merging.ties(base, [model], density=0.5, exclude='head')
    np.testing.assert_allclose(out['backbone'], [0.0, 0.0, 3.0, -4.0])
    np.testing.assert_array_equal(out['head'], np.zeros(4))


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(*MERGES.items())
  def test_empty_list(self, merge):
    base, _ = _random_models()
    with pytest.raises(ValueError, match='at least one finetuned model'):
      merge(base, [])

  @parameterized.named_parameters(*MERGES.items())
  def test_mismatch_names_first_path(self, merge):
    base, models = _random_models()
    bad = dict(models[1], dense=dict(models[1]['dense'], bias=jnp.zeros(4)))
    with pytest.raises(ValueError, match=r"finetuned\[1\] differs from base at "
                                         r"\['dense'\]\['bias'\]: shape"):
      merge(base, [models[0], bad])
    bad = dict(models[0], head={'kernel': models[0]['head']['kernel'].astype(jnp.bfloat16)})
    with pytest.raises(ValueError, match=r"\['head'\]\['kernel'\]: dtype bfloat16"):
      merge(base, [bad])
    bad = {'dense': models[0]['dense']}
    with pytest.raises(ValueError, match=r"lacks the leaf \['head'\]\['kernel'\]"):
      merge(base, [bad])

  @parameterized.named_parameters(*MERGES.items())
  def test_nan_is_reported_not_merged(self, merge):
    base, models = _random_models()
    bad_kernel = models[2]['dense']['kernel'].at[0, 1].set(np.nan)
    models[2] = dict(models[2], dense=dict(models[2]['dense'], kernel=bad_kernel))
    with pytest.raises(ValueError, match=r"finetuned\[2\] has non-finite values at "
                                         r"\['dense'\]\['kernel'\] \(1 NaN, 0 Inf\)"):
      merge(base, models)

  @parameterized.named_parameters(*MERGES.items())
  def test_exclude_matching_nothing(self, merge):
    base, models = _random_models()
    with pytest.raises(ValueError, match='matches no parameter'):
      merge(base, models, exclude='heads/.*')

  @parameterized.parameters(-0.1, 1.01, float('nan'))
  def test_density_out_of_range(self, density):
    base, models = _random_models()
    with pytest.raises(ValueError, match=r'density must lie in \[0, 1\]'):
      merging.ties(base, models, density=density)
    with pytest.raises(ValueError, match=r'density must lie in \[0, 1\]'):
      merging.dare(base, models, key=jax.random.key(0), drop_rate=0.1, scaling=1.0, merge='ties',
                   density=density)
    with pytest.raises(ValueError, match=r'density must lie in \[0, 1\]'):
      merging.trim_task_vector(base, density=density)
    with pytest.raises(ValueError, match=r'density must lie in \[0, 1\]'):
      merging.ties_task_vectors([base], density=density)

  @parameterized.parameters(-0.5, 1.5, float('inf'))
  def test_drop_rate_out_of_range(self, p):
    base, models = _random_models()
    with pytest.raises(ValueError, match=r'drop_rate must lie in \[0, 1\]'):
      merging.dare(base, models, key=jax.random.key(0), drop_rate=p, scaling=1.0)
    with pytest.raises(ValueError, match=r'drop_rate must lie in \[0, 1\]'):
      merging.dare_task_vectors(jax.random.key(0), [base], drop_rate=p)

  def test_other_hyperparameters(self):
    base, models = _random_models()
    with pytest.raises(ValueError, match='trim must be one of'):
      merging.ties(base, models, trim='layer')
    with pytest.raises(ValueError, match="merge must be one of"):
      merging.dare(base, models, key=jax.random.key(0), drop_rate=0.1, scaling=1.0, merge='avg')
    with pytest.raises(ValueError, match="density applies to merge='ties' only"):
      merging.dare(base, models, key=jax.random.key(0), drop_rate=0.1, scaling=1.0, density=0.5)
    with pytest.raises(ValueError, match='scaling must be finite'):
      merging.task_arithmetic(base, models, scaling=float('nan'))
    with pytest.raises(ValueError, match='at least one task vector'):
      merging.ties_task_vectors([])
    with pytest.raises(ValueError, match='at least one task vector'):
      merging.dare_task_vectors(jax.random.key(0), [], drop_rate=0.1)
    with pytest.raises(TypeError, match='must be a sequence'):
      merging.average(base, models[0])

  def test_fisher_inputs(self):
    base, models = _random_models(n=2)
    ones = jax.tree.map(jnp.ones_like, base)
    with pytest.raises(ValueError, match='fishers has 1 entries for 2 finetuned models'):
      merging.fisher(base, models, fishers=[ones])
    bad = dict(ones, head={'kernel': ones['head']['kernel'].at[1, 1].set(np.inf)})
    with pytest.raises(ValueError, match=r"fishers\[1\] has non-finite values at "
                                         r"\['head'\]\['kernel'\]"):
      merging.fisher(base, models, fishers=[ones, bad])
    bad = dict(ones, head={'kernel': -ones['head']['kernel']})
    with pytest.raises(ValueError, match=r"fishers\[0\] has negative entries at "
                                         r"\['head'\]\['kernel'\]"):
      merging.fisher(base, models, fishers=[bad, ones])
    # An excluded leaf's Fisher is not used, so it is not checked either.
    merging.fisher(base, models, fishers=[bad, ones], exclude='head/.*')
    with pytest.raises(ValueError, match=r"fishers\[0\] differs from base at "
                                         r"\['dense'\]\['bias'\]: shape"):
      merging.fisher(base, models, fishers=[dict(ones, dense={'kernel': ones['dense']['kernel'],
                                                               'bias': jnp.ones(5)}), ones])
    with pytest.raises(ValueError, match='model_weights must be nonnegative'):
      merging.fisher(base, models, fishers=[ones, ones], model_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match='model_weights has 3 entries'):
      merging.fisher(base, models, fishers=[ones, ones], model_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r'epsilon must lie in \(0, inf\)'):
      merging.fisher(base, models, fishers=[ones, ones], epsilon=0.0)

  def test_frank_wolfe_inputs(self):
    base, models = _random_models(n=2)
    loss = lambda p: jnp.sum(p['dense']['bias'])
    with pytest.raises(ValueError, match='num_steps must be an int >= 1'):
      merging.frank_wolfe(base, models, loss_fn=loss, num_steps=0)
    with pytest.raises(ValueError, match='criterion must be one of'):
      merging.frank_wolfe(base, models, loss_fn=loss, criterion='l2')
    with pytest.raises(ValueError, match=r'step_scale must lie in \(0, 1\]'):
      merging.frank_wolfe(base, models, loss_fn=loss, step_scale=1.5)
    bad = dict(base, dense=dict(base['dense'], bias=base['dense']['bias'].at[0].set(np.nan)))
    with pytest.raises(ValueError, match=r"init_params has non-finite values at "
                                         r"\['dense'\]\['bias'\]"):
      merging.frank_wolfe(base, models, loss_fn=loss, init_params=bad)
