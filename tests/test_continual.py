"""run_stream: the per-task order of hooks, resume, chains, per-step keys and dropout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import continual
from cljax import core
from cljax import methods
from cljax import models
from cljax.data import streams
from cljax.methods import base
from cljax.methods import regularizers


def _stream(num_tasks=3, n=64, seed=0):
  """Linearly separable 4-D blobs, permuted per task (domain-incremental, 2 classes)."""
  rng = np.random.default_rng(seed)
  tasks = []
  for t in range(num_tasks):
    perm = rng.permutation(4)
    def make(m):
      y = rng.integers(0, 2, m).astype(np.int32)
      x = (rng.normal(size=(m, 4)) + 2.0 * (2 * y[:, None] - 1)).astype(np.float32)[:, perm]
      return core.Batch(x, y)
    tasks.append(streams.Task(f't{t}', make(n), make(32)))
  return tasks


def _mlp(**kw):
  module = models.make_model('mlp', num_outputs=2, hidden=(8,), **kw)
  return models.linen_apply_fn(module), models.init_params(module, jax.random.key(0), (4,))


def test_hooks_run_in_order_on_the_right_data():
  calls = []

  def prepare_task(params, state, data, *, seen, apply_fn, key):
    calls.append(('prepare', len(seen), data.size))
    return core.concatenate(seen)

  def end_task(params, state, data, *, apply_fn, key):
    calls.append(('end', int(state), data.size))
    return state + 1

  method = base.Method(init=lambda p: jnp.zeros((), jnp.int32), loss=base.no_loss,
                       gradient_transform=base.identity_transform, end_task=end_task,
                       prepare_task=prepare_task)
  apply_fn, params = _mlp()
  ends = []
  tasks = _stream()
  result = continual.run_stream(
      apply_fn, params, method, optax.sgd(0.1), tasks, epochs=2, batch_size=16,
      on_task_start=lambda t, steps: calls.append(('start', t, steps)),
      on_task_end=lambda done, state, row: ends.append((done, int(state.method_state), row)))
  # prepare sees all tasks so far; training steps count the prepared (joint) data; end_task
  # consolidates on the task's own data.
  assert calls == [('prepare', 1, 64), ('start', 0, 2 * 4), ('end', 0, 64),
                   ('prepare', 2, 64), ('start', 1, 2 * 8), ('end', 1, 64),
                   ('prepare', 3, 64), ('start', 2, 2 * 12), ('end', 2, 64)]
  assert [(d, s) for d, s, _ in ends] == [(1, 1), (2, 2), (3, 3)]
  np.testing.assert_array_equal(result.accuracy_matrix, np.stack([r.accuracy for *_, r in ends]))
  assert [len(l) for l in result.losses] == [8, 16, 24]


def test_resume_after_a_task_is_bitwise_identical():
  apply_fn, params = _mlp()
  tasks = _stream()
  method = regularizers.ewc(strength=1.0, num_samples=16)
  opt = optax.sgd(0.1, momentum=0.9)
  kept = {}
  full = continual.run_stream(apply_fn, params, method, opt, tasks, epochs=1, batch_size=16,
                              seed=4, on_task_end=lambda d, s, r: kept.setdefault(d, (s, r)))
  state, row = kept[1]
  resumed = continual.run_stream(apply_fn, None, method, opt, tasks, epochs=1, batch_size=16,
                                 start=1, state=state, rows=[row])
  np.testing.assert_array_equal(full.accuracy_matrix, resumed.accuracy_matrix)
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match='start=2 with 1 rows'):
    continual.run_stream(apply_fn, params, method, opt, tasks, epochs=1, batch_size=16, start=2,
                         rows=[row])


def test_chain_adds_terms_and_runs_hooks_per_member():
  apply_fn, params = _mlp()
  tasks = _stream(2)
  l2 = regularizers.l2(strength=0.7)
  si = regularizers.si(strength=0.3)
  chained = methods.chain(l2, si)
  assert chained.update is not None and chained.prepare_task is None
  state = chained.init(params)
  key = jax.random.key(0)
  state = chained.end_task(params, state, tasks[0].train, apply_fn=apply_fn, key=key)
  moved = jax.tree.map(lambda p: p + 0.1, params)
  kw = dict(logits=None, apply_fn=apply_fn, key=key)
  got = chained.loss(moved, state, tasks[1].train, **kw)
  want = l2.loss(moved, state[0], tasks[1].train, **kw) + si.loss(moved, state[1],
                                                                  tasks[1].train, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # SI's update hook runs on SI's state alone; l2's state passes through.
  g = jax.tree.map(jnp.ones_like, params)
  new = chained.update(state, params, g, g, key=key)
  assert new[0] is state[0]
  np.testing.assert_allclose(jax.tree.leaves(new[1].omega)[0],
                             jax.tree.leaves(state[1].omega)[0] - 1.0)
  with pytest.raises(ValueError, match='not a cljax Method'):
    methods.chain(l2, optax.sgd(0.1))


def test_chain_prepare_order_joint_then_lwf():
  """chain(joint, lwf): the teacher's outputs are recorded on the union of the seen data."""
  apply_fn, params = _mlp()
  tasks = _stream(2)
  method = methods.get('joint+lwf', blocks={'lwf': {'strength': 1.0}})
  state = method.init(params)
  prepared = method.prepare_task(params, state, tasks[1].train,
                                 seen=[t.train for t in tasks], apply_fn=apply_fn,
                                 key=jax.random.key(0))
  assert prepared.size == 128
  np.testing.assert_allclose(prepared.aux[regularizers.TEACHER_LOGITS],
                             apply_fn(params, prepared.x), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="unknown method 'sam' in 'ewc\\+sam'"):
    methods.get('ewc+sam')


class _DropoutMLP(nn.Module):
  @nn.compact
  def __call__(self, x, *, train=False):
    x = nn.relu(nn.Dense(16, name='dense0')(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(2, name='head')(x)


def test_dropout_trains_with_per_step_keys():
  module = _DropoutMLP()
  apply_fn = models.linen_apply_fn(module)
  params = module.init(jax.random.key(0), jnp.zeros((1, 4)))['params']
  tasks = _stream(2)
  run = lambda seed: continual.run_stream(apply_fn, params, regularizers.finetune(),
                                          optax.sgd(0.1), tasks, epochs=3, batch_size=16,
                                          seed=seed)
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a.losses[0], b.losses[0])  # Keys are reproducible...
  assert not np.array_equal(a.losses[0], c.losses[0])  # ...and depend on the seed.
  assert a.accuracy_matrix[-1].mean() > 0.8


def test_every_step_gets_its_own_key():
  seen = []

  def loss(params, state, batch, *, logits, apply_fn, key):
    jax.debug.callback(lambda k: seen.append(tuple(np.asarray(k))), jax.random.key_data(key))
    return jnp.zeros(())

  method = regularizers.finetune()._replace(loss=loss)
  apply_fn, params = _mlp()
  continual.run_stream(apply_fn, params, method, optax.sgd(0.1), _stream(2), epochs=2,
                       batch_size=16)
  assert len(seen) == 2 * 2 * 4 and len(set(seen)) == len(seen)
