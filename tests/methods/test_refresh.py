"""refresh: the unlearn step, the relearn gradient and the loop's update against hand computations.

Refresh around another method is their `chain` (``chain(l2(), refresh())``, ``'ewc+refresh'``).
"""

from __future__ import annotations

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import core
from cljax import methods
from cljax import training
from cljax.methods import refresh as refresh_lib
from cljax.methods import regularizers
from cljax.methods import replay as replay_lib

# The two-layer net and its numpy reference are shared with the regularizer tests.
from test_regularizers import (apply_fn, assert_tree_close, make_data, make_params,
                               np_ce_grad, np_forward, np_params, shifted)

KEY = jax.random.key(0)  # The loop's key for a step (or a task, for end_task / prepare_task).


def np_ce(p, data):
  _, _, logits = np_forward(p, data.x)
  logits = np.where(data.mask, logits, -np.inf)
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
  return -np.mean(logp[np.arange(data.size), data.y])


def np_displacement(p, g, f, xi, *, rate, sigma, c, normalize):
  def leaf(pp, gg, ff, nn):
    d = gg * np.linalg.norm(pp) / (np.linalg.norm(gg) + 1e-12) if normalize else gg
    return rate * (d + sigma * nn) / (1.0 + c * ff)
  return jax.tree.map(leaf, p, g, f, xi)


class DisplacementTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_formula(self):
    params = make_params()
    grads, noise = shifted(jax.tree.map(jnp.zeros_like, params), 1.0, 1), shifted(
        jax.tree.map(jnp.zeros_like, params), 1.0, 2)
    fisher = jax.tree.map(jnp.abs, shifted(jax.tree.map(jnp.zeros_like, params), 30.0, 3))
    for normalize in (True, False):
      got = self.variant(lambda p, g, f, n, normalize=normalize: refresh_lib.unlearn_displacement(
          p, g, f, n, unlearn_rate=0.05, noise_scale=0.1, fisher_weight=0.2, normalize=normalize))(
              params, grads, fisher, noise)
      want = np_displacement(*(np_params(t) for t in (params, grads, fisher, noise)), rate=0.05,
                             sigma=0.1, c=0.2, normalize=normalize)
      assert_tree_close(got, want)


