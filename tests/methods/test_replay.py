"""replay: Algorithm R against a sequential reference, the bounded buffer, its loss, and resume."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import checkpoint
from cljax import core
from cljax.runners import continual as experiment
from cljax import methods
from cljax import training
from cljax.methods import replay as replay_lib

K = 3
SHAPE = (2, 2, 1)
KEY = jax.random.key(0)  # A task's key, as `cljax.continual.run_stream` hands it to the hooks.


def apply_fn(params, x, *, train=False, rngs=None):
  del train, rngs
  return jnp.tanh(x.reshape(x.shape[0], -1) @ params['dense0']['kernel']) @ params['head']['kernel']


def make_params():
  rng = np.random.default_rng(0)
  return {'dense0': {'kernel': jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)},
          'head': {'kernel': jnp.asarray(rng.normal(size=(5, K)), jnp.float32)}}


def make_task(start, n, *, mask=(True, True, True)):
  """n examples whose inputs encode their stream index (start + i), for tracing them."""
  ids = np.arange(start, start + n)
  x = np.broadcast_to(ids[:, None, None, None], (n, *SHAPE)).astype(np.float32)
  return core.Batch(x, (ids % K).astype(np.int32), np.broadcast_to(np.asarray(mask), (n, K)).copy())


def sequential_reservoir(buffer_size, draws_per_task, sizes):
  """Algorithm R one example at a time (Vitter 1985); returns the stream index in each slot."""
  buffer, seen = [], 0
  for draws, n in zip(draws_per_task, sizes):
    for i in range(n):
      if seen < buffer_size:
        buffer.append(seen)
      elif draws[i] < buffer_size:
        buffer[draws[i]] = seen
      seen += 1
  return buffer


# ------------------------------------------------------------------------------ reservoir


def test_reservoir_slots_match_one_at_a_time_insertion():
  rng = np.random.default_rng(0)
  buffer_size, sizes = 7, [4, 9, 30, 2]
  draws_per_task, seen = [], 0
  for n in sizes:  # Draws as Algorithm R defines them: j_i uniform on [0, seen + i].
    draws_per_task.append(np.array([rng.integers(0, seen + i + 1) for i in range(n)]))
    seen += n
  expected = sequential_reservoir(buffer_size, draws_per_task, sizes)
  slots, seen = np.full(buffer_size, -1), 0
  for draws, n in zip(draws_per_task, sizes):
    source = replay_lib.reservoir_slots(seen, draws, buffer_size)
    slots = np.where(source >= 0, seen + source, slots)
    seen += n
  np.testing.assert_array_equal(slots, expected)


def test_reservoir_slots_last_writer_wins_and_zero_buffer():
  # Slots 1 and 2 are each hit twice by this batch: the later example stays.
  np.testing.assert_array_equal(
      replay_lib.reservoir_slots(3, np.array([1, 2, 1, 9, 2]), 3), [-1, 2, 4])
  assert replay_lib.reservoir_slots(10, np.array([0, 1]), 0).shape == (0,)


def test_reservoir_draws_are_in_range_and_uniform():
  """Over many keys, every example of a 3-task stream is kept with probability M / N."""
  buffer_size, sizes, trials = 5, [8, 6, 6], 3000
  n_total = sum(sizes)
  keys = jax.random.split(jax.random.key(0), trials * len(sizes)).reshape(trials, len(sizes))
  counts = np.zeros(n_total)
  seen_before = np.cumsum([0] + sizes[:-1])
  draws = [np.asarray(jax.vmap(lambda k, s=s, n=n: replay_lib.reservoir_draws(k, s, n))(keys[:, t]))
           for t, (s, n) in enumerate(zip(seen_before, sizes))]
  for t, (s, n) in enumerate(zip(seen_before, sizes)):
    stop = s + np.arange(n) + 1
    assert np.all((draws[t] >= 0) & (draws[t] < stop))
  for trial in range(trials):
    slots = np.full(buffer_size, -1)
    for t, s in enumerate(seen_before):
      source = replay_lib.reservoir_slots(int(s), draws[t][trial], buffer_size)
      slots = np.where(source >= 0, s + source, slots)
    counts[slots] += 1
  p = buffer_size / n_total
  sigma = np.sqrt(trials * p * (1 - p))
  assert np.all(np.abs(counts - trials * p) < 5 * sigma), counts / trials


# ------------------------------------------------------------------------- method: buffer


def test_buffer_is_bounded_and_holds_seen_examples():
  method = replay_lib.replay(buffer_size=10, input_shape=SHAPE, replay_batch_size=4)
  params = make_params()
  state = method.init(params)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  assert state.x.shape == (10, *SHAPE) and state.mask.shape == (10, K)
  start = 0
  for t, n in enumerate([6, 25, 40]):
    state = method.end_task(params, state, make_task(start, n), apply_fn=apply_fn,
                            key=jax.random.fold_in(KEY, t))
    start += n
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == shapes  # Never grows.
    assert int(state.seen) == start
    filled = min(start, 10)
    ids = np.asarray(state.x)[:filled, 0, 0, 0].astype(int)
    assert len(set(ids)) == filled and np.all((ids >= 0) & (ids < start))  # Distinct, seen.
    np.testing.assert_array_equal(np.asarray(state.y)[:filled], ids % K)  # Rows stay together.
  assert np.all(np.asarray(state.x)[:, 0, 0, 0] >= 0)


def test_buffer_first_task_fills_in_order():
  method = replay_lib.replay(buffer_size=4, input_shape=SHAPE)
  state = method.end_task(make_params(), method.init(make_params()), make_task(0, 3),
                          apply_fn=apply_fn, key=KEY)
  np.testing.assert_array_equal(np.asarray(state.x)[:3, 0, 0, 0], [0, 1, 2])
  assert int(state.seen) == 3


def test_end_task_rejects_mismatched_data():
  method = replay_lib.replay(buffer_size=4, input_shape=(3, 3, 1))
  with pytest.raises(ValueError, match='replay.input_shape'):
    method.end_task(make_params(), method.init(make_params()), make_task(0, 3), apply_fn=apply_fn,
                    key=KEY)


# --------------------------------------------------------------------------- method: loss


class ReplayLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_loss_is_cross_entropy_of_the_replay_minibatch(self):
    method = replay_lib.replay(buffer_size=8, input_shape=SHAPE, replay_batch_size=5, strength=0.7)
    params = make_params()
    state = method.init(params)
    step_key = jax.random.key(7)  # The loop's key for this step.
    loss = self.variant(lambda p, s, k: method.loss(p, s, None, logits=None, apply_fn=apply_fn,
                                                    key=k))
    np.testing.assert_allclose(loss(params, state, step_key), 0.0)  # Empty buffer: no term.
    task = make_task(0, 6, mask=(True, False, True))
    task = task._replace(y=np.where(task.y == 1, 2, task.y).astype(np.int32))
    state = method.end_task(params, state, task, apply_fn=apply_fn, key=KEY)
    # The step's replay minibatch is drawn with fold_in(step key, seed) (seed 0 here).
    memory = replay_lib.replay_batch(state, jax.random.fold_in(step_key, 0), 5)
    # The sampled rows are stored examples (slots 0..5), each with its label and mask.
    ids = np.asarray(memory.x)[:, 0, 0, 0].astype(int)
    assert np.all(ids < 6)
    # Cross-entropy by hand (numpy, float64), masked to outputs {0, 2}.
    x = np.asarray(memory.x, np.float64).reshape(5, -1)
    logits = np.tanh(x @ np.asarray(params['dense0']['kernel'], np.float64)) @ np.asarray(
        params['head']['kernel'], np.float64)
    logits = np.where(np.asarray(memory.mask), logits, -np.inf)
    logp = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    expected = -0.7 * np.mean(logp[np.arange(5), np.asarray(memory.y)])
    np.testing.assert_allclose(loss(params, state, step_key), expected, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_sampling_uses_filled_slots_and_each_step_key_draws_afresh(self):
    # Replay has no per-step hook (one backward pass): the minibatch is drawn from the loop's
    # per-step key, fold_in(task key, step), folded with the seed.
    method = replay_lib.replay(buffer_size=50, input_shape=SHAPE, replay_batch_size=64, seed=3)
    assert method.update is None
    params = make_params()
    state = method.end_task(params, method.init(params), make_task(0, 7), apply_fn=apply_fn,
                            key=KEY)
    draw = self.variant(lambda s, k: replay_lib.replay_batch(s, jax.random.fold_in(k, 3), 64).x)
    loss = self.variant(lambda p, s, k: method.loss(p, s, None, logits=None, apply_fn=apply_fn,
                                                    key=k))
    task_key = jax.random.key(11)
    step_keys = [jax.random.fold_in(task_key, step) for step in range(3)]
    samples = [np.asarray(draw(state, k))[:, 0, 0, 0] for k in step_keys]
    for s in samples:
      assert set(s.astype(int)) <= set(range(7))  # Only the 7 filled slots (of 50).
    assert not np.array_equal(samples[0], samples[1])
    # The loss replays exactly those draws: its value at a step key is the cross-entropy of
    # that step's sample, so different steps see different replay minibatches.
    for k, s in zip(step_keys, samples):
      memory = core.Batch(jnp.asarray(np.broadcast_to(s[:, None, None, None], (64, *SHAPE))),
                          jnp.asarray(s.astype(np.int32) % K), jnp.ones((64, K), bool))
      want = core.cross_entropy(apply_fn(params, memory.x), memory.y, memory.mask)
      np.testing.assert_allclose(loss(params, state, k), want, rtol=1e-5)


def test_zero_buffer_is_finetune():
  method = replay_lib.replay(buffer_size=0, input_shape=SHAPE)
  params = make_params()
  state = method.end_task(params, method.init(params), make_task(0, 5), apply_fn=apply_fn,
                          key=KEY)
  assert state.x.shape[0] == 0 and int(state.seen) == 5
  np.testing.assert_allclose(
      method.loss(params, state, None, logits=None, apply_fn=apply_fn, key=KEY), 0.0)


@pytest.mark.parametrize('hparams, match', [
    ({'buffer_size': -1}, 'replay.buffer_size'),
    ({'buffer_size': 2.5}, 'replay.buffer_size'),
    ({'input_shape': ()}, 'replay.input_shape'),
    ({'input_shape': (28, 0, 1)}, 'replay.input_shape'),
    ({'replay_batch_size': 0}, 'replay.replay_batch_size'),
    ({'strength': float('nan')}, 'replay.strength'),
    ({'strength': -1.0}, 'replay.strength'),
])
def test_bad_hyperparameters(hparams, match):
  with pytest.raises(ValueError, match=match):
    methods.get('replay', {'input_shape': SHAPE, **hparams})


def test_input_shape_comes_from_the_experiment():
  with pytest.raises(ValueError, match=r'replay.input_shape .*got None'):
    replay_lib.replay(buffer_size=4)
  method = methods.get('replay', {'buffer_size': 4}, input_shape=SHAPE)
  assert method.init(make_params()).x.shape == (4, *SHAPE)
  # A config that sets it must agree with the stream.
  assert methods.get('replay', {'input_shape': SHAPE}, input_shape=SHAPE) is not None
  with pytest.raises(ValueError, match=r'replay.input_shape is \(9, 9, 1\) but the stream'):
    methods.get('replay', {'input_shape': (9, 9, 1)}, input_shape=SHAPE)
  # A chain passes it on to its replay member (refresh around replay).
  chained = methods.get('replay+refresh', blocks={'replay': {'buffer_size': 4}},
                        input_shape=SHAPE)
  assert chained.init(make_params())[0].x.shape == (4, *SHAPE)
  # Methods without the hyperparameter ignore the stream's shape.
  assert methods.get('si', {}, input_shape=SHAPE).update is not None


# ------------------------------------------------------------------------ checkpoint, resume


def test_buffer_round_trips_through_a_stage_checkpoint(tmp_path):
  method = replay_lib.replay(buffer_size=6, input_shape=SHAPE)
  params = make_params()
  state = method.init(params)
  for t, (start, n) in enumerate(((0, 4), (4, 9))):
    state = method.end_task(params, state, make_task(start, n), apply_fn=apply_fn,
                            key=jax.random.fold_in(KEY, t))
  with checkpoint.StageCheckpointer(str(tmp_path / 'ckpt')) as ckpt:
    ckpt.save(2, {'method_state': state}, {'note': 'replay'})
  with checkpoint.StageCheckpointer(str(tmp_path / 'ckpt')) as ckpt:
    restored = ckpt.restore(2, {'method_state': method.init(params)}).state['method_state']
  assert isinstance(restored, replay_lib.ReplayState)
  for got, want in zip(restored, state):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_interrupted_run_resumes_with_the_same_buffer(tiny_config, tmp_path, monkeypatch):
  config = tiny_config
  config.num_tasks, config.epochs = 2, 1
  config.methods = ('replay',)
  config.replay = {'buffer_size': 64, 'replay_batch_size': 16}  # input_shape from the stream.
  full = experiment.run(config, str(tmp_path / 'full'))['replay']

  fit_task = training.fit_task

  def interrupted(*args, task_index=0, **kwargs):
    if task_index == 1:
      raise KeyboardInterrupt('simulated interruption before task 2')
    return fit_task(*args, task_index=task_index, **kwargs)

  monkeypatch.setattr(training, 'fit_task', interrupted)
  with pytest.raises(KeyboardInterrupt):
    experiment.run(config, str(tmp_path / 'resumed'))
  monkeypatch.setattr(training, 'fit_task', fit_task)
  assert os.path.isdir(tmp_path / 'resumed' / 'replay' / 'checkpoints' / '1')
  resumed = experiment.run(config, str(tmp_path / 'resumed'))['replay']
  # Task 2 trains on replayed task-1 examples: the same matrix needs the same buffer and key.
  np.testing.assert_array_equal(resumed['accuracy_matrix'], full['accuracy_matrix'])
