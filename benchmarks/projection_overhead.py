"""GPM's per-step overhead on the PMNIST MLP: projected train-step time / plain train-step time.

Runs GPM's protocol model (784-100-100-10 MLP without biases, SGD lr 0.01) on Permuted
Fashion-MNIST. Before each task t it times, on the real code path (`cljax.training.make_epoch_fn`:
one jitted `lax.scan` over ``--steps`` steps), the epoch of

  * ``plain``: finetune (no projection),
  * ``gpm``: GPM with the bases grown on tasks 0..t-1, as `cljax.methods.projection.gpm` runs it
    by default (``projection='backward'``: each Dense kernel's gradient computed in the backward
    pass from its inputs projected off the basis, O(batch * d * k)),
  * ``gpm_grad``: the same bases projecting the gradients before the optimizer
    (``projection='gradients'``, O(d * k * out)); both at the smallest static width holding the
    rank,
  (``gpm`` projects the first layer's inputs, the model's inputs, once per task in its
  ``prepare_task``: that time is measured on the whole task and reported beside the steps),
  * ``full``: the gradients projected at the bases' full padded width (`cljax.subspace.
    project_gradients`), i.e. without the rank-bucketing,

each the median of ``--repeats`` timed calls after a compiling one, the three interleaved. Then it
trains the task briefly with GPM (``--train_steps`` steps) and grows the bases with GPM's
``end_task`` (thresholds 0.95, 0.99, 0.99; 300 examples), so the ranks are those of a real run
up to the shortened training. It prints the ranks per layer and task, the time ratios, and the
stored basis sizes against the input dimensions.

  python benchmarks/projection_overhead.py                    # batch 10, GPM's protocol
  python benchmarks/projection_overhead.py --batch_sizes=10,64,256
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import core
from cljax import models
from cljax import sharding
from cljax import subspace
from cljax import training
from cljax.data import sources
from cljax.data import streams
from cljax.methods import base
from cljax.methods import projection
from cljax.methods import regularizers

_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['10'], 'Batch sizes to time (GPM uses 10).')
_STEPS = flags.DEFINE_integer('steps', 1000, 'Steps per timed epoch.')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed epochs per measurement (median).')
_NUM_TASKS = flags.DEFINE_integer('num_tasks', 10, 'Permuted tasks.')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 3000, 'GPM training steps per task (batch 10) '
                                    'before its bases are grown.')
_DATA_DIR = flags.DEFINE_string('data_dir', sources.FASHION_MNIST_DIR, 'Fashion-MNIST IDX files.')

_THRESHOLDS = (0.95, 0.99, 0.99)
_EPOCHS = 5  # GPM's PMNIST protocol.


def _full_width_method(gpm: base.Method) -> base.Method:
  """GPM's state, projected with `subspace.project_gradients` at the full padded width."""
  def transform(state):
    bases = {name: {'kernel': b} for name, b in zip(('dense0', 'dense1', 'head'), state.bases)}
    return subspace.project_gradients(bases)
  return gpm._replace(gradient_transform=transform, intercept=None, prepare_task=None)


def _sample(data: core.Batch, steps: int, batch_size: int) -> core.Batch:
  idx = np.random.default_rng(0).choice(data.size, size=steps * batch_size)
  return jax.tree.map(lambda a: np.take(a, idx, axis=0), data)


def _batches(data: core.Batch, steps: int, mesh) -> core.Batch:
  """(steps * B, ...) host rows -> (steps, B, ...) sharded along B."""
  return jax.tree.map(
      lambda a: sharding.shard_batch(mesh, a.reshape(steps, -1, *a.shape[1:]), axis=1), data)


def _timer(apply_fn, method, optimizer, mesh, params, state, batches):
  """A closure timing one epoch call (inputs copied first: the epoch donates them)."""
  epoch = training.make_epoch_fn(apply_fn, method, optimizer, mesh)
  opt_init = training.make_opt_init_fn(method, optimizer, mesh)

  steps = jnp.arange(jax.tree.leaves(batches)[0].shape[0], dtype=jnp.int32)
  key = jax.random.key(0)

  def run() -> float:
    p, s = jax.tree.map(jnp.copy, (params, state))
    o = opt_init(p, s)
    jax.block_until_ready((p, s, o))
    start = time.perf_counter()
    jax.block_until_ready(epoch(p, o, s, batches, steps, key))
    return time.perf_counter() - start
  run()  # Compile.
  return run


def _time_task(timers: dict, repeats: int) -> dict:
  samples = {name: [] for name in timers}
  for _ in range(repeats):  # Interleaved, so drifts of the machine affect all alike.
    for name, run in timers.items():
      samples[name].append(run())
  return {name: statistics.median(v) for name, v in samples.items()}


