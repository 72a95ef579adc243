"""The jitted loop: learning, NaN detection, padded evaluation, batch-size checks, the update hook."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import core
from cljax import models
from cljax import sharding
from cljax import training
from cljax.methods import base
from cljax.methods import regularizers


def _blobs(n=240, seed=0):
  """Two well separated Gaussian blobs in 4-D, as (n, 2, 2, 1) images."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n).astype(np.int32)
  x = (rng.normal(size=(n, 4)) + 3.0 * (2 * y[:, None] - 1)).astype(np.float32)
  return core.Batch(x.reshape(n, 2, 2, 1), y, np.ones((n, 2), bool))


def _model():
  module = models.make_model('mlp', num_outputs=2, hidden=(8,))
  return models.linen_apply_fn(module), models.init_params(module, jax.random.key(0), (2, 2, 1))


def test_fit_task_learns_and_evaluate_counts_padded_batches():
  apply_fn, params = _model()
  mesh = sharding.make_mesh()
  data = _blobs()
  result = training.fit_task(apply_fn, regularizers.finetune(), optax.sgd(0.1), params,
                             base.EmptyState(), data, epochs=3, batch_size=16, seed=0, mesh=mesh)
  assert result.losses.shape == (3 * (240 // 16),)
  assert result.losses[-5:].mean() < result.losses[:5].mean()
  eval_fn = training.make_eval_fn(apply_fn, mesh)
  acc = training.evaluate(eval_fn, result.params, data, batch_size=100, mesh=mesh).accuracy  # 240 = 2*100 + 40
  logits = apply_fn(result.params, data.x)
  assert acc == pytest.approx(np.mean(np.argmax(logits, -1) == data.y))
  assert acc > 0.95


def test_masked_evaluation_only_considers_the_task_head():
  def apply_fn(params, x, *, train=False, rngs=None):
    return jnp.broadcast_to(jnp.array([0.0, 5.0, 1.0, 0.0]), (x.shape[0], 4))
  mesh = sharding.make_mesh()
  eval_fn = training.make_eval_fn(apply_fn, mesh)
  mask = np.tile(np.array([False, False, True, True]), (4, 1))
  data = core.Batch(np.zeros((4, 1, 1, 1), np.float32), np.array([2, 2, 3, 1], np.int32), mask)
  # argmax over outputs {2, 3} is 2 whatever output 1 says.
  assert training.evaluate(eval_fn, None, data, batch_size=2, mesh=mesh).accuracy == 0.5


def test_nan_loss_names_task_and_step():
  apply_fn, params = _model()
  data = _blobs()
  x = data.x.copy()
  x[:] = np.nan
  with pytest.raises(FloatingPointError, match=r'task 4, epoch 0, step 0'):
    training.fit_task(apply_fn, regularizers.finetune(), optax.sgd(0.1), params, base.EmptyState(),
                      core.Batch(x, data.y, data.mask), epochs=1, batch_size=16, seed=0,
                      mesh=sharding.make_mesh(), task_index=4)


@pytest.mark.parametrize('batch_size, step', [(32, 0), (16, 1)])
def test_non_finite_method_gradient_is_caught(batch_size, step):
  """A method term whose gradient is NaN (log of 0): the reported loss is the cross-entropy, so
  either the next step's loss or, after the epoch's last step, the parameters reveal it."""
  apply_fn, params = _model()
  method = regularizers.finetune()._replace(
      loss=lambda p, s, b, **_: jnp.log(0.0 * optax.tree.sum(jax.tree.map(jnp.sum, p))))
  with pytest.raises(FloatingPointError, match=rf'task 0, epoch 0, step {step}'):
    training.fit_task(apply_fn, method, optax.sgd(0.1), params, base.EmptyState(), _blobs(32),
                      epochs=1, batch_size=batch_size, seed=0, mesh=sharding.make_mesh())


class CountState(NamedTuple):
  steps: jax.Array
  grad_sum: jax.Array


def test_update_sees_task_gradients_only():
  """A method with a huge loss term: the hook must receive the cross-entropy gradient alone."""
  apply_fn, params = _model()
  def loss(p, s, b, **_):
    return 1e6 * optax.tree.sum(jax.tree.map(jnp.sum, p))
  def update(state, params, updates, task_grads, *, key):
    return CountState(state.steps + 1, state.grad_sum + optax.tree.sum(jax.tree.map(jnp.sum, task_grads)))
  method = base.Method(init=lambda p: CountState(jnp.zeros((), jnp.int32), jnp.zeros(())),
                       loss=loss, gradient_transform=base.identity_transform,
                       end_task=base.keep_state, update=update)
  data = _blobs(32)
  result = training.fit_task(apply_fn, method, optax.sgd(0.0), params, method.init(params), data,
                             epochs=1, batch_size=16, seed=0, mesh=sharding.make_mesh())
  assert int(result.method_state.steps) == 2
  # With lr 0 the params never move: the same CE gradient twice, per batch, summed by hand.
  task_loss = lambda p, b: core.cross_entropy(apply_fn(p, b.x), b.y, b.mask)
  perm = np.random.default_rng(0).permutation(32)
  expected = 0.0
  for idx in (perm[:16], perm[16:]):
    g = jax.grad(task_loss)(params, jax.tree.map(lambda a: a[idx], data))
    expected += float(optax.tree.sum(jax.tree.map(jnp.sum, g)))
  np.testing.assert_allclose(float(result.method_state.grad_sum), expected, rtol=1e-4, atol=1e-6)


def test_update_hook_updates_are_the_parameter_change():
  """The hook's ``updates`` sum over a task to the parameters' total change, and ``params`` is
  where each step started (momentum SGD, three steps)."""
  apply_fn, params = _model()
  class Track(NamedTuple):
    moved: dict
    start: dict
  def update(state, p, updates, task_grads, *, key):
    del task_grads, key
    first = jnp.all(jnp.asarray([jnp.all(s == 0) for s in jax.tree.leaves(state.start)]))
    start = jax.tree.map(lambda s, x: jnp.where(first, x, s), state.start, p)
    return Track(jax.tree.map(jnp.add, state.moved, updates), start)
  zeros = lambda p: jax.tree.map(jnp.zeros_like, p)
  method = base.Method(init=lambda p: Track(zeros(p), zeros(p)), loss=base.no_loss,
                       gradient_transform=base.identity_transform, end_task=base.keep_state,
                       update=update)
  result = training.fit_task(apply_fn, method, optax.sgd(0.1, momentum=0.9), params,
                             method.init(params), _blobs(48), epochs=1, batch_size=16, seed=0,
                             mesh=sharding.make_mesh())
  np.testing.assert_allclose(
      np.concatenate([np.ravel(a) for a in jax.tree.leaves(result.method_state.moved)]),
      np.concatenate([np.ravel(np.asarray(n) - np.asarray(o)) for n, o in
                      zip(jax.tree.leaves(result.params), jax.tree.leaves(params))]),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(
      np.concatenate([np.ravel(a) for a in jax.tree.leaves(result.method_state.start)]),
      np.concatenate([np.ravel(a) for a in jax.tree.leaves(params)]))


def _output_loss_method(c, *, with_hook):
  """A method whose term on the loop's logits pulls them toward targets recorded in ``aux``."""
  def loss(params, state, batch, *, logits, apply_fn, key):
    return c * jnp.mean(jnp.sum(jnp.square(logits - batch.aux['targets']), axis=-1))
  def update(state, params, updates, task_grads, *, key):
    return CountState(state.steps + 1, state.grad_sum + optax.tree.sum(jax.tree.map(jnp.sum, task_grads)))
  return base.Method(init=lambda p: CountState(jnp.zeros((), jnp.int32), jnp.zeros(())),
                     loss=loss, gradient_transform=base.identity_transform,
                     end_task=base.keep_state, update=update if with_hook else None)


@pytest.mark.parametrize('with_hook', [False, True])
def test_logits_term_and_aux(with_hook):
  """One full-batch SGD step: params move by the gradient of CE + the term on the loop's logits
  and the batch's aux targets, the reported loss is the cross-entropy, and the update hook sees
  the CE gradient alone."""
  apply_fn, params = _model()
  data, c, lr = _blobs(32), 0.3, 0.1
  method = _output_loss_method(c, with_hook=with_hook)
  data = data.with_aux(targets=np.tile(np.array([[2.0, -1.0]], np.float32), (data.size, 1)))
  result = training.fit_task(apply_fn, method, optax.sgd(lr), params, method.init(params), data,
                             epochs=1, batch_size=32, seed=0, mesh=sharding.make_mesh())
  targets = np.array([2.0, -1.0], np.float32)
  def ce(p):
    return core.cross_entropy(apply_fn(p, data.x), data.y, data.mask)
  def total(p):
    return ce(p) + c * jnp.mean(jnp.sum(jnp.square(apply_fn(p, data.x) - targets), axis=-1))
  expected = jax.tree.map(lambda p, g: p - lr * g, params, jax.grad(total)(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               result.params, expected)
  np.testing.assert_allclose(result.losses, [ce(params)], rtol=1e-5)
  if with_hook:
    g = jax.grad(ce)(params)
    np.testing.assert_allclose(float(result.method_state.grad_sum),
                               float(optax.tree.sum(jax.tree.map(jnp.sum, g))), rtol=1e-4, atol=1e-6)


def test_batch_size_and_optimizer_errors():
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match='batch_size=0'):
    sharding.check_batch_size(0, mesh)
  with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
    training.make_optimizer('lion', learning_rate=0.1)
  with pytest.raises(ValueError, match='learning_rate'):
    training.make_optimizer('sgd', learning_rate=0.0)
  apply_fn, params = _model()
  with pytest.raises(ValueError, match='fewer than batch_size'):
    training.fit_task(apply_fn, regularizers.finetune(), optax.sgd(0.1), params, base.EmptyState(),
                      _blobs(8), epochs=1, batch_size=16, seed=0, mesh=mesh)
