"""GPM, OSFT and CoSO: projections, bases and sketches against numpy; protection of old tasks."""

import functools

import chex
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

INPUT = (6, 6, 1)
# One optimizer object: the jitted epoch is cached per (apply_fn, method, optimizer, mesh).
SGD = optax.sgd(0.1)
KEY = jax.random.key(0)  # A task's key for end_task (these methods draw nothing from it).


@functools.lru_cache(maxsize=None)
def _mlp(use_bias=False):
  module = models.MLP(hidden=(16, 16), num_outputs=4, use_bias=use_bias)
  return models.linen_apply_fn(module), _init(module, INPUT)


def _init(module, input_shape):
  """The module's 'params', initialised in one jitted call (faster than op-by-op)."""
  return jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, *input_shape)))['params']


def _task(n, seed):
  """A random linear 4-class task on 6x6 inputs."""
  rng = np.random.default_rng(seed)
  x = rng.random((n, *INPUT)).astype(np.float32)
  y = np.argmax(x.reshape(n, -1) @ rng.normal(size=(36, 4)), -1).astype(np.int32)
  return core.Batch(x, y, np.ones((n, 4), bool))


def _orthonormal(d, k, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))
  return q


def _padded(q, width):
  return jnp.asarray(np.pad(q, ((0, 0), (0, width - q.shape[1]))), jnp.float32)


def _projector(u):
  u = np.asarray(u, np.float64)
  return u @ u.T


def _energy_k(s, threshold):
  """GPM's Eq. 5 in numpy: fewest leading s_i^2 reaching threshold of the total."""
  ratio = np.cumsum(s ** 2) / np.sum(s ** 2)
  return int(np.searchsorted(ratio, threshold - 1e-12) + 1)


def _fit(method, apply_fn, params, state, data, *, seed, epochs=2, seen=None):
  """One task as `cljax.continual.run_stream` trains it: ``prepare_task`` (GPM projects its
  first layer's inputs), then `training.fit_task`. ``seen``: every task's data up to this one."""
  if method.prepare_task is not None:
    data = method.prepare_task(params, state, data, seen=list(seen or [data]), apply_fn=apply_fn,
                               key=KEY)
  return training.fit_task(apply_fn, method, SGD, params, state, data, epochs=epochs,
                           batch_size=16, seed=seed, mesh=sharding.make_mesh())


def _mean_loss(apply_fn, params, data):
  return float(core.cross_entropy(apply_fn(params, data.x), data.y, data.mask))


# ---------------------------------------------------------------- rank-bucketed projection


def test_bucket_widths():
  assert projection.bucket_widths(784) == (16, 32, 48, 64, 96, 128, 192, 256, 368, 512, 736, 784)
  assert projection.bucket_widths(100) == (16, 32, 48, 64, 96, 100)
  assert projection.bucket_widths(10) == (10,)


class BucketedProjectionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    for rank in (0, 1, 17, 70):
      q = _orthonormal(70, rank, seed=rank) if rank else np.zeros((70, 0))
      basis = _padded(q, 70)
      g = np.random.default_rng(1).normal(size=(70, 9)).astype(np.float32)
      off = self.variant(projection.project_off_input)(jnp.asarray(g), basis, rank)
      expected = g - _projector(q) @ g
      np.testing.assert_allclose(off, expected, atol=2e-5)
      # Zero component left in the protected subspace, and the output-side form by transposition.
      np.testing.assert_allclose(q.T @ np.asarray(off), 0.0, atol=2e-5)
      out = self.variant(projection.project_off_output)(jnp.asarray(g.T), basis, rank)
      np.testing.assert_allclose(out, expected.T, atol=2e-5)


# ------------------------------------------------------------------------ validation


def test_protected_layers_errors_name_regex_and_path():
  _, params = _mlp(use_bias=True)
  layers = projection.protected_layers(params, '.*kernel', name='gpm.layers')
  assert [(l.path, l.dim, l.out) for l in layers] == [
      ('dense0/kernel', 36, 16), ('dense1/kernel', 16, 16), ('head/kernel', 16, 4)]
  with pytest.raises(ValueError, match=r"gpm\.layers='conv.\*' matches no parameter"):
    projection.protected_layers(params, 'conv.*', name='gpm.layers')
  with pytest.raises(ValueError, match='dense0/bias'):
    projection.protected_layers(params, 'dense0/.*', name='gpm.layers')
  with pytest.raises(ValueError, match='gpm.layers'):
    projection.protected_layers(params, '(', name='gpm.layers')


