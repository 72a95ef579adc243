"""The Method contract, checked for every registered method (optax's per-registry-entry test).

For each entry of `cljax.methods.REGISTRY`, on a 2-task permuted-digits stream, with an MLP and a
CNN: `run_stream` trains both tasks; the state's structure, shapes and dtypes never change; a
stage checkpoint of the state round-trips bitwise; and the method's jitted pieces (loss gradient,
update hook, intercept) equal their eager evaluation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import checkpoint
from cljax import continual
from cljax import core
from cljax import methods
from cljax import models
from cljax.data import sources
from cljax.data import streams

# Small but real settings: every estimator and buffer is exercised, in seconds.
HPARAMS = {
    'ewc': {'num_samples': 32, 'fisher_batch_size': 16},
    'online_ewc': {'num_samples': 32, 'fisher_batch_size': 16, 'gamma': 0.9},
    'mas': {'num_samples': 32, 'batch_size': 16},
    'replay': {'buffer_size': 40, 'replay_batch_size': 8},
    'refresh': {'unlearn_rate': 1e-3, 'noise': 1e-3, 'num_samples': 32, 'fisher_weight': 1.0},
    'gpm': {'num_samples': 32},
    'coso': {'update_gap': 2},
    'l2': {'strength': 0.1},
}
MODELS = {'mlp': {'hidden': (16,)}, 'cnn': {'channels': (4,), 'hidden': (16,)}}


@functools.lru_cache(maxsize=None)
def _stream():
  data = sources.subsample(sources.digits(), max_train=120, max_test=60, seed=0)
  return streams.make_stream('permuted', data, num_tasks=2, seed=0)


def _setup(name, model):
  stream = _stream()
  module = models.make_model(model, num_outputs=stream.num_outputs, **MODELS[model])
  apply_fn = models.linen_apply_fn(module)
  params = models.init_params(module, jax.random.key(0), stream.input_shape)
  method = methods.get(name, HPARAMS.get(name, {}), input_shape=stream.input_shape)
  return stream, apply_fn, params, method


def _signature(tree):
  return jax.tree.structure(tree), [(np.shape(x), np.asarray(x).dtype) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize('model', sorted(MODELS))
@pytest.mark.parametrize('name', sorted(methods.REGISTRY))
def test_two_tasks_fixed_state_and_checkpoint(name, model, tmp_path):
  stream, apply_fn, params, method = _setup(name, model)
  signature = _signature(method.init(params))
  states = []
  result = continual.run_stream(
      apply_fn, params, method, optax.sgd(0.05, momentum=0.9), stream, epochs=1, batch_size=20,
      eval_batch_size=60, seed=0,
      on_task_end=lambda t, state, row: states.append(state))
  assert len(states) == 2
  for state in states:
    assert _signature(state.method_state) == signature, f'{name}: state changed shape'
  r = result.accuracy_matrix
  assert r.shape == (2, 2) and np.all((r >= 0) & (r <= 1)) and np.all(np.isfinite(r))
  assert np.all(np.isfinite(result.nll_matrix))
  # The stage checkpoint restores into init's structure, bitwise.
  template = continual.initial_state(params, method, optax.sgd(0.05, momentum=0.9), seed=0)
  with checkpoint.StageCheckpointer(str(tmp_path / 'ckpt')) as ckpt:
    ckpt.save(2, result.state._asdict(), {'accuracy_rows': r.tolist()})
  with checkpoint.StageCheckpointer(str(tmp_path / 'ckpt')) as ckpt:
    restored = ckpt.restore(2, template._asdict()).state
  for a, b in zip(jax.tree.leaves(result.state._asdict()), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('name', sorted(methods.REGISTRY))
def test_jit_and_eager_agree(name):
  """After one task (non-trivial state), the step's pieces agree jitted and eager."""
  stream, apply_fn, params, method = _setup(name, 'mlp')
  key = jax.random.key(3)
  state = method.init(params)
  data = stream.tasks[0].train
  if method.prepare_task is not None:
    data = method.prepare_task(params, state, data, seen=[data], apply_fn=apply_fn, key=key)
  state = method.end_task(params, state, stream.tasks[0].train, apply_fn=apply_fn, key=key)
  batch = jax.tree.map(lambda a: jnp.asarray(a[:16]), data)

  def pieces(p, s, b, k):
    step_params, forward = p, apply_fn
    if method.intercept is not None:
      step_params, forward = method.intercept(p, s, b, apply_fn=apply_fn, key=k)

    def total(q):
      logits = forward(q, b.x, train=True)
      return core.batch_loss(logits, b) + method.loss(q, s, b, logits=logits, apply_fn=forward,
                                                      key=k)
    grads = jax.grad(total)(step_params)
    updates, _ = optax.chain(method.gradient_transform(s), optax.sgd(0.1)).update(
        grads, optax.chain(method.gradient_transform(s), optax.sgd(0.1)).init(step_params),
        step_params)
    new_state = s if method.update is None else method.update(s, step_params, updates, grads,
                                                              key=k)
    return step_params, updates, new_state

  jitted = jax.jit(pieces)(params, state, batch, key)
  with jax.disable_jit():
    eager = pieces(params, state, batch, key)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
