"""Tests for cljax.merging.consensus (TALL masks, consensus masks and merges), by hand and NumPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cljax.merging import consensus as cons
from tests.merge_io import reference

# Three task vectors of length 5, base 0.
TAU = np.array([[2.0, 0.1, -1.0, 0.0, 3.0],
                [1.5, -0.2, 1.0, 0.5, -3.0],
                [0.1, 0.1, -1.0, -0.4, 0.2]])


def _vector_models(taus=TAU, base=None):
  base = np.zeros(taus.shape[1]) if base is None else base
  return {'w': jnp.asarray(base, jnp.float32)}, [{'w': jnp.asarray(base + t, jnp.float32)}
                                                  for t in taus]


def test_tall_masks_by_hand():
  # tau_MTL = [3.6, 0.0, -1.0, 0.1, 0.2]; lambda = 1: keep |tau_t| > |tau_MTL - tau_t|.
  #   t0: |2|>1.6 y, .1>.1 n (strict), 1>0 y, 0>.1 n, 3>2.8 y
  #   t1: 1.5>2.1 n, .2>.2 n, 1>2 n, .5>.4 y, 3>3.2 n
  #   t2: .1>3.5 n, .1>.1 n, 1>0 y, .4>.5 n, .2>0 y
  base, models = _vector_models()
  masks = cons.tall_masks(base, models, lambdas=1.0)
  np.testing.assert_array_equal(masks[0]['w'], [1, 0, 1, 0, 1])
  np.testing.assert_array_equal(masks[1]['w'], [0, 0, 0, 1, 0])
  np.testing.assert_array_equal(masks[2]['w'], [0, 0, 1, 0, 1])
  # Per-task lambdas: task 1 with lambda 0.5 also keeps entries 0 (1.5 > 1.05), 1 (.2 > .1) and
  # 4 (3 > 1.6), but not 2 (1 > 0.5 * 2 is false: strict).
  masks = cons.tall_masks(base, models, lambdas=[1.0, 0.5, 1.0])
  np.testing.assert_array_equal(masks[1]['w'], [1, 1, 0, 1, 1])
  np.testing.assert_array_equal(cons.consensus_mask(masks, k=2)['w'], [1, 0, 1, 0, 1])


def test_consensus_task_arithmetic_by_hand():
  base, models = _vector_models(base=np.arange(5.0))
  out = cons.consensus(base, models, scaling=0.5, lambdas=1.0, k=2)
  # counts [1, 0, 2, 1, 2] -> k = 2 keeps entries 2 and 4 of tau_MTL = [3.6, 0, -1, 0.1, 0.2].
  np.testing.assert_allclose(out['w'], np.arange(5.0) + 0.5 * np.array([0, 0, -1.0, 0, 0.2]),
                             rtol=1e-6)
  out = cons.consensus(base, models, scaling=1.0, lambdas=1.0, k=0)   # k = 0: plain TA
  np.testing.assert_allclose(out['w'], np.arange(5.0) + TAU.sum(0), rtol=1e-6)


def test_consensus_ties_matches_numpy():
  rng = np.random.default_rng(0)
  taus = rng.normal(size=(4, 40))
  base, models = _vector_models(taus)
  out = cons.consensus(base, models, scaling=0.8, lambdas=[0.3, 0.4, 0.5, 0.6], k=2,
                       merge='ties', density=0.5)
  trimmed = [reference.np_trim(t, 0.5) for t in taus]
  sign = np.sign(np.sum(trimmed, 0))
  agree = [(np.sign(t) == sign) & (t != 0) for t in trimmed]
  mtl = np.sum([t * a for t, a in zip(trimmed, agree)], 0) / np.maximum(np.sum(agree, 0), 1)
  masks = [np.abs(t) > lam * np.abs(mtl - t) for t, lam in zip(taus, [0.3, 0.4, 0.5, 0.6])]
  keep = np.sum(masks, 0) >= 2
  np.testing.assert_allclose(out['w'], 0.8 * keep * mtl, rtol=1e-5, atol=1e-6)


def test_excluded_leaves_are_false_and_kept():
  base = {'a': jnp.zeros(3), 'head': jnp.ones(2)}
  models = [{'a': jnp.array([1.0, 2.0, 3.0]), 'head': jnp.array([5.0, 5.0])}] * 2
  masks = cons.tall_masks(base, models, lambdas=0.2, exclude='head')
  assert not bool(masks[0]['head'].any())
  out = cons.consensus(base, models, scaling=1.0, lambdas=0.2, exclude='head')
  np.testing.assert_array_equal(out['head'], [1.0, 1.0])
  with pytest.raises(ValueError, match='2 values for 2 models|lambdas'):
    cons.tall_masks(base, models, lambdas=[0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match='k must be'):
    cons.consensus_mask(masks, k=-1)