class UnlearnRelearnTest(chex.TestCase):

  def _loop_objective(self, method):
    """What the training loop differentiates at the step's point: CE + method.loss."""
    def total(params, state, batch):
      logits = apply_fn(params, batch.x, train=True)
      ce = core.cross_entropy(logits, batch.y, batch.mask)
      return ce + method.loss(params, state, batch, logits=logits, apply_fn=apply_fn, key=KEY)
    return total

  def _around_l2(self, theta, anchor, **hparams):
    """refresh around L2 (``chain(l2, refresh)``), L2 anchored at ``anchor`` after one task."""
    inner = regularizers.l2(strength=0.8)
    method = methods.chain(inner, refresh_lib.refresh(**hparams))
    state = method.init(theta)
    state = (inner.end_task(anchor, state[0], None, apply_fn=apply_fn, key=KEY), state[1])
    return inner, method, state

  @chex.variants(with_jit=True, without_jit=True)
  def test_unlearn_point_and_relearn_gradient(self):
    theta, anchor = make_params(0), make_params(1)
    data = make_data(mask=[True, True, False], labels=[0, 1, 1, 0, 0, 1])
    _, method, state = self._around_l2(theta, anchor, unlearn_rate=0.05, noise=0.0,
                                       fisher_weight=0.0)
    unlearned = self.variant(
        lambda p, s, b: method.intercept(p, s, b, apply_fn=apply_fn, key=KEY)[0])(
            theta, state, data)
    # The forward pass is left as it is (refresh moves the parameters only).
    assert method.intercept(theta, state, data, apply_fn=apply_fn, key=KEY)[1] is apply_fn
    value, grads = self.variant(jax.value_and_grad(self._loop_objective(method)))(
        unlearned, state, data)
    # By hand: ascend the batch's cross-entropy (norm-scaled per tensor), then take the full
    # objective's gradient there.
    t, a = np_params(theta), np_params(anchor)
    zeros = jax.tree.map(np.zeros_like, t)
    delta = np_displacement(t, np_ce_grad(t, data), zeros, zeros, rate=0.05, sigma=0.0, c=0.0,
                            normalize=True)
    t1 = jax.tree.map(np.add, t, delta)
    assert_tree_close(unlearned, t1, rtol=1e-5, atol=1e-7)
    want_value = np_ce(t1, data) + 0.5 * 0.8 * sum(
        np.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(t1), jax.tree.leaves(a)))
    want_grads = jax.tree.map(lambda g, x, y: g + 0.8 * (x - y), np_ce_grad(t1, data), t1, a)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    assert_tree_close(grads, want_grads, rtol=1e-4, atol=1e-6)
    # The unlearn step is an ascent step: the batch loss is higher at the unlearned point.
    assert np_ce(t1, data) > np_ce(t, data)

  def test_training_step_is_taken_from_the_unlearned_point(self):
    """One full-batch SGD step through `training.fit_task`: theta <- theta' - lr grad L(theta'),
    the displacement kept (Wang et al. 2024, Algorithm 1)."""
    theta, anchor, data, lr = make_params(0), make_params(1), make_data(), 0.1
    _, method, state = self._around_l2(theta, anchor, unlearn_rate=0.05, noise=0.0,
                                       fisher_weight=0.0)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
    result = training.fit_task(apply_fn, method, optax.sgd(lr), theta, state, data, epochs=1,
                               batch_size=data.size, seed=0, mesh=mesh)
    t, a = np_params(theta), np_params(anchor)
    zeros = jax.tree.map(np.zeros_like, t)
    t1 = jax.tree.map(np.add, t, np_displacement(t, np_ce_grad(t, data), zeros, zeros, rate=0.05,
                                                 sigma=0.0, c=0.0, normalize=True))
    want = jax.tree.map(lambda x, g, y: x - lr * (g + 0.8 * (x - y)), t1, np_ce_grad(t1, data), a)
    assert_tree_close(result.params, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.losses, [np_ce(t1, data)], rtol=1e-5)

  def test_zero_rate_is_the_inner_method(self):
    theta, data = make_params(0), make_data()
    inner, method, outer = self._around_l2(theta, make_params(1), unlearn_rate=0.0, noise=0.0)
    assert method.intercept is None
    got = jax.grad(self._loop_objective(method))(theta, outer, data)
    want = jax.grad(self._loop_objective(inner))(theta, outer[0], data)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)

  def test_fisher_preconditions_the_step(self):
    theta, data = make_params(0), make_data()
    method = refresh_lib.refresh(unlearn_rate=0.05, noise=0.0, fisher_weight=10.0,
                                 num_samples=100)
    state = method.end_task(theta, method.init(theta), data, apply_fn=apply_fn, key=KEY)
    # Same estimator, subset and seed as ewc's: the same Fisher.
    ewc = regularizers.ewc(fisher_estimator='empirical', num_samples=100)
    chex.assert_trees_all_close(
        state.fisher, ewc.end_task(theta, ewc.init(theta), data, apply_fn=apply_fn, key=KEY).fisher)
    got = jax.jit(lambda p, s, b: method.intercept(p, s, b, apply_fn=apply_fn, key=KEY)[0])(
        theta, state, data)
    t, f = np_params(theta), np_params(state.fisher)
    delta = np_displacement(t, np_ce_grad(t, data), f, jax.tree.map(np.zeros_like, t), rate=0.05,
                            sigma=0.0, c=10.0, normalize=True)
    assert_tree_close(got, jax.tree.map(np.add, t, delta), rtol=1e-5, atol=1e-7)

  def test_noise_changes_every_step(self):
    # The noise is drawn from the loop's per-step key, fold_in(task key, step), folded with the
    # seed: no key in the state, no per-step hook.
    theta, data = make_params(0), make_data()
    method = refresh_lib.refresh(unlearn_rate=0.05, noise=1.0)
    assert method.update is None
    state = method.init(theta)
    unlearn = jax.jit(lambda p, s, b, k: method.intercept(p, s, b, apply_fn=apply_fn, key=k)[0])
    step_keys = [jax.random.fold_in(KEY, step) for step in range(2)]
    p0 = unlearn(theta, state, data, step_keys[0])
    chex.assert_trees_all_close(unlearn(theta, state, data, step_keys[0]), p0)  # Given the key.
    p1 = unlearn(theta, state, data, step_keys[1])
    assert not np.allclose(np.asarray(p0['dense0']['kernel']), np.asarray(p1['dense0']['kernel']))


