"""Tests for TIES with a sampled trim threshold (``merging.ties(threshold='sampled')``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from cljax import merging
from cljax.merging import static


def _models(shapes, n, seed):
  rng = np.random.default_rng(seed)
  base = {k: jnp.asarray(rng.normal(size=v), jnp.float32) for k, v in shapes.items()}
  models = [{k: base[k] + jnp.asarray(rng.standard_t(3, size=v), jnp.float32)
             for k, v in shapes.items()}
            for _ in range(n)]
  return base, models


class WeightedKthTest(parameterized.TestCase):

  def test_unit_weights_is_the_kth_largest(self):
    values = np.array([0.5, 3.0, 1.0, 2.0, 4.0], np.float32)
    for k, expected in [(1, 4.0), (2, 3.0), (3, 2.0), (5, 0.5)]:
      assert static._weighted_kth_largest(values, np.ones(5), k) == expected

  def test_weights_count_as_entries(self):
    # 4.0 stands for 1 entry, 3.0 for 10, 1.0 for 5: the 2nd..11th largest are all 3.0.
    values = np.array([1.0, 4.0, 3.0], np.float32)
    weights = np.array([5.0, 1.0, 10.0])
    assert static._weighted_kth_largest(values, weights, 1) == 4.0
    assert static._weighted_kth_largest(values, weights, 2) == 3.0
    assert static._weighted_kth_largest(values, weights, 11) == 3.0
    assert static._weighted_kth_largest(values, weights, 12) == 1.0
    assert static._weighted_kth_largest(values, weights, 16) == 1.0

  def test_equal_non_unit_weights(self):
    values = np.arange(10, dtype=np.float32)   # each stands for 3 entries
    assert static._weighted_kth_largest(values, np.full(10, 3.0), 6) == 8.0
    assert static._weighted_kth_largest(values, np.full(10, 3.0), 7) == 7.0


class SampledTiesTest(parameterized.TestCase):

  @parameterized.parameters('global', 'per_tensor')
  def test_small_models_are_ranked_exactly(self, trim):
    # 1,300 entries per task vector <= sample_size: every entry is taken, the threshold is exact.
    base, models = _models({'kernel': (40, 30), 'bias': (100,)}, n=3, seed=0)
    exact = merging.ties(base, models, density=0.3, trim=trim)
    sampled = merging.ties(base, models, density=0.3, trim=trim, threshold='sampled',
                           key=jax.random.key(0), sample_size=2048)
    jax.tree.map(np.testing.assert_array_equal, sampled, exact)

  @parameterized.parameters('global', 'per_tensor')
  def test_kept_fraction_is_within_the_sampling_error(self, trim):
    # One model: TIES keeps exactly the trimmed entries, so the nonzeros of merged - base are
    # the kept entries. 210,100 entries, 4,096 sampled: sd of the kept fraction ~0.007.
    density, sample_size = 0.2, 4096
    shapes = {'a': (400, 300), 'b': (300, 300), 'c': (100,)}
    base, models = _models(shapes, n=1, seed=1)
    out = merging.ties(base, models, density=density, trim=trim, threshold='sampled',
                       key=jax.random.key(3), sample_size=sample_size)
    kept = {k: np.count_nonzero(np.asarray(out[k]) != np.asarray(base[k])) for k in shapes}
    sd = np.sqrt(density * (1 - density) / sample_size)
    if trim == 'global':
      fraction = sum(kept.values()) / sum(np.prod(v) for v in shapes.values())
      assert abs(fraction - density) < 5 * sd, fraction
    else:
      for k in ('a', 'b'):
        assert abs(kept[k] / np.prod(shapes[k]) - density) < 5 * sd, (k, kept[k])
      assert kept['c'] == 20   # 100 entries <= sample_size: ranked exactly.

  def test_matches_exact_ties_away_from_the_threshold(self):
    # Against a numpy TIES given the exact thresholds: entries whose magnitude is far from every
    # model's threshold are trimmed identically, so the merges agree there.
    rng = np.random.default_rng(2)
    tau = rng.normal(size=(3, 200_000)).astype(np.float32)
    base = {'w': jnp.zeros(200_000, jnp.float32)}
    models = [{'w': jnp.asarray(t)} for t in tau]
    out = np.asarray(merging.ties(base, models, density=0.2, threshold='sampled',
                                  key=jax.random.key(0), sample_size=1 << 14)['w'])
    k = round(0.2 * 200_000)
    t = np.sort(np.abs(tau), axis=1)[:, -k]
    trimmed = np.where(np.abs(tau) >= t[:, None], tau, 0.0)
    sign = np.sign(trimmed.sum(0))
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    expected = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
    far = np.all(np.abs(np.abs(tau) - t[:, None]) > 0.05 * t[:, None], axis=0)
    assert far.mean() > 0.5
    np.testing.assert_allclose(out[far], expected[far], rtol=1e-6)

  def test_different_keys_draw_different_samples(self):
    base, models = _models({'w': (50_000,)}, n=1, seed=4)
    a, b = (merging.ties(base, models, density=0.2, threshold='sampled', key=jax.random.key(s),
                         sample_size=512)['w'] for s in (0, 1))
    assert np.count_nonzero(np.asarray(a) != np.asarray(base['w'])) != np.count_nonzero(
        np.asarray(b) != np.asarray(base['w']))

  @parameterized.parameters((np.nan, '1 NaN, 0 Inf'), (np.inf, '0 NaN, 1 Inf'))
  def test_non_finite_input_is_named(self, value, counts):
    base, models = _models({'w': (30_000,), 'v': (10,)}, n=3, seed=5)
    models[1] = dict(models[1], w=models[1]['w'].at[123].set(value))
    for threshold, key in [('sampled', jax.random.key(0)), ('exact', None)]:
      with pytest.raises(ValueError, match=rf"finetuned\[1\] has non-finite values at "
                                           rf"\['w'\] \({counts}\)"):
        merging.ties(base, models, threshold=threshold, key=key, sample_size=256)

  @parameterized.parameters('global', 'per_tensor')
  def test_empty_leaves(self, trim):
    # A zero-size leaf takes no part in the sample; with only empty leaves nothing is sampled.
    base, models = _models({'a': (100,), 'e': (0, 4)}, n=2, seed=7)
    for b, ms in [(base, models), ({'e': base['e']}, [{'e': m['e']} for m in models])]:
      exact = merging.ties(b, ms, density=0.2, trim=trim)
      sampled = merging.ties(b, ms, density=0.2, trim=trim, threshold='sampled',
                             key=jax.random.key(0), sample_size=256)
      jax.tree.map(np.testing.assert_array_equal, sampled, exact)

  def test_bad_arguments(self):
    base, models = _models({'w': (10,)}, n=2, seed=6)
    with pytest.raises(ValueError, match='needs key='):
      merging.ties(base, models, threshold='sampled')
    with pytest.raises(ValueError, match='sample_size'):
      merging.ties(base, models, threshold='sampled', key=jax.random.key(0), sample_size=0)
    with pytest.raises(ValueError, match='threshold'):
      merging.ties(base, models, threshold='approximate')