@pytest.mark.parametrize('kwargs, match', [
    (dict(threshold=0.0), 'gpm.threshold'),
    (dict(threshold=1.5), 'gpm.threshold'),
    (dict(threshold=float('nan')), 'gpm.threshold'),
    (dict(threshold=(0.9, 1.2, 0.9)), 'gpm.threshold'),
    (dict(threshold=()), 'gpm.threshold'),
    (dict(threshold_increment=-0.1), 'gpm.threshold_increment'),
    (dict(num_samples=0), 'gpm.num_samples'),
    (dict(max_rank=-1), 'gpm.max_rank'),
    (dict(layers='['), 'gpm.layers'),
])
def test_gpm_rejects_bad_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    projection.gpm(**kwargs)


@pytest.mark.parametrize('ctor, kwargs, match', [
    (projection.osft, dict(rank_fraction=0.0), 'osft.rank_fraction'),
    (projection.osft, dict(max_rank_fraction=1.1), 'osft.max_rank_fraction'),
    (projection.coso, dict(proj_rank=0), 'coso.proj_rank'),
    (projection.coso, dict(sketch_rank=0), 'coso.sketch_rank'),
    (projection.coso, dict(update_gap=0), 'coso.update_gap'),
    (projection.coso, dict(threshold=1.01), 'coso.threshold'),
])
def test_osft_coso_reject_bad_hyperparameters(ctor, kwargs, match):
  with pytest.raises(ValueError, match=match):
    ctor(**kwargs)


def test_init_errors_name_layers():
  _, params = _mlp(use_bias=True)
  with pytest.raises(ValueError, match=r'gpm.threshold has 2 values but 3 layers.*dense0/kernel'):
    projection.gpm(threshold=(0.9, 0.9)).init(params)
  for ctor in (projection.gpm, projection.osft, projection.coso):
    with pytest.raises(ValueError, match='matches no parameter'):
      ctor(layers='nothing').init(params)
    with pytest.raises(ValueError, match='head/bias'):
      ctor(layers='head/.*').init(params)


# ---------------------------------------------------------------------- representations


def test_layer_representations_of_the_mlp_are_its_layer_inputs():
  apply_fn, params = _mlp()
  x = np.random.default_rng(0).random((5, *INPUT)).astype(np.float32)
  reps = projection.layer_representations(apply_fn, params, x)
  h0 = x.reshape(5, -1).astype(np.float64)
  h1 = np.maximum(h0 @ np.asarray(params['dense0']['kernel']), 0)
  h2 = np.maximum(h1 @ np.asarray(params['dense1']['kernel']), 0)
  assert sorted(reps) == ['dense0/kernel', 'dense1/kernel', 'head/kernel']
  for key, h in (('dense0/kernel', h0), ('dense1/kernel', h1), ('head/kernel', h2)):
    np.testing.assert_allclose(reps[key], h.T, rtol=1e-5, atol=1e-6)


