"""An independent re-implementation of GPM's PMNIST protocol, to check cljax's GPM against.

Sharing no code with `cljax` (numpy SVDs, one jitted SGD epoch in plain JAX, the IDX files read
here), it follows the reference code of Saha et al., "Gradient Projection Memory for Continual
Learning" (ICLR 2021), main_pmnist.py and its PMNIST loader, step by step:

  * 10 tasks, each a fixed random pixel permutation of the whole data set; inputs standardized
    (the loader's ``Normalize``, here with Fashion-MNIST's own mean and standard deviation where
    the loader has MNIST's 0.1307 and 0.3081); the first 10% of the training images held out as
    the loader does (the same images for every task, never trained on);
  * a 784-100-100-10 ReLU MLP without biases, PyTorch's default ``nn.Linear`` initialization
    (uniform in +-1/sqrt(fan_in)), one shared 10-way head;
  * plain SGD, learning rate 0.01, batch size 10, 5 epochs per task, cross-entropy;
  * after each task, the inputs of the three layers on 300 random training examples, and GPM's
    memory update with thresholds 0.95, 0.99, 0.99: Eq. 5 after the first task (the reference's
    count ``sum(cumsum(ratio) < threshold)``), Eqs. 8-9 after the others;
  * from the second task on, every kernel gradient projected off its layer's basis (Eq. 10)
    before the SGD step.

It prints the bases' ranks and the accuracy-matrix rows as it goes, then ACC and BWT (the
reference's ``mean((A[-1] - diag(A))[:-1])``). On Permuted Fashion-MNIST (CPU, ~2.5 minutes):

  python experiments/gpm_reference.py

Flags change one thing at a time (``--norm=unit`` for inputs in [0, 1] as cljax's stream gives
them, ``--init=lecun`` for flax's default initialization, ``--valid_fraction=0``, ``--project``
false for plain fine-tuning).
"""

from __future__ import annotations

import gzip
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

_DATA_DIR = flags.DEFINE_string('data_dir', '/usr/share/datasets/fashion-mnist',
                                'Directory of the four gzipped Fashion-MNIST IDX files.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the permutations, initialization and order.')
