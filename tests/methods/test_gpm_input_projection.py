"""GPM's input-side projection: the custom matmul against numpy, and whole steps against the
gradient-side projection (the two modes must train identically)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import core
from cljax import models
from cljax import sharding
from cljax import training
from cljax.methods import projection

KEY = jax.random.key(0)  # The loop's key (GPM draws nothing from it).


def _orthonormal(d, k, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))
  return q


class InputProjectedDotTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_and_gradients_against_numpy(self):
    # 15 input rows: 6 outputs take the gradient-side branch, 20 the input-side one.
    for rank, out in ((0, 6), (3, 6), (8, 6), (0, 20), (3, 20), (8, 20)):
      rng = np.random.default_rng(rank)
      x = rng.normal(size=(5, 3, 8)).astype(np.float32)  # N-D inputs, as Dense accepts.
      w = rng.normal(size=(8, out)).astype(np.float32)
      c = rng.normal(size=(5, 3, out)).astype(np.float32)
      q = _orthonormal(8, rank, rank) if rank else np.zeros((8, 0))
      basis = np.pad(q, ((0, 0), (0, 8 - rank))).astype(np.float32)

      def loss(x, w):
        return jnp.sum(c * projection.input_projected_dot(x, w, jnp.asarray(basis),
                                                          jnp.int32(rank)))
      value, (dx, dw) = self.variant(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)

      x2, c2 = x.reshape(-1, 8).astype(np.float64), c.reshape(-1, out).astype(np.float64)
      np.testing.assert_allclose(value, np.sum(c2 * (x2 @ w)), rtol=1e-5)
      np.testing.assert_allclose(dx, c @ w.T, rtol=1e-5, atol=1e-5)
      expected = (np.eye(8) - q @ q.T) @ x2.T @ c2  # GPM's Eq. 10 on the plain gradient.
      np.testing.assert_allclose(dw, expected, rtol=1e-4, atol=1e-5)
      if rank == 8:  # A full basis leaves nothing to learn.
        np.testing.assert_allclose(dw, 0.0, atol=1e-5)


def _task(n, seed, shape, k=4):
  rng = np.random.default_rng(seed)
  x = rng.random((n, *shape)).astype(np.float32)
  y = np.argmax(x.reshape(n, -1) @ rng.normal(size=(int(np.prod(shape)), k)), -1).astype(np.int32)
  return core.Batch(x, y, np.ones((n, k), bool))


def _train_both_modes(module, shape):
  """One task consolidated, then one epoch of the second with each mode, from the same state."""
  apply_fn = models.linen_apply_fn(module)
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, *shape)))['params']
  optimizer = optax.sgd(0.05, momentum=0.9)
  mesh = sharding.make_mesh()
  out = {}
  for mode in ('backward', 'gradients'):
    # Biases train too (freeze_others=False), so both modes are compared on every parameter.
    method = projection.gpm(threshold=0.9, num_samples=32, projection=mode, freeze_others=False)
    assert (method.intercept is not None) == (mode == 'backward')
    task0, task1 = _task(64, 0, shape), _task(96, 1, shape)
    state = method.end_task(params, method.init(params), task0, apply_fn=apply_fn, key=KEY)
    assert min(int(r) for r in state.ranks) > 0
    data = task1  # As `cljax.continual.run_stream` does: prepare_task, then fit_task.
    if method.prepare_task is not None:
      data = method.prepare_task(params, state, data, seen=[task0, task1], apply_fn=apply_fn,
                                 key=KEY)
    result = training.fit_task(apply_fn, method, optimizer, params, state, data,
                               epochs=1, batch_size=16, seed=0, mesh=mesh)
    out[mode] = result
  return params, out


def test_mlp_steps_match_the_gradient_projection():
  """In 'backward' mode dense0 trains from inputs projected once by prepare_task, dense1 from
  inputs projected in the step (16 rows <= 16 outputs), the head's gradient in the step."""
  module = models.MLP(hidden=(16, 16), num_outputs=4, use_bias=True)
  params, out = _train_both_modes(module, (6, 6, 1))
  chex.assert_trees_all_close(out['backward'].params, out['gradients'].params, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(out['backward'].losses, out['gradients'].losses, rtol=1e-5)
  # And training did move the parameters (the comparison is not between two no-ops).
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), out['backward'].params, params)
  assert min(jax.tree.leaves(moved)) > 1e-3


