"""Per-step cost of each continual method: its train-step time / finetune's, same model and batch.

  python benchmarks/method_overhead.py
  python benchmarks/method_overhead.py --batch_size=256 --steps=100
  python benchmarks/method_overhead.py --clock=wall       # on an otherwise idle machine

The model and hyperparameters are those of experiments/configs/permuted_fashion_mnist.py (MLP
784-100-100-10, SGD with momentum, batch 64). Each method's state is first consolidated on a
"previous task" of random 28x28 inputs, so that every penalty, teacher model and replay buffer is
live. Each timed call is one epoch of ``--steps`` scanned train steps on the real code path
(`cljax.training.make_epoch_fn`, one jitted `lax.scan`), on a fixed batch of random inputs (passed
through the method's ``prepare_task`` first, as `cljax.continual.run_stream` does: LwF's recorded
teacher outputs); the
step time is the median over ``--repeats`` calls after a compiling one, methods interleaved so
that drifts of the machine affect all alike. By default the time is this process's CPU time (all
its threads): on a machine shared with other jobs, wall time mostly measures the other jobs
(ratios below 1 and run-to-run swings of 2x were seen), CPU time repeats within a few percent;
on an idle machine ``--clock=wall`` gives the elapsed time. Targets (from the issue): regularizers <= 1.3x
finetune's step, replay <= 2x; refresh (an extra forward-backward per step by design) has none.
`joint` is not timed: its step is finetune's, on more data.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cljax import core  # pylint: disable=g-import-not-at-top
from cljax import models
from cljax import sharding
from cljax import training
from cljax.runners import continual as runner
from experiments.configs import permuted_fashion_mnist

_METHODS = flags.DEFINE_list(
    'methods', ['finetune', 'l2', 'ewc', 'online_ewc', 'si', 'mas', 'lwf', 'replay', 'ewc+refresh'],
    'Methods to time; finetune is always timed (the reference).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 0, 'Batch size; 0 = the config\'s (64).')
_STEPS = flags.DEFINE_integer('steps', 200, 'Train steps per timed epoch.')
_REPEATS = flags.DEFINE_integer('repeats', 9, 'Timed epochs per method (median).')
_PREVIOUS = flags.DEFINE_integer('previous_task_size', 512,
                                 'Examples of the "previous task" each state consolidates.')
_CLOCK = flags.DEFINE_enum('clock', 'cpu', ['wall', 'cpu'],
                           'wall: elapsed time; cpu: this process\'s CPU time (all threads), '
                           'steadier than wall time on a machine shared with other jobs.')

TARGETS = {'replay': 2.0, 'ewc+refresh': None, 'finetune': 1.0}
REGULARIZER_TARGET = 1.3


def _random_batch(rng: np.random.Generator, n: int, shape, num_outputs: int) -> core.Batch:
  return core.Batch(rng.random((n, *shape), dtype=np.float32),
                    rng.integers(0, num_outputs, n).astype(np.int32),
                    np.ones((n, num_outputs), bool))


def _timer(apply_fn, method, optimizer, mesh, params, state, batches):
  """A closure timing one epoch call; inputs are copied first (the epoch donates them)."""
  epoch = training.make_epoch_fn(apply_fn, method, optimizer, mesh)
  opt_init = training.make_opt_init_fn(method, optimizer, mesh)

  clock = time.process_time if _CLOCK.value == 'cpu' else time.perf_counter
  steps = jnp.arange(_STEPS.value, dtype=jnp.int32)
  key = jax.random.key(0)

  def run() -> float:
    p, s = jax.tree.map(jnp.copy, (params, state))
    o = opt_init(p, s)
    jax.block_until_ready((p, s, o))
    start = clock()
    jax.block_until_ready(epoch(p, o, s, batches, steps, key))
    return clock() - start

  run()  # Compile.
  return run


def main(argv):
  del argv
  config = permuted_fashion_mnist.get_config()
  batch_size = _BATCH_SIZE.value or config.batch_size
  shape, k = (28, 28, 1), 10
  names = ['finetune'] + [m for m in _METHODS.value if m != 'finetune']
  mesh = sharding.make_mesh(1)
  module = models.make_model(config.model, num_outputs=k, **dict(config.model_kwargs))
  apply_fn = models.linen_apply_fn(module)
  params = models.init_params(module, jax.random.key(0), shape)
  optimizer = training.make_optimizer(config.optimizer, learning_rate=config.learning_rate,
                                      momentum=config.momentum)
  rng = np.random.default_rng(0)
  previous = _random_batch(rng, _PREVIOUS.value, shape, k)
  one = _random_batch(rng, batch_size, shape, k)
  stack = lambda b: jax.tree.map(
      lambda a: jnp.asarray(np.broadcast_to(a, (_STEPS.value, *a.shape))), b)

  timers = {}
  for name in names:
    method = runner.method_from_config(config, name, input_shape=shape)
    key = jax.random.key(1)
    state = method.end_task(params, method.init(params), previous, apply_fn=apply_fn, key=key)
    data = one if method.prepare_task is None else method.prepare_task(
        params, state, one, seen=[previous, one], apply_fn=apply_fn, key=key)
    timers[name] = _timer(apply_fn, method, optimizer, mesh, params, state, stack(data))
  samples = {name: [] for name in names}
  for _ in range(_REPEATS.value):
    for name, run in timers.items():
      samples[name].append(run() / _STEPS.value)
  step = {name: statistics.median(v) for name, v in samples.items()}

  print(f'Train-step time / finetune\'s: MLP 784-100-100-10, batch {batch_size}, '
        f'{_STEPS.value} scanned steps x {_REPEATS.value} repeats (median), '
        f'{jax.devices()[0].platform}, {_CLOCK.value} clock')
  print('| method | step (us) | ratio | target |')
  print('|---|---|---|---|')
  for name in names:
    ratio = step[name] / step['finetune']
    target = TARGETS.get(name, REGULARIZER_TARGET)
    verdict = '-' if target is None else (f'<= {target:g}x ' + ('ok' if ratio <= target else 'MISSED'))
    print(f'| {name} | {1e6 * step[name]:.1f} | {ratio:.2f} | {verdict} |')


if __name__ == '__main__':
  app.run(main)