_TASKS = flags.DEFINE_integer('tasks', 10, 'Number of permuted tasks.')
_EPOCHS = flags.DEFINE_integer('epochs', 5, 'Epochs per task.')
_LEARNING_RATE = flags.DEFINE_float('learning_rate', 0.01, 'SGD learning rate.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 10, 'Training batch size.')
_THRESHOLDS = flags.DEFINE_list('thresholds', ['0.95', '0.99', '0.99'],
                                'GPM energy thresholds of the three layers.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 300,
                                    'Training examples per representation matrix.')
_VALID_FRACTION = flags.DEFINE_float('valid_fraction', 0.1,
                                     'Fraction of the training images held out (not trained on).')
_NORM = flags.DEFINE_enum('norm', 'standardize', ['standardize', 'unit'],
                          "'standardize': (x - mean) / std; 'unit': bytes / 255.")
_INIT = flags.DEFINE_enum('init', 'torch', ['torch', 'lecun'],
                          "'torch': uniform +-1/sqrt(fan_in); 'lecun': normal, std 1/sqrt(fan_in).")
_PROJECT = flags.DEFINE_bool('project', True, 'Project the gradients (false: fine-tuning).')

_DIMS = ((784, 100), (100, 100), (100, 10))


def read_idx(path: str) -> np.ndarray:
  """An IDX file (gzipped) as a uint8 array of the shape its header gives."""
  with gzip.open(path) as f:
    raw = f.read()
  ndim = raw[3]
  shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(data_dir: str):
  """(x_train, y_train, x_test, y_test); images flattened to (N, 784) float32."""
  arrays = []
  for split in ('train', 't10k'):
    x = read_idx(os.path.join(data_dir, f'{split}-images-idx3-ubyte.gz'))
    y = read_idx(os.path.join(data_dir, f'{split}-labels-idx1-ubyte.gz'))
    arrays += [x.reshape(len(x), -1).astype(np.float32) / 255, y.astype(np.int32)]
  return arrays


def init_kernels(key: jax.Array, init: str) -> list[jax.Array]:
  keys = jax.random.split(key, len(_DIMS))
  if init == 'torch':
    return [jax.random.uniform(k, d, minval=-1.0, maxval=1.0) / np.sqrt(d[0])
            for k, d in zip(keys, _DIMS)]
  return [jax.random.normal(k, d) / np.sqrt(d[0]) for k, d in zip(keys, _DIMS)]


def forward(kernels, x):
  """(the three layers' inputs, logits)."""
  h1 = jax.nn.relu(x @ kernels[0])
  h2 = jax.nn.relu(h1 @ kernels[1])
  return (x, h1, h2), h2 @ kernels[2]


def cross_entropy(kernels, x, y):
  logits = forward(kernels, x)[1]
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


@jax.jit
def sgd_epoch(kernels, projections, xs, ys, learning_rate):
  """One epoch of SGD over (steps, batch, ...) arrays; gradient g -> g - P g (Eq. 10)."""
  def step(kernels, batch):
    grads = jax.grad(cross_entropy)(kernels, *batch)
    return [w - learning_rate * (g - p @ g)
            for w, g, p in zip(kernels, grads, projections)], None
  return jax.lax.scan(step, kernels, (xs, ys))[0]


@jax.jit
def accuracy(kernels, x, y):
  return 100.0 * jnp.mean(jnp.argmax(forward(kernels, x)[1], axis=-1) == y)


def update_memory(bases, representations, thresholds):
  """GPM's memory update (Saha et al. 2021): Eq. 5 for the first task, Eqs. 8-9 after it.

  Args:
    bases: per layer a (d, k) orthonormal basis, or None before the first task.
    representations: per layer the (d, n) representation matrix.
    thresholds: per layer the energy threshold.

  Returns:
    The new bases.
  """
  new = []
  for i, (r, threshold) in enumerate(zip(representations, thresholds)):
    u, s, _ = np.linalg.svd(r, full_matrices=False)
    total = np.sum(s ** 2)
    if bases is None:
      rank = int(np.sum(np.cumsum(s ** 2) / total < threshold))
      new.append(u[:, :rank])
      continue
    basis = bases[i]
    u, s, _ = np.linalg.svd(r - basis @ (basis.T @ r), full_matrices=False)
    captured = (total - np.sum(s ** 2)) / total
    rank = 0
    while rank < len(s) and captured < threshold:
      captured += s[rank] ** 2 / total
      rank += 1
    grown = np.hstack([basis, u[:, :rank]])
    new.append(grown[:, :grown.shape[0]])
  return new


def main(argv):
  del argv
  x_train, y_train, x_test, y_test = load(_DATA_DIR.value)
  if _NORM.value == 'standardize':
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
  rng = np.random.RandomState(_SEED.value)
  permutations = [rng.permutation(784) for _ in range(_TASKS.value)]
  thresholds = [float(t) for t in _THRESHOLDS.value]
  batch = _BATCH_SIZE.value

  kernels = init_kernels(jax.random.PRNGKey(_SEED.value), _INIT.value)
  bases = None
  num_tasks = _TASKS.value
  matrix = np.zeros((num_tasks, num_tasks))
  start = time.time()
  # The reference loader holds out the first images, unshuffled, for every task.
  held_out = int(_VALID_FRACTION.value * len(x_train))
  for t in range(num_tasks):
    x, y = x_train[held_out:][:, permutations[t]], y_train[held_out:]
    if bases is None or not _PROJECT.value:
      projections = [jnp.zeros((d, d)) for d, _ in _DIMS]
    else:
      projections = [jnp.asarray(b @ b.T) for b in bases]
    for _ in range(_EPOCHS.value):
      shuffled = rng.permutation(len(x))[:len(x) // batch * batch]
      kernels = sgd_epoch(kernels, projections, jnp.asarray(x[shuffled].reshape(-1, batch, 784)),
                          jnp.asarray(y[shuffled].reshape(-1, batch)), _LEARNING_RATE.value)
    for j in range(num_tasks):
      matrix[t, j] = float(accuracy(kernels, jnp.asarray(x_test[:, permutations[j]]), y_test))
    sample = rng.permutation(len(x))[:_NUM_SAMPLES.value]
    inputs = forward(kernels, jnp.asarray(x[sample]))[0]
    bases = update_memory(bases, [np.asarray(a).T for a in inputs], thresholds)
    print(f'task {t}: ranks {[b.shape[1] for b in bases]}, accuracies '
          f'{np.round(matrix[t, :t + 1], 2).tolist()}', flush=True)
  bwt = np.mean((matrix[-1] - np.diag(matrix))[:-1])
  print(f'ACC {matrix[-1].mean():.2f}  BWT {bwt:.2f}  ({time.time() - start:.0f} s)')


if __name__ == '__main__':
  app.run(main)