def test_chain_runs_the_members_hooks():
  """Refresh around another method is their chain: each member's hooks run on its own state."""
  theta, data = make_params(0), make_data()
  si = regularizers.si(strength=1.0)
  method = methods.chain(si, refresh_lib.refresh(noise=0.0))
  assert method.update is not None
  new = shifted(theta, 0.1, 3)
  updates = jax.tree.map(jnp.subtract, new, theta)
  grads = shifted(jax.tree.map(jnp.zeros_like, theta), 1.0, 4)
  state = method.update(method.init(theta), theta, updates, grads, key=KEY)
  chex.assert_trees_all_close(state[0].omega,
                              regularizers.si_path_step(si.init(theta).omega, updates, grads))
  state = method.end_task(new, state, data, apply_fn=apply_fn, key=KEY)
  assert int(state[1].num_tasks) == 1
  chex.assert_trees_all_close(state[0].anchor, new)
  # Training data come from the other member (joint: every seen task's).
  joint = methods.chain(replay_lib.joint(), refresh_lib.refresh())
  prepared = joint.prepare_task(theta, joint.init(theta), data, seen=[data, data],
                                apply_fn=apply_fn, key=KEY)
  assert prepared.size == 2 * data.size
  # Refresh itself prepares no data and has no per-step state update.
  assert refresh_lib.refresh().prepare_task is None
  assert refresh_lib.refresh(noise=0.0).update is None
  assert methods.chain(regularizers.finetune(), refresh_lib.refresh(noise=0.0)).update is None
  # LwF's recorded responses and distillation term pass through to the loop.
  lwf = regularizers.lwf(strength=2.0)
  wrapped = methods.chain(lwf, refresh_lib.refresh(noise=0.0))
  outer = wrapped.end_task(theta, wrapped.init(theta), data, apply_fn=apply_fn, key=KEY)
  assert int(outer[0].num_tasks) == 1  # So that the distillation term is not 0.
  prepared = wrapped.prepare_task(theta, outer, data, seen=[data], apply_fn=apply_fn, key=KEY)
  teacher = regularizers.TEACHER_LOGITS
  np.testing.assert_allclose(
      prepared.aux[teacher],
      lwf.prepare_task(theta, outer[0], data, seen=[data], apply_fn=apply_fn, key=KEY).aux[teacher])
  logits = apply_fn(theta, data.x)
  np.testing.assert_allclose(
      wrapped.loss(theta, outer, prepared, logits=logits, apply_fn=apply_fn, key=KEY),
      lwf.loss(theta, outer[0], prepared, logits=logits, apply_fn=apply_fn, key=KEY))


def test_named_chain_builds_each_member_from_its_block():
  method = methods.get('ewc+refresh', blocks={'ewc': {'strength': 3.0},
                                              'refresh': {'unlearn_rate': 0.01}})
  state = method.init(make_params())
  assert isinstance(state[0], regularizers.EWCState)
  assert isinstance(state[1], refresh_lib.RefreshState)
  with pytest.raises(ValueError, match='ewc.strength'):
    methods.get('ewc+refresh', blocks={'ewc': {'strength': -3.0}})
  with pytest.raises(ValueError, match='methods'):
    methods.get('ewc+sam')
  with pytest.raises(ValueError, match='methods'):
    methods.get('refresh+refresh')
  # The registry's entry and defaults are refresh's own.
  assert methods.REGISTRY['refresh'] is refresh_lib.refresh
  assert methods.hyperparameters('refresh') == [
      name for name, p in inspect.signature(refresh_lib.refresh).parameters.items()
      if p.kind == p.KEYWORD_ONLY]


@pytest.mark.parametrize('hparams, match', [
    ({'unlearn_rate': -0.1}, 'refresh.unlearn_rate'),
    ({'unlearn_rate': float('nan')}, 'refresh.unlearn_rate'),
    ({'noise': -1.0}, 'refresh.noise'),
    ({'fisher_weight': float('inf')}, 'refresh.fisher_weight'),
    ({'fisher_decay': 2.0}, 'refresh.fisher_decay'),
    ({'fisher_estimator': 'kfac'}, 'refresh.fisher_estimator'),
    ({'num_samples': 0}, 'refresh.num_samples'),
    ({'normalize': 'yes'}, 'refresh.normalize'),
])
def test_bad_hyperparameters(hparams, match):
  with pytest.raises(ValueError, match=match):
    methods.get('refresh', hparams)


def test_state_shapes_do_not_change_between_tasks():
  theta, data = make_params(0), make_data()
  method = methods.get('mas+refresh',
                       blocks={'refresh': {'fisher_weight': 1.0, 'num_samples': 100}})
  state = method.init(theta)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  for seed in (3, 4):
    state = method.end_task(shifted(theta, 0.1, seed), state, data, apply_fn=apply_fn,
                            key=jax.random.fold_in(KEY, seed))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == shapes
  assert int(state[1].num_tasks) == 2