def test_cnn_dense_layers_in_the_backward_pass_convs_on_the_gradient():
  module = models.CNN(channels=(3, 4), hidden=(8,), num_outputs=4, use_bias=True)
  _, out = _train_both_modes(module, (8, 8, 2))
  chex.assert_trees_all_close(out['backward'].params, out['gradients'].params, atol=2e-6, rtol=1e-5)


def test_prepare_task_projects_the_model_inputs_of_the_first_layer_only():
  module = models.MLP(hidden=(16, 16), num_outputs=4, use_bias=True)
  apply_fn = models.linen_apply_fn(module)
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))['params']
  method = projection.gpm(threshold=0.9, num_samples=32)
  task0 = _task(64, 0, (6, 6, 1))
  state = method.end_task(params, method.init(params), task0, apply_fn=apply_fn, key=KEY)
  data = _task(40, 1, (6, 6, 1))
  prepared = method.prepare_task(params, state, data, seen=[task0, data], apply_fn=apply_fn,
                                 key=KEY)
  projected = prepared.aux[projection.PROJECTED_INPUTS]
  assert set(projected) == {'dense0/kernel'}  # dense1 reads hidden units.
  k = int(state.ranks[0])
  q = np.asarray(state.bases[0], np.float64)[:, :k]
  x = data.x.reshape(40, -1).astype(np.float64)
  np.testing.assert_allclose(projected['dense0/kernel'], x - x @ q @ q.T,
                             atol=1e-5)
  np.testing.assert_array_equal(prepared.x, data.x)
  # A CNN's first protected layer is a conv, and its Dense layer reads conv features: nothing
  # to precompute.
  cnn = models.CNN(channels=(3, 4), hidden=(8,), num_outputs=4, use_bias=True)
  cnn_apply = models.linen_apply_fn(cnn)
  cnn_params = jax.jit(cnn.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))['params']
  cnn_data = _task(8, 0, (8, 8, 2))
  prepared = method.prepare_task(cnn_params, method.init(cnn_params), cnn_data, seen=[cnn_data],
                                 apply_fn=cnn_apply, key=KEY)
  assert projection.PROJECTED_INPUTS not in prepared.aux


def test_a_kernel_not_used_by_a_dense_layer_is_named():
  def apply_fn(params, x, *, train=False, rngs=None):
    del train, rngs
    return jnp.reshape(x, (x.shape[0], -1)) @ params['linear']['kernel']
  params = {'linear': {'kernel': jnp.zeros((36, 4))}}
  data = _task(32, 0, (6, 6, 1))
  rep = lambda p, x: {'linear/kernel': jnp.asarray(np.reshape(x, (len(x), -1)).T)}
  kwargs = dict(batch_size=16, epochs=1, seed=0, mesh=sharding.make_mesh())
  method = projection.gpm(representation_fn=rep, projection='backward')
  with pytest.raises(ValueError, match=r"\['linear/kernel'\] were not called as a plain "
                                       r"nn.Dense.*gpm.projection='gradients'"):
    training.fit_task(apply_fn, method, optax.sgd(0.1), params, method.init(params), data, **kwargs)
  method = projection.gpm(representation_fn=rep)  # Defaults to 'gradients' for such models.
  assert method.intercept is None
  training.fit_task(apply_fn, method, optax.sgd(0.1), params, method.init(params), data, **kwargs)


def test_unknown_projection_is_named():
  with pytest.raises(ValueError, match='gpm.projection'):
    projection.gpm(projection='outputs')