def main(argv):
  del argv
  dataset = sources.fashion_mnist(data_dir=_DATA_DIR.value)
  stream = streams.make_stream('permuted', dataset, num_tasks=_NUM_TASKS.value, seed=0)
  module = models.MLP(hidden=(100, 100), num_outputs=stream.num_outputs, use_bias=False)
  apply_fn = models.linen_apply_fn(module)
  params = models.init_params(module, jax.random.key(0), stream.input_shape)
  mesh = sharding.make_mesh()
  optimizer = optax.sgd(0.01)
  plain = regularizers.finetune()
  gpm = projection.gpm(threshold=_THRESHOLDS, num_samples=300)
  gpm_grad = projection.gpm(threshold=_THRESHOLDS, num_samples=300, projection='gradients')
  full = _full_width_method(gpm_grad)
  variants = ('gpm', 'gpm_grad', 'full')
  state = gpm.init(params)
  layers = projection.protected_layers(params, '.*kernel', name='gpm.layers')
  batch_sizes = [int(b) for b in _BATCH_SIZES.value]
  print(f'device: {jax.devices()[0].device_kind}, {_STEPS.value} steps per timed epoch, median '
        f'of {_REPEATS.value}; ranks are the bases in use while training task t')
  header = ' | '.join(f'b={b}: plain us, ' + ', '.join(f'{v}/plain' for v in variants)
                      for b in batch_sizes)
  print(f'task | ranks ({", ".join(l.path for l in layers)}) | {header}')
  ratios = {b: {v: [] for v in variants} for b in batch_sizes}
  step_s = {b: {'plain': [], 'gpm': []} for b in batch_sizes}
  prepare_s = []
  for t, task in enumerate(stream.tasks):
    cells = []
    start = time.perf_counter()  # GPM's once-per-task projection of the first layer's inputs.
    jax.block_until_ready(gpm.prepare_task(params, state, task.train, seen=[task.train],
                                           apply_fn=apply_fn, key=jax.random.key(t)))
    prepare_s.append(time.perf_counter() - start)
    for b in batch_sizes:
      sample = _sample(task.train, _STEPS.value, b)
      timers = {}
      for name, m in (('plain', plain), ('gpm', gpm), ('gpm_grad', gpm_grad), ('full', full)):
        s = base.EmptyState() if m is plain else state
        data = sample if m.prepare_task is None else m.prepare_task(
            params, s, sample, seen=[sample], apply_fn=apply_fn, key=jax.random.key(t))
        timers[name] = _timer(apply_fn, m, optimizer, mesh, params, s,
                              _batches(data, _STEPS.value, mesh))
      med = _time_task(timers, _REPEATS.value)
      for name in variants:
        ratios[b][name].append(med[name] / med['plain'])
      for name in ('plain', 'gpm'):
        step_s[b][name].append(med[name] / _STEPS.value)
      cells.append(f'{1e6 * med["plain"] / _STEPS.value:7.1f}, ' +
                   ', '.join(f'{med[v] / med["plain"]:6.2f}x' for v in variants))
    print(f'{t:4d} | {[int(k) for k in state.ranks]} | ' + ' | '.join(cells) +
          f' | prepare {prepare_s[-1]:.2f} s')
    subset = jax.tree.map(lambda a: a[:_TRAIN_STEPS.value * 10], task.train)
    result = training.fit_task(apply_fn, gpm, optimizer, params, state, subset, epochs=1,
                               batch_size=10, seed=t, mesh=mesh, task_index=t)
    params = result.params
    state = gpm.end_task(params, result.method_state, task.train, apply_fn=apply_fn,
                         key=jax.random.key(t))
  print('\nmean over tasks of the per-task step-time ratio:')
  for b in batch_sizes:
    print(f'  batch {b}: ' + ', '.join(f'{v}/plain {np.mean(ratios[b][v]):.2f}x'
                                       for v in variants))
  n = stream.tasks[0].train.size
  print(f'\nwhole protocol ({_EPOCHS} epochs of {n} examples per task), GPM training time incl. its '
        f'once-per-task input projection (mean {np.mean(prepare_s):.2f} s) / plain training time:')
  for b in batch_sizes:
    steps = _EPOCHS * n // b
    total = steps * np.sum(step_s[b]['gpm']) + np.sum(prepare_s)
    print(f'  batch {b}: {total / (steps * np.sum(step_s[b]["plain"])):.2f}x')
  dims = [l.dim for l in layers]
  ranks = [int(k) for k in state.ranks]
  used = sum(d * k for d, k in zip(dims, ranks))
  stored = sum(int(b.size) for b in state.bases)
  print(f'\nafter {len(stream.tasks)} tasks: ranks {ranks} of input dims {dims} (each <= its dim)')
  print(f'basis floats: {used} in use (sum d*k, {4 * used / 2**20:.2f} MiB float32); stored padded '
        f'{stored} (sum d*d, {4 * stored / 2**20:.2f} MiB), vs {sum(dims)} input dims in total')


if __name__ == '__main__':
  app.run(main)