def test_layer_representations_of_conv_layers_reproduce_their_outputs():
  module = models.CNN(channels=(3, 4), hidden=(8,), num_outputs=2, use_bias=True)
  params = _init(module, (8, 8, 2))
  x = np.random.default_rng(0).random((3, 8, 8, 2)).astype(np.float32)
  reps = projection.layer_representations(models.linen_apply_fn(module), params, x)
  # Flax's own capture of each conv's output, an independent record of the same layers.
  _, captured = module.apply({'params': params}, x, capture_intermediates=True)
  for name in ('conv0', 'conv1'):
    kernel, bias = params[name]['kernel'], params[name]['bias']
    out = captured['intermediates'][name]['__call__'][0]
    r = reps[f'{name}/kernel']
    assert r.shape == (9 * kernel.shape[2], out.size // kernel.shape[3])
    recon = np.asarray(r).T @ np.asarray(kernel).reshape(-1, kernel.shape[3]) + np.asarray(bias)
    np.testing.assert_allclose(recon, np.asarray(out).reshape(-1, kernel.shape[3]), atol=1e-5)


# ---------------------------------------------------------------------------------- gpm


def _gpm_reference(basis, r, threshold):
  """GPM's update_GPM in numpy (Eq. 5, 8, 9), with the smallest count reaching the threshold."""
  r = np.asarray(r, np.float64)
  if basis.shape[1] == 0:
    u, s, _ = np.linalg.svd(r, full_matrices=False)
    return u[:, :_energy_k(s, threshold)]
  total = np.sum(r ** 2)
  residual = r - basis @ (basis.T @ r)
  u, s, _ = np.linalg.svd(residual, full_matrices=False)
  captured = (total - np.sum(s ** 2)) / total
  k = 0
  while captured < threshold and k < len(s):
    captured += s[k] ** 2 / total
    k += 1
  return np.hstack([basis, u[:, :k]])


def test_gpm_end_task_grows_bases_like_numpy_reference():
  apply_fn, params = _mlp()
  thresholds = (0.9, 0.97, 0.99)
  method = projection.gpm(threshold=thresholds, num_samples=12, seed=3)
  state = method.init(params)
  shapes = jax.tree.map(jnp.shape, state)
  refs = [np.zeros((l.dim, 0)) for l in projection.protected_layers(params, '.*kernel', name='x')]
  for t, data in enumerate((_task(40, 0), _task(40, 1))):
    state = method.end_task(params, state, data, apply_fn=apply_fn, key=KEY)
    reps = projection.layer_representations(
        apply_fn, params, projection.sample_inputs(data, 12, seed=3, task=t))
    for i, key in enumerate(('dense0/kernel', 'dense1/kernel', 'head/kernel')):
      refs[i] = _gpm_reference(refs[i], reps[key], thresholds[i])
      k = refs[i].shape[1]
      assert int(state.ranks[i]) == k
      np.testing.assert_allclose(_projector(state.bases[i][:, :k]), _projector(refs[i]), atol=2e-4)
      np.testing.assert_array_equal(np.asarray(state.bases[i][:, k:]), 0.0)
  assert jax.tree.map(jnp.shape, state) == shapes
  assert int(state.num_tasks) == 2


def test_gpm_max_rank_caps_the_stored_bases():
  apply_fn, params = _mlp()
  method = projection.gpm(threshold=1.0, num_samples=30, max_rank=5)
  state = method.init(params)
  assert [b.shape for b in state.bases] == [(36, 5), (16, 5), (16, 5)]
  state = method.end_task(params, state, _task(40, 0), apply_fn=apply_fn, key=KEY)
  assert [int(k) for k in state.ranks] == [5, 5, 5]
  for b in state.bases:
    np.testing.assert_allclose(b.T @ b, np.eye(5), atol=1e-5)


def test_gpm_end_task_errors_name_the_layer():
  apply_fn, params = _mlp()
  data = _task(20, 0)
  wrong_dim = projection.gpm(representation_fn=lambda p, x: {
      'dense0/kernel': jnp.ones((35, 4)), 'dense1/kernel': jnp.ones((16, 4)),
      'head/kernel': jnp.ones((16, 4))})
  with pytest.raises(ValueError, match=r'dense0/kernel has shape \(35, 4\).*input dimension is 36'):
    wrong_dim.end_task(params, wrong_dim.init(params), data, apply_fn=apply_fn, key=KEY)
  missing = projection.gpm(representation_fn=lambda p, x: {'dense0/kernel': jnp.ones((36, 4))})
  with pytest.raises(ValueError, match='no representation for protected layer dense1/kernel'):
    missing.end_task(params, missing.init(params), data, apply_fn=apply_fn, key=KEY)


def test_gpm_transform_rejects_a_state_of_another_model():
  _, params = _mlp()
  state = projection.gpm().init(params)
  bad = state._replace(bases=(jnp.zeros((35, 35)),) + state.bases[1:])
  tx = projection.gpm().gradient_transform(bad)
  with pytest.raises(ValueError, match=r'input basis for dense0/kernel has shape \(35, 35\)'):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize('kwargs, frozen', [({}, True), (dict(freeze_others=True), True),
                                             (dict(freeze_others=False), False)])
def test_gpm_freeze_others_zeroes_unprotected_gradients_after_the_first_task(kwargs, frozen):
  """By default, as in GPM's reference code, unprotected parameters stop training after task 0."""
  _, params = _mlp(use_bias=True)
  method = projection.gpm(**kwargs)
  state = method.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for num_tasks, bias_value in ((0, 1.0), (1, 0.0 if frozen else 1.0)):
    tx = method.gradient_transform(state._replace(num_tasks=jnp.asarray(num_tasks, jnp.int32)))
    out, _ = tx.update(grads, tx.init(params))
    np.testing.assert_array_equal(out['dense0']['bias'], bias_value)
    np.testing.assert_array_equal(out['dense0']['kernel'], 1.0)  # Empty bases: unchanged.


def test_gpm_keeps_old_task_outputs_and_learns_the_new_task():
  apply_fn, params = _mlp()
  method = projection.gpm(threshold=1.0, num_samples=20)
  task_a, task_b = _task(256, 1), _task(256, 2)
  result = _fit(method, apply_fn, params, method.init(params), task_a, seed=0)
  params_a = result.params
  state = method.end_task(params_a, result.method_state, task_a, apply_fn=apply_fn, key=KEY)
  # 20 examples span 20 input directions; ReLU zeros cap the hidden ranks below 16 (their exact
  # count at threshold 1 depends on rounding: 14 or 13 for the head, from parameters equal to
  # 6e-8 in the two projection modes).
  ranks = [int(k) for k in state.ranks]
  assert ranks[0] == 20 and 12 <= ranks[1] <= 15 and 12 <= ranks[2] <= 15, ranks
  result_b = _fit(method, apply_fn, params_a, state, task_b, seed=1, seen=[task_a, task_b])
  # With threshold 1 the bases span every sampled example's layer inputs, so those examples'
  # outputs do not move at all while the network trains on task B.
  old = projection.sample_inputs(task_a, 20, seed=0, task=0)
  before, after = apply_fn(params_a, old), apply_fn(result_b.params, old)
  np.testing.assert_allclose(after, before, atol=1e-4 * float(jnp.abs(before).max()))
  assert _mean_loss(apply_fn, result_b.params, task_b) < 0.9 * _mean_loss(apply_fn, params_a,
                                                                          task_b)


# --------------------------------------------------------------------------------- osft


def test_osft_rank_schedule():
  ranks = [projection.osft_rank(16, t, rank_fraction=0.25, max_rank_fraction=0.6)
           for t in range(5)]
  assert ranks == [0, 4, 8, 9, 9]


def test_osft_freezes_top_singular_directions_and_learns():
  apply_fn, params = _mlp()
  method = projection.osft(rank_fraction=0.5)
  task_a, task_b = _task(256, 1), _task(256, 2)
  result = _fit(method, apply_fn, params, method.init(params), task_a, seed=0)
  params_a = result.params
  state = method.end_task(params_a, result.method_state, task_a, apply_fn=apply_fn, key=KEY)
  assert [int(k) for k in state.ranks] == [8, 8, 2]
  assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, method.init(params))
  names = ('dense0', 'dense1', 'head')
  for i, name in enumerate(names):
    w = np.asarray(params_a[name]['kernel'], np.float64)
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    k = int(state.ranks[i])
    np.testing.assert_allclose(_projector(state.input_bases[i]), _projector(u[:, :k]), atol=1e-4)
    np.testing.assert_allclose(_projector(state.output_bases[i]), _projector(vt[:k].T), atol=1e-4)
  result_b = _fit(method, apply_fn, params_a, state, task_b, seed=1, seen=[task_a, task_b])
  for i, name in enumerate(names):
    delta = np.asarray(result_b.params[name]['kernel'] - params_a[name]['kernel'])
    assert np.abs(delta).max() > 1e-2  # The layer did train ...
    # ... but not along the frozen directions: U_highᵀ ΔW = 0 and ΔW V_high = 0.
    np.testing.assert_allclose(np.asarray(state.input_bases[i]).T @ delta, 0.0, atol=1e-5)
    np.testing.assert_allclose(delta @ np.asarray(state.output_bases[i]), 0.0, atol=1e-5)
  assert _mean_loss(apply_fn, result_b.params, task_b) < 0.5 * _mean_loss(apply_fn, params_a,
                                                                          task_b)