@pytest.mark.parametrize('rows', [4, 40])  # Input-side branch, gradient-side branch (out = 16).
def test_a_bf16_layer_with_float32_kernel_gets_an_exactly_projected_gradient(rows):
  d, out, k = 32, 16, 12
  rng = np.random.default_rng(0)
  q = _orthonormal(d, k, 0)
  basis = jnp.asarray(np.pad(q, ((0, 0), (0, d - k))), jnp.float32)
  x = jnp.asarray(rng.normal(size=(rows, d)), jnp.bfloat16)  # The layer computes in bf16.
  w = jnp.asarray(rng.normal(size=(d, out)), jnp.float32)  # Its parameter is float32.
  c = jnp.asarray(rng.normal(size=(rows, out)), jnp.float32)
  g = jax.grad(lambda w: jnp.sum(c * projection.input_projected_dot(x, w, basis, jnp.int32(k))))(w)
  assert g.dtype == jnp.float32
  g = np.asarray(g, np.float64)
  assert np.linalg.norm(q.T @ g) < 1e-6 * np.linalg.norm(g)  # Rounded after projecting: ~1e-3.


class _Inner(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='Dense_0')(nn.relu(x))


class _SuffixModel(nn.Module):
  """An unprotected top-level Dense_0 whose path is a suffix of the protected MLP_0/Dense_0."""

  @nn.compact
  def __call__(self, x, *, train=False):
    return nn.Dense(3, name='Dense_0')(x) + _Inner(name='MLP_0')(x)


class _ClipModel(nn.Module):
  """The first Dense reads min(x, 0.9): the model input on some rows only."""

  @nn.compact
  def __call__(self, x, *, train=False):
    return nn.Dense(3, name='head')(nn.relu(nn.Dense(6, name='dense0')(jnp.minimum(x, 0.9))))


def _flat_task(n, seed, d=8, k=3):
  rng = np.random.default_rng(seed)
  return core.Batch(rng.random((n, d)).astype(np.float32), rng.integers(0, k, n).astype(np.int32),
                    np.ones((n, k), bool))


def _step_updates(module, method, params, state, batch):
  """What the training step feeds the optimizer: the loop's gradients, then the transform."""
  apply_fn = models.linen_apply_fn(module)
  if method.prepare_task is not None:
    batch = method.prepare_task(params, state, batch, seen=[batch], apply_fn=apply_fn, key=KEY)
  _, _, grads, _ = training._step_grads(apply_fn, method)(params, state, batch, KEY)
  tx = method.gradient_transform(state)
  return tx.update(grads, tx.init(params), params)[0]


@pytest.mark.parametrize('module, layers, scale_rows', [
    (_SuffixModel(), 'MLP_0/.*kernel', False),
    # prepare_task sees the first two rows below the clip (the layer reads the model input
    # there) and precomputes; the step's run-time check must catch the other rows.
    (_ClipModel(), '.*kernel', True),
])
def test_backward_mode_matches_gradients_mode_on_tricky_models(module, layers, scale_rows):
  params = module.init(jax.random.key(0), jnp.zeros((1, 8)))['params']
  apply_fn = models.linen_apply_fn(module)
  batch = _flat_task(16, 1)
  if scale_rows:
    x = batch.x.copy()
    x[:2] *= 0.5
    batch = batch._replace(x=x)
  out = {}
  for mode in ('backward', 'gradients'):
    method = projection.gpm(layers=layers, threshold=0.9, num_samples=32, projection=mode)
    state = method.end_task(params, method.init(params), _flat_task(32, 0), apply_fn=apply_fn,
                            key=KEY)
    assert min(int(r) for r in state.ranks) > 0
    if scale_rows and mode == 'backward':
      prepared = method.prepare_task(params, state, batch, seen=[batch], apply_fn=apply_fn,
                                     key=KEY)
      assert projection.PROJECTED_INPUTS in prepared.aux
    out[mode] = _step_updates(module, method, params, state, batch)
  chex.assert_trees_all_close(out['backward'], out['gradients'], rtol=1e-4, atol=1e-6)
