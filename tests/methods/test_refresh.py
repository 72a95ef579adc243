"""refresh: the unlearn step, the relearn gradient and the loop's update against hand computations."""

from __future__ import annotations

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import methods
from cljax import training
from cljax.methods import base
from cljax.methods import refresh as refresh_lib
from cljax.methods import regularizers
from cljax.methods import replay as replay_lib

# The two-layer net and its numpy reference are shared with the regularizer tests.
from test_regularizers import (apply_fn, assert_tree_close, make_data, make_params,
                               np_ce_grad, np_forward, np_params, shifted)


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
      ce = base.cross_entropy(apply_fn(params, batch.x, train=True), batch.y, batch.mask)
      return ce + method.loss(params, state, batch, apply_fn)
    return total

  @chex.variants(with_jit=True, without_jit=True)
  def test_unlearn_point_and_relearn_gradient(self):
    theta, anchor = make_params(0), make_params(1)
    data = make_data(mask=[True, True, False], labels=[0, 1, 1, 0, 0, 1])
    inner = regularizers.l2(strength=0.8)
    method = refresh_lib.refresh(inner, unlearn_rate=0.05, noise=0.0, fisher_weight=0.0)
    state = method.init(theta)
    state = state._replace(inner=inner.end_task(anchor, state.inner, None, apply_fn))
    unlearned = self.variant(lambda p, s, b: method.before_step(p, s, b, apply_fn))(
        theta, state, data)
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
    inner = regularizers.l2(strength=0.8)
    method = refresh_lib.refresh(inner, unlearn_rate=0.05, noise=0.0, fisher_weight=0.0)
    state = method.init(theta)
    state = state._replace(inner=inner.end_task(anchor, state.inner, None, apply_fn))
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
    inner = regularizers.l2(strength=0.8)
    state = inner.end_task(make_params(1), inner.init(theta), None, apply_fn)
    method = refresh_lib.refresh(inner, unlearn_rate=0.0, noise=0.0)
    assert method.before_step is None
    outer = method.init(theta)._replace(inner=state)
    got = jax.grad(self._loop_objective(method))(theta, outer, data)
    want = jax.grad(self._loop_objective(inner))(theta, state, data)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)

  def test_fisher_preconditions_the_step(self):
    theta, data = make_params(0), make_data()
    method = refresh_lib.refresh(regularizers.finetune(), unlearn_rate=0.05, noise=0.0,
                                 fisher_weight=10.0, num_samples=100)
    state = method.end_task(theta, method.init(theta), data, apply_fn)
    # Same estimator, subset and seed as ewc's: the same Fisher.
    ewc = regularizers.ewc(fisher_estimator='empirical', num_samples=100)
    chex.assert_trees_all_close(state.fisher, ewc.end_task(theta, ewc.init(theta), data, apply_fn).fisher)
    got = jax.jit(lambda p, s, b: method.before_step(p, s, b, apply_fn))(theta, state, data)
    t, f = np_params(theta), np_params(state.fisher)
    delta = np_displacement(t, np_ce_grad(t, data), f, jax.tree.map(np.zeros_like, t), rate=0.05,
                            sigma=0.0, c=10.0, normalize=True)
    assert_tree_close(got, jax.tree.map(np.add, t, delta), rtol=1e-5, atol=1e-7)

  def test_noise_changes_every_step(self):
    theta, data = make_params(0), make_data()
    method = refresh_lib.refresh(regularizers.finetune(), unlearn_rate=0.05, noise=1.0)
    state = method.init(theta)
    unlearn = jax.jit(lambda p, s, b: method.before_step(p, s, b, apply_fn))
    p0 = unlearn(theta, state, data)
    chex.assert_trees_all_close(unlearn(theta, state, data), p0)  # Deterministic given the key.
    state = method.after_step(state, theta, theta, theta)
    p1 = unlearn(theta, state, data)
    assert not np.allclose(np.asarray(p0['dense0']['kernel']), np.asarray(p1['dense0']['kernel']))


def test_wraps_the_inner_methods_hooks():
  theta, data = make_params(0), make_data()
  si = regularizers.si(strength=1.0)
  method = refresh_lib.refresh(si, noise=0.0)
  assert method.after_step is not None
  new = shifted(theta, 0.1, 3)
  updates = jax.tree.map(jnp.subtract, new, theta)
  grads = shifted(jax.tree.map(jnp.zeros_like, theta), 1.0, 4)
  state = method.after_step(method.init(theta), theta, updates, grads)
  chex.assert_trees_all_close(state.inner.omega,
                              regularizers.si_path_step(si.init(theta).omega, updates, grads))
  state = method.end_task(new, state, data, apply_fn)
  assert int(state.num_tasks) == 1
  chex.assert_trees_all_close(state.inner.anchor, new)
  # Training data and the gradient transform come from the inner method.
  joint = refresh_lib.refresh(replay_lib.joint())
  assert joint.training_data([data, data]).size == 2 * data.size
  assert refresh_lib.refresh(regularizers.finetune()).training_data is None
  assert refresh_lib.refresh(regularizers.finetune(), noise=0.0).after_step is None
  # LwF's recorded responses and distillation term pass through to the loop.
  lwf = regularizers.lwf(strength=2.0)
  wrapped = refresh_lib.refresh(lwf, noise=0.0)
  outer = wrapped.init(theta)
  prepared = wrapped.prepare_data(theta, outer, data, apply_fn)
  np.testing.assert_allclose(prepared.teacher_logits,
                             lwf.prepare_data(theta, outer.inner, data, apply_fn).teacher_logits)
  logits = apply_fn(theta, data.x)
  np.testing.assert_allclose(wrapped.output_loss(logits, outer, prepared, apply_fn),
                             lwf.output_loss(logits, outer.inner, prepared, apply_fn))


def test_named_constructor_builds_the_base_method_from_the_registry():
  method = methods.get('refresh', {'base_method': 'ewc', 'base_hparams': {'strength': 3.0},
                                   'unlearn_rate': 0.01})
  state = method.init(make_params())
  assert isinstance(state.inner, regularizers.EWCState)
  with pytest.raises(ValueError, match='ewc.strength'):
    methods.get('refresh', {'base_method': 'ewc', 'base_hparams': {'strength': -3.0}})
  with pytest.raises(ValueError, match='refresh.base_method'):
    methods.get('refresh', {'base_method': 'sam'})
  with pytest.raises(ValueError, match='refresh.base_method'):
    methods.get('refresh', {'base_method': 'refresh'})
  # The registry's defaults are refresh's own.
  named = inspect.signature(methods.refresh_named).parameters
  for name, p in inspect.signature(refresh_lib.refresh).parameters.items():
    if p.kind == p.KEYWORD_ONLY:
      assert named[name].default == p.default, name


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
  method = methods.get('refresh', {'base_method': 'mas', 'fisher_weight': 1.0, 'num_samples': 100})
  state = method.init(theta)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  for seed in (3, 4):
    state = method.end_task(shifted(theta, 0.1, seed), state, data, apply_fn)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == shapes
  assert int(state.num_tasks) == 2