# --------------------------------------------------------------------------------- coso


def _fd_reference(sketch, rows):
  """Frequent Directions in numpy: shrink the stacked rows' squared spectrum by the (ell+1)-th."""
  ell = sketch.shape[0]
  _, s, vt = np.linalg.svd(np.vstack([sketch, rows]), full_matrices=False)
  delta = s[ell] ** 2 if len(s) > ell else 0.0
  new = np.sqrt(np.maximum(s[:ell] ** 2 - delta, 0.0))[:, None] * vt[:ell]
  return np.pad(new, ((0, ell - new.shape[0]), (0, 0)))


def test_coso_transform_and_sketch_match_numpy():
  _, params = _mlp()
  method = projection.coso(proj_rank=3, sketch_rank=5, update_gap=2, threshold=0.9)
  state = method.init(params)
  h = _orthonormal(36, 6, seed=7)
  state = state._replace(bases=(_padded(h, 36),) + state.bases[1:],
                         ranks=state.ranks.at[0].set(6))
  tx = method.gradient_transform(state)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  state_update = jax.jit(lambda s, p, u, g: method.update(s, p, u, g, key=KEY))
  rng = np.random.default_rng(0)
  projector = None
  sketch = np.zeros((5, 36))
  for step in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    out, opt_state = update(grads, opt_state)
    g = np.asarray(grads['dense0']['kernel'], np.float64)
    g_off = g - h @ (h.T @ g)
    u, s, _ = np.linalg.svd(g_off, full_matrices=False)
    if step % 2 == 0:  # Refresh steps: a new subspace, and the sketch absorbs U_r S_r.
      projector = u[:, :3]
      sketch = _fd_reference(sketch, (u[:, :5] * s[:5]).T)
    np.testing.assert_allclose(out['dense0']['kernel'], projector @ (projector.T @ g_off),
                               atol=1e-4)
    state = state_update(state, params, params, grads)
  fd = state.sketches[0]
  np.testing.assert_allclose(fd.sketch.T @ fd.sketch, sketch.T @ sketch, atol=1e-3)
  assert int(state.step) == 3 and int(opt_state.count) == 3
  # End of task: the sketch's leading directions (0.9 of its energy) join the history.
  new_state = method.end_task(params, state, None, apply_fn=None, key=KEY)
  _, s, vt = np.linalg.svd(sketch, full_matrices=False)
  k = _energy_k(s, 0.9)
  assert int(new_state.ranks[0]) == 6 + k
  np.testing.assert_allclose(_projector(new_state.bases[0][:, :6 + k]),
                             _projector(np.hstack([h, vt[:k].T])), atol=1e-3)
  assert int(new_state.step) == 0 and not np.any(np.asarray(new_state.sketches[0].sketch))
  assert jax.tree.map(jnp.shape, new_state) == jax.tree.map(jnp.shape, method.init(params))


def test_coso_protects_the_historical_subspace_and_learns():
  apply_fn, params = _mlp()
  method = projection.coso(proj_rank=4, sketch_rank=8, update_gap=3, threshold=0.99)
  task_a, task_b = _task(256, 1), _task(256, 2)
  result = _fit(method, apply_fn, params, method.init(params), task_a, seed=0)
  params_a = result.params
  state = method.end_task(params_a, result.method_state, task_a, apply_fn=apply_fn, key=KEY)
  assert all(0 < int(k) <= 8 for k in state.ranks)
  result_b = _fit(method, apply_fn, params_a, state, task_b, seed=1, seen=[task_a, task_b])
  for i, name in enumerate(('dense0', 'dense1', 'head')):
    delta = np.asarray(result_b.params[name]['kernel'] - params_a[name]['kernel'])
    np.testing.assert_allclose(np.asarray(state.bases[i]).T @ delta, 0.0, atol=1e-5)
  assert _mean_loss(apply_fn, result_b.params, task_b) < 0.9 * _mean_loss(apply_fn, params_a,
                                                                          task_b)
