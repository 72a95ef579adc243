"""core: weighted losses and evaluation over (B,) and (B, L) labels, against numpy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import core
from cljax import sharding
from cljax import training


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_nll(logits, labels):
  lp = _log_softmax(np.asarray(logits, np.float64))
  return -np.take_along_axis(lp, labels[..., None], -1)[..., 0]


def test_cross_entropy_weighted_mean_over_tokens():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (3, 5)).astype(np.int32)
  weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
  nll = _np_nll(logits, labels)
  np.testing.assert_allclose(core.cross_entropy(logits, labels, weights=weights),
                             (weights * nll).sum() / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(core.cross_entropy(logits, labels), nll.mean(), rtol=1e-5)
  # Per-example weights broadcast over the positions.
  per_example = np.array([1.0, 0.0, 2.0], np.float32)
  w = np.broadcast_to(per_example[:, None], (3, 5))
  np.testing.assert_allclose(core.cross_entropy(logits, labels, weights=per_example),
                             (w * nll).sum() / w.sum(), rtol=1e-5)


def test_mask_applies_to_every_position():
  logits = np.zeros((1, 2, 4), np.float32)
  logits[0, :, 0] = 5.0  # Output 0 wins unless masked.
  labels = np.array([[2, 3]], np.int32)
  mask = np.array([[False, False, True, True]])
  sums = core.eval_sums(logits, labels, mask)
  # Masked: the two allowed outputs tie at 0, argmax picks output 2: 1 of 2 tokens right.
  assert float(sums.correct) == 1.0 and float(sums.weight) == 2.0
  np.testing.assert_allclose(float(sums.nll), 2 * np.log(2.0), rtol=1e-6)


def test_shape_and_weight_errors():
  with pytest.raises(ValueError, match=r'do not match labels'):
    core.cross_entropy(np.zeros((2, 3, 4)), np.zeros((2,), np.int32))
  with pytest.raises(ValueError, match=r'Batch.weights has shape \(3,\)'):
    core.position_weights(np.zeros((2, 5), np.int32), np.ones(3))


def test_evaluate_token_labels_is_a_fraction():
  """(B, L) labels: accuracy = correct tokens / weighted tokens (it once summed per-example
  booleans over L and reported 14.59 as an accuracy), NLL the mean per token; the padded last
  evaluation batch and weight-0 tokens are not counted."""
  rng = np.random.default_rng(1)
  b, l, v = 7, 6, 5
  table = rng.normal(size=(v, v)).astype(np.float32)

  def apply_fn(params, x, *, train=False, rngs=None):
    del train, rngs
    return params[x]  # (B, L) ids -> (B, L, V) logits.

  x = rng.integers(0, v, (b, l)).astype(np.int32)
  y = rng.integers(0, v, (b, l)).astype(np.int32)
  w = (rng.random((b, l)) > 0.25).astype(np.float32)
  data = core.Batch(x, y, weights=w)
  mesh = sharding.make_mesh(1)
  ev = training.evaluate(training.make_eval_fn(apply_fn, mesh), jnp.asarray(table), data,
                         batch_size=4, mesh=mesh)
  logits = table[x]
  hits = (logits.argmax(-1) == y)
  assert 0.0 <= ev.accuracy <= 1.0
  np.testing.assert_allclose(ev.accuracy, (w * hits).sum() / w.sum(), rtol=1e-6)
  np.testing.assert_allclose(ev.nll, (w * _np_nll(logits, y)).sum() / w.sum(), rtol=1e-5)


def test_batch_aux_is_a_pytree_and_not_shared():
  a = core.Batch(np.zeros((2, 1)), np.zeros((2,), np.int32))
  b = a.with_aux(t=np.ones((2, 3)))
  assert a.aux == {} and set(b.aux) == {'t'}
  sliced = jax.tree.map(lambda z: z[:1], b)
  assert sliced.aux['t'].shape == (1, 3) and sliced.mask is None
  with pytest.raises(ValueError, match='different fields'):
    core.concatenate([a, b])
