"""EWC: the constant-memory penalty equals the per-task sum, computed by hand."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import core
from cljax.methods import regularizers


def _tree(a, b):
  return {'dense': {'kernel': jnp.asarray(a, jnp.float32)}, 'head': {'bias': jnp.asarray(b, jnp.float32)}}


F1, A1 = _tree([[1.0, 0.0], [2.0, 0.5]], [0.0, 3.0]), _tree([[0.5, -1.0], [0.0, 2.0]], [1.0, -1.0])
F2, A2 = _tree([[0.0, 0.0], [1.0, 1.5]], [2.0, 1.0]), _tree([[1.5, 0.0], [1.0, -2.0]], [0.0, 0.5])
THETA = _tree([[0.3, 0.7], [-0.4, 0.1]], [0.2, 0.9])


def _hand_penalty(theta, terms):
  """sum over (gamma, F, anchor) of gamma * sum F (theta - anchor)^2, in numpy float64."""
  total = 0.0
  for gamma, f, a in terms:
    for fl, al, tl in zip(jax.tree.leaves(f), jax.tree.leaves(a), jax.tree.leaves(theta)):
      total += gamma * np.sum(np.asarray(fl, np.float64) * (np.asarray(tl, np.float64) - np.asarray(al, np.float64)) ** 2)
  return total


class PenaltyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_two_tasks_equal_sum_of_penalties(self):
    method = regularizers.ewc(strength=4.0)
    state = method.init(THETA)
    state = regularizers.consolidate(state, F1, A1)
    state = regularizers.consolidate(state, F2, A2)
    penalty = lambda p, s: method.loss(p, s, None, logits=None, apply_fn=None, key=None)
    loss = self.variant(penalty)(THETA, state)
    expected = 0.5 * 4.0 * _hand_penalty(THETA, [(1.0, F1, A1), (1.0, F2, A2)])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # The gradient too: strength * sum_k F_k (theta - a_k).
    grad = self.variant(jax.grad(penalty))(THETA, state)
    expected_grad = jax.tree.map(lambda t, f1, a1, f2, a2: 4.0 * (f1 * (t - a1) + f2 * (t - a2)),
                                 THETA, F1, A1, F2, A2)
    chex.assert_trees_all_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    self.assertEqual(int(state.num_tasks), 2)

  def test_online_decay(self):
    state = regularizers.ewc().init(THETA)
    state = regularizers.consolidate(state, F1, A1, decay=0.5)
    state = regularizers.consolidate(state, F2, A2, decay=0.5)
    np.testing.assert_allclose(regularizers.ewc_penalty(THETA, state),
                               _hand_penalty(THETA, [(0.5, F1, A1), (1.0, F2, A2)]), rtol=1e-5)

  def test_state_shape_is_constant(self):
    state = regularizers.ewc().init(THETA)
    shapes = jax.tree.map(jnp.shape, state)
    for _ in range(3):
      state = regularizers.consolidate(state, F1, A1)
    self.assertEqual(jax.tree.map(jnp.shape, state), shapes)


def _tiny():
  def apply_fn(params, x, *, train=False, rngs=None):
    del train, rngs
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ params['w1'])
    return h @ params['w2']
  rng = np.random.default_rng(0)
  params = {'w1': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            'w2': jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
  data = core.Batch(rng.normal(size=(5, 3)).astype(np.float32), np.array([0, 1, 1, 0, 1], np.int32),
                    np.ones((5, 2), bool))
  return apply_fn, params, data


def test_end_task_uses_exact_fisher_at_the_task_parameters():
  apply_fn, params, data = _tiny()
  method = regularizers.ewc(strength=2.0, num_samples=100)
  state = method.end_task(params, method.init(params), data, apply_fn=apply_fn,
                           key=jax.random.key(0))
  # Two-class softmax: the exact Fisher of w2[:, k] is mean h^2 p0 p1 (closed form, by hand).
  h = np.tanh(data.x @ np.asarray(params['w1'], np.float64))
  z = h @ np.asarray(params['w2'], np.float64)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  expected_w2 = np.mean(h[:, :, None] ** 2 * (p[:, 0] * p[:, 1])[:, None, None], axis=0)
  np.testing.assert_allclose(state.fisher['w2'], np.broadcast_to(expected_w2, (4, 2)), rtol=1e-5)
  chex.assert_trees_all_close(state.anchor, params)
  # At the anchor the penalty is zero; moving one weight by delta costs strength/2 * F * delta^2.
  penalty = lambda p: method.loss(p, state, data, logits=None, apply_fn=apply_fn, key=None)
  np.testing.assert_allclose(penalty(params), 0.0, atol=1e-6)
  moved = {'w1': params['w1'], 'w2': params['w2'].at[1, 0].add(0.5)}
  np.testing.assert_allclose(penalty(moved),
                             0.5 * 2.0 * expected_w2[1, 0] * 0.25, rtol=1e-5)


@pytest.mark.parametrize('kwargs, match', [
    ({'strength': -1.0}, 'ewc.strength'), ({'strength': float('nan')}, 'ewc.strength'),
    ({'fisher_estimator': 'kfac'}, 'ewc.fisher_estimator'), ({'num_samples': 0}, 'ewc.num_samples'),
])
def test_bad_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    regularizers.ewc(**kwargs)
