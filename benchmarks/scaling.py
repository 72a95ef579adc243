"""Data-parallel scaling: train steps/s and examples/s of the CNN on Fashion-MNIST per device count.

  python benchmarks/scaling.py                     # CPU: 1, 2, 4, 8 simulated host devices
  python benchmarks/scaling.py --devices=1         # GPU host: its real devices

On CPU the "devices" are threads of one processor (XLA_FLAGS=--xla_force_host_platform_device_count),
so more of them shows the overhead of partitioning and collectives, not a speed-up. On a GPU or TPU
host the same code runs the global batch split over real accelerators. Each number is the median
over timed epochs of `--steps` scanned train steps (the real `cljax.training` code path), after
one compile; the ratio column is steps/s relative to the first device count.
"""

import os
import sys

if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', '') and \
    not any(a.startswith('--devices') for a in sys.argv):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import time  # pylint: disable=g-import-not-at-top

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import models, sharding, training
from cljax.data import sources
from cljax import core
from cljax.methods import base, regularizers

_DEVICES = flags.DEFINE_list('devices', ['1', '2', '4', '8'], 'Device counts to measure.')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'Global batch size.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Train steps per timed call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls per device count.')


def _data(n):
  try:
    ds = sources.fashion_mnist()
  except FileNotFoundError:
    ds = sources.digits()
  x, y = ds.x_train[:n], ds.y_train[:n]
  return ds.name, core.Batch(x, y, np.ones((len(y), ds.num_classes), bool))


def main(argv):
  del argv
  counts = [int(c) for c in _DEVICES.value if int(c) <= len(jax.devices())]
  b, s = _BATCH.value, _STEPS.value
  name, data = _data(b * s)
  module = models.make_model('cnn', num_outputs=10)
  apply_fn = models.linen_apply_fn(module)
  params0 = models.init_params(module, jax.random.key(0), data.x.shape[1:])
  method, opt = regularizers.finetune(), optax.sgd(0.01, momentum=0.9)
  host = jax.tree.map(lambda a: a.reshape(s, b, *a.shape[1:]), data)
  print(f'CNN on {name}, global batch {b}, {s} steps per call, devices: {jax.devices()[0].device_kind}'
        f' x {len(jax.devices())} ({jax.default_backend()})')
  print(f'{"devices":>7} {"steps/s":>9} {"examples/s":>11} {"ratio":>6}')
  first = None
  for n in counts:
    mesh = sharding.make_mesh(n)
    sharding.check_batch_size(b, mesh)
    epoch = training.make_epoch_fn(apply_fn, method, opt, mesh)
    batches = jax.tree.map(lambda a: sharding.shard_batch(mesh, a, axis=1), host)
    # A fresh copy per mesh: the epoch donates its inputs.
    params = jax.device_put(jax.tree.map(jnp.copy, params0), sharding.replicated(mesh))
    state = base.EmptyState()
    opt_state = training.make_opt_init_fn(method, opt, mesh)(params, state)
    params, opt_state, state, losses = epoch(params, opt_state, state, batches)  # compile
    losses.block_until_ready()
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      params, opt_state, state, losses = epoch(params, opt_state, state, batches)
      losses.block_until_ready()
      times.append(time.perf_counter() - start)
    rate = s / float(np.median(times))
    first = first or rate
    print(f'{n:>7} {rate:>9.1f} {rate * b:>11.0f} {rate / first:>6.2f}')


if __name__ == '__main__':
  app.run(main)
