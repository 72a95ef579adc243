"""Continual-learning task sequences built from a `Dataset`, deterministic from a seed.

A `Stream` is a tuple of `Task`s whose data are `Batch`es of host numpy arrays (see
`cljax.core.Batch`), plus what the model needs to know: the size of its output layer and
the input shape. The three scenarios of van de Ven & Tolias differ only in labels and masks:

  * ``'domain'`` (domain-incremental): one shared head over the dataset's classes; the input
    distribution changes (permuted or rotated pixels). Masks are all True.
  * ``'class'`` (class-incremental): one shared head over all classes; each task brings new
    classes (split). Masks are all True, so old classes compete with new ones.
  * ``'task'`` (task-incremental): each task has its own head. Permuted/rotated streams give
    task ``t`` the output block ``[t*C, (t+1)*C)`` (labels shifted by ``t*C``); split streams keep
    the original class ids and mask each task to its own classes. Masking the other outputs is
    exactly a per-task head over a shared output layer.

References:
  van de Ven & Tolias, "Three scenarios for continual learning", arXiv 1904.07734 (2019).
  Goodfellow et al., "An empirical investigation of catastrophic forgetting in gradient-based
  neural networks", arXiv 1312.6211 (2013) (permuted MNIST).
  Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017
  (rotated MNIST).
  Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017
  (split MNIST).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import psutil
from scipy import ndimage

from cljax.data import text
from cljax.data.sources import Dataset
from cljax.core import Batch


class Task(NamedTuple):
  """One task of a stream.

  Attributes:
    name: e.g. ``'permuted-3'``, ``'rotated-2:90'`` (task 2 rotates by 90 degrees),
      ``'split-0:0,1'`` (task 0 holds classes 0 and 1).
    train: training data, a `Batch` of host numpy arrays.
    test: test data, a `Batch` of host numpy arrays.
  """

  name: str
  train: Batch
  test: Batch


class Stream(NamedTuple):
  """A sequence of tasks and the model shape it needs.

  Attributes:
    name: e.g. ``'permuted-domain-fashion_mnist'``.
    tasks: the tasks, in training order.
    num_outputs: size of the model's output layer; every label is in [0, num_outputs).
    input_shape: (H, W, C) of one example.
    scenario: ``'domain'``, ``'class'`` or ``'task'`` (see the module docstring).
  """

  name: str
  tasks: tuple[Task, ...]
  num_outputs: int
  input_shape: tuple[int, ...]
  scenario: str


_SCENARIOS = {'permuted': ('domain', 'task'), 'rotated': ('domain', 'task'),
              'split': ('class', 'task'), 'text_domains': ('domain',)}


def _check_num_tasks(num_tasks: Any, maximum: Optional[int], kind: str) -> int:
  """Validates ``num_tasks`` against [1, maximum] (no maximum when None)."""
  if (isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer))
      or num_tasks < 1 or (maximum is not None and num_tasks > maximum)):
    bound = '' if maximum is None else f' and at most {maximum}, the maximum this stream supplies'
    raise ValueError(f'{kind}: num_tasks must be an int >= 1{bound}; got {num_tasks!r}')
  return int(num_tasks)


def _check_dataset(dataset: Dataset) -> tuple[int, ...]:
  """Validates the arrays of ``dataset``; returns its (H, W, C) input shape."""
  for part in ('train', 'test'):
    x, y = getattr(dataset, 'x_' + part), getattr(dataset, 'y_' + part)
    if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
      raise ValueError(f'dataset {dataset.name!r}: x_{part} must be (N, H, W, C) and y_{part} '
                       f'(N,), got {x.shape} and {y.shape}')
  if dataset.x_train.shape[1:] != dataset.x_test.shape[1:]:
    raise ValueError(f'dataset {dataset.name!r}: train images {dataset.x_train.shape[1:]} and '
                     f'test images {dataset.x_test.shape[1:]} differ in shape')
  return tuple(int(d) for d in dataset.x_train.shape[1:])


def _check_memory(kind: str, num_tasks: int, total_bytes: int) -> None:
  """Refuses a stream whose arrays would need more than the memory available now.

  Raises:
    ValueError: ``total_bytes`` exceeds ``psutil.virtual_memory().available`` (naming the
      config key num_tasks and both sizes), before anything is allocated.
  """
  available = int(psutil.virtual_memory().available)
  if total_bytes > available:
    raise ValueError(f'{kind}: num_tasks={num_tasks} would materialise {total_bytes / 1e9:.3g} GB '
                     f'of task arrays ({total_bytes / num_tasks / 1e6:.3g} MB per task), more '
                     f'than the {available / 1e9:.3g} GB of memory available; lower num_tasks')


def transformed_stream_bytes(dataset: Dataset, num_tasks: int, *, multi_head: bool,
                             num_copies: int, permutation_size: int = 0) -> int:
  """Bytes of host memory a permuted or rotated stream allocates for its tasks.

  Every task holds its labels (int32) and masks (bool, one per output) for the train and test
  examples; ``num_copies`` of the tasks also hold transformed float32 images (the others share
  the dataset's); a permuted stream draws one int64 permutation of ``permutation_size`` entries
  per task.

  Args:
    dataset: the source `Dataset`.
    num_tasks: number of tasks.
    multi_head: whether each task has its own head (``num_tasks * num_classes`` outputs).
    num_copies: tasks whose images are transformed copies.
    permutation_size: entries of one permutation (0 for rotations).

  Returns:
    The total in bytes.
  """
  n = int(dataset.x_train.shape[0]) + int(dataset.x_test.shape[0])
  pixels = int(np.prod(dataset.x_train.shape[1:]))
  outputs = int(dataset.num_classes) * (num_tasks if multi_head else 1)
  per_task = n * (4 + outputs) + 8 * permutation_size
  return num_tasks * per_task + num_copies * n * pixels * 4


def _as_float32(x: np.ndarray) -> np.ndarray:
  """``x`` as a C-contiguous float32 array, copied only when it is not one already."""
  return np.ascontiguousarray(x, dtype=np.float32)


def _head_batch(x: np.ndarray, y: np.ndarray, *, head: int, num_classes: int,
                num_heads: int) -> Batch:
  """A batch for output block ``head`` of ``num_heads`` blocks of ``num_classes`` outputs.

  With ``num_heads == 1`` this is the shared head: labels unchanged and masks all True.
  """
  mask = np.zeros((y.shape[0], num_heads * num_classes), dtype=bool)
  mask[:, head * num_classes:(head + 1) * num_classes] = True
  labels = y.astype(np.int32) + np.int32(head * num_classes)
  return Batch(x, labels, mask)


def _transformed_stream(kind: str, dataset: Dataset, transforms: list[tuple[str, Any]],
                        apply: Callable[[np.ndarray, Any], np.ndarray],
                        multi_head: bool) -> Stream:
  """Builds a domain- or task-incremental stream from per-task input transforms."""
  input_shape = _check_dataset(dataset)
  num_classes, num_heads = int(dataset.num_classes), len(transforms) if multi_head else 1
  x_train, x_test = _as_float32(dataset.x_train), _as_float32(dataset.x_test)
  tasks = []
  for t, (name, transform) in enumerate(transforms):
    head = t if multi_head else 0
    batches = (
        _head_batch(apply(x, transform), y, head=head, num_classes=num_classes,
                    num_heads=num_heads)
        for x, y in ((x_train, dataset.y_train), (x_test, dataset.y_test)))
    tasks.append(Task(name, *batches))
  scenario = 'task' if multi_head else 'domain'
  return Stream(f'{kind}-{scenario}-{dataset.name}', tuple(tasks), num_heads * num_classes,
                input_shape, scenario)


def _permute(x: np.ndarray, permutation: Optional[np.ndarray]) -> np.ndarray:
  """Applies one pixel permutation to every image of (N, H, W, C) ``x``; None is identity."""
  if permutation is None:
    return x
  flat = x.reshape(x.shape[0], -1)  # A view: x is C-contiguous.
  return np.take(flat, permutation, axis=1).reshape(x.shape)


def permuted(dataset: Dataset,
             *,
             num_tasks: int,
             seed: int,
             multi_head: bool = False,
             first_identity: bool = False) -> Stream:
  """Permuted images: each task applies its own fixed random permutation to the pixels.

  Task ``t``'s permutation ``p_t`` is drawn from ``seed`` and acts on the flattened H*W*C values
  of every image, train and test alike: ``x_t.reshape(N, -1) = x.reshape(N, -1)[:, p_t]``.

  Args:
    dataset: the source `Dataset`; images (N, H, W, C) float32.
    num_tasks: number of tasks, >= 1.
    seed: seed of the permutations.
    multi_head: False: domain-incremental, one shared head of ``num_classes`` outputs, masks all
      True. True: task-incremental, task ``t`` uses outputs ``[t*C, (t+1)*C)`` (labels shifted
      by ``t*C``, masks that block), ``num_outputs = num_tasks * C``.
    first_identity: whether task 0 keeps the original pixel order (its arrays are then the
      dataset's own, not copies).

  Returns:
    A `Stream` of tasks named ``'permuted-<t>'``.

  Raises:
    ValueError: if ``num_tasks`` < 1, the dataset's arrays are malformed, or the tasks would
      need more memory than is available (`transformed_stream_bytes`; checked before drawing).

  References:
    Goodfellow et al., arXiv 1312.6211 (2013), Sec. 4; van de Ven & Tolias, arXiv 1904.07734.
  """
  num_tasks = _check_num_tasks(num_tasks, None, 'permuted')
  size = int(np.prod(_check_dataset(dataset)))
  _check_memory('permuted', num_tasks, transformed_stream_bytes(
      dataset, num_tasks, multi_head=multi_head, num_copies=num_tasks - int(first_identity),
      permutation_size=size))
  rng = np.random.default_rng(seed)
  transforms = []
  for t in range(num_tasks):
    permutation = rng.permutation(size)  # Drawn for every task, so first_identity keeps the rest.
    transforms.append((f'permuted-{t}', None if first_identity and t == 0 else permutation))
  return _transformed_stream('permuted', dataset, transforms, _permute, multi_head)


def _rotate(x: np.ndarray, degrees: float) -> np.ndarray:
  """Rotates every (H, W) plane of (N, H, W, C) ``x`` counter-clockwise, as `np.rot90` does."""
  if degrees % 360.0 == 0.0:
    return x
  rotated = ndimage.rotate(x, degrees, axes=(1, 2), reshape=False, order=1, mode='constant',
                           cval=0.0)
  return np.clip(rotated, 0.0, 1.0, out=rotated)


def rotated(dataset: Dataset,
            *,
            num_tasks: int,
            seed: int,
            max_degrees: float = 180.0,
            multi_head: bool = False) -> Stream:
  """Rotated images: task angles ``k * max_degrees / num_tasks``, k = 0..num_tasks-1, shuffled.

  Rotation is bilinear (``scipy.ndimage.rotate``, ``order=1``, ``reshape=False``, zeros outside
  the image), counter-clockwise in the (H, W) plane like `np.rot90`, clipped to [0, 1]. The
  order of the angles over the tasks is a permutation drawn from ``seed``.

  Args:
    dataset: the source `Dataset`; images (N, H, W, C) float32 in [0, 1].
    num_tasks: number of tasks, >= 1.
    seed: seed of the task order.
    max_degrees: the angles cover [0, max_degrees) evenly.
    multi_head: as in `permuted`.

  Returns:
    A `Stream` of tasks named ``'rotated-<t>:<degrees>'``.

  Raises:
    ValueError: if ``num_tasks`` < 1, the dataset's arrays are malformed, or the tasks would
      need more memory than is available (`transformed_stream_bytes`).

  References:
    Lopez-Paz & Ranzato, NeurIPS 2017, Sec. 5 (rotated MNIST).
  """
  num_tasks = _check_num_tasks(num_tasks, None, 'rotated')
  _check_dataset(dataset)
  _check_memory('rotated', num_tasks, transformed_stream_bytes(
      dataset, num_tasks, multi_head=multi_head, num_copies=num_tasks - 1))   # angle 0: shared
  order = np.random.default_rng(seed).permutation(num_tasks)
  angles = [float(k) * float(max_degrees) / num_tasks for k in order]
  transforms = [(f'rotated-{t}:{angle:g}', angle) for t, angle in enumerate(angles)]
  return _transformed_stream('rotated', dataset, transforms, _rotate, multi_head)


def split(dataset: Dataset,
          *,
          num_tasks: int,
          seed: int,
          scenario: str = 'class',
          shuffle_classes: bool = True) -> Stream:
  """Split classes: the classes are divided into ``num_tasks`` groups, one group per task.

  Group sizes differ by at most one (``np.array_split`` of the class order). Labels stay the
  original class ids and the output layer has ``num_classes`` outputs in both scenarios.

  Args:
    dataset: the source `Dataset`.
    num_tasks: number of tasks, in [1, num_classes].
    seed: seed of the class order (used when ``shuffle_classes``).
    scenario: ``'class'``: class-incremental, masks all True. ``'task'``: task-incremental,
      each example's mask holds its task's classes only.
    shuffle_classes: whether to shuffle the class order before splitting; False gives groups
      of consecutive class ids.

  Returns:
    A `Stream` of tasks named ``'split-<t>:<classes>'``, e.g. ``'split-0:3,7'``.

  Raises:
    ValueError: if ``num_tasks`` is outside [1, num_classes], ``scenario`` is not ``'class'`` or
      ``'task'``, or the dataset's arrays are malformed.

  References:
    Zenke, Poole & Ganguli, ICML 2017, Sec. 5.2 (split MNIST); van de Ven & Tolias,
    arXiv 1904.07734.
  """
  if scenario not in _SCENARIOS['split']:
    raise ValueError(f'split: scenario must be one of {_SCENARIOS["split"]}, got {scenario!r}')
  num_classes = int(dataset.num_classes)
  num_tasks = _check_num_tasks(num_tasks, num_classes, 'split')
  input_shape = _check_dataset(dataset)
  classes = np.arange(num_classes)
  if shuffle_classes:
    classes = np.random.default_rng(seed).permutation(classes)
  x_train, x_test = _as_float32(dataset.x_train), _as_float32(dataset.x_test)
  tasks = []
  for t, group in enumerate(np.array_split(classes, num_tasks)):
    # The outputs each example of this task may use: its task's classes, or all of them.
    allowed = np.ones(num_classes, dtype=bool)
    if scenario == 'task':
      allowed[:] = False
      allowed[group] = True
    batches = []
    for x, y in ((x_train, dataset.y_train), (x_test, dataset.y_test)):
      keep = np.isin(y, group)
      batches.append(Batch(x[keep], y[keep].astype(np.int32), np.tile(allowed, (keep.sum(), 1))))
    tasks.append(Task(f'split-{t}:' + ','.join(str(c) for c in group), *batches))
  return Stream(f'split-{scenario}-{dataset.name}', tuple(tasks), num_classes, input_shape,
                scenario)


def make_stream(kind: str,
                dataset: Dataset,
                *,
                num_tasks: int,
                seed: int,
                scenario: Optional[str] = None,
                **kwargs: Any) -> Stream:
  """A stream by kind and scenario: the entry point for configs.

  Args:
    kind: ``'permuted'``, ``'rotated'`` or ``'split'``.
    dataset: the source `Dataset`.
    num_tasks: number of tasks.
    seed: seed of the stream.
    scenario: ``'domain'`` or ``'task'`` for permuted/rotated (``'task'`` means
      ``multi_head=True``); ``'class'`` or ``'task'`` for split. None picks the first
      (``'domain'``, resp. ``'class'``).
    **kwargs: further keyword arguments of the stream function (e.g. ``max_degrees``,
      ``first_identity``, ``shuffle_classes``).

  Returns:
    The `Stream`.

  Raises:
    ValueError: for an unknown ``kind``, a ``scenario`` the kind does not support, or a
      ``multi_head`` keyword that contradicts ``scenario``.
  """
  if kind not in REGISTRY:
    raise ValueError(f'Unknown stream kind {kind!r} (config key `stream`); choose one of '
                     f'{", ".join(REGISTRY)}')
  allowed = _SCENARIOS[kind]
  if scenario is None:
    scenario = allowed[0]
  if scenario not in allowed:
    raise ValueError(f'{kind} streams support scenario {" or ".join(map(repr, allowed))}, '
                     f'got {scenario!r} (config key `scenario`)')
  return REGISTRY[kind](dataset, num_tasks=num_tasks, seed=seed, scenario=scenario, **kwargs)


def _domain_stream(builder: Callable[..., Stream]) -> Callable[..., Stream]:
  """A permuted/rotated builder taking ``scenario`` ('task' means ``multi_head=True``)."""
  def make(dataset: Dataset, *, num_tasks: int, seed: int, scenario: str, **kwargs) -> Stream:
    multi_head = scenario == 'task'
    if kwargs.pop('multi_head', multi_head) != multi_head:
      raise ValueError(f'{builder.__name__}: multi_head={not multi_head} contradicts '
                       f'scenario={scenario!r}')
    return builder(dataset, num_tasks=num_tasks, seed=seed, multi_head=multi_head, **kwargs)
  return make


# Stream kinds by name: ``make(dataset, *, num_tasks, seed, scenario, **kwargs) -> Stream``.
# A new stream is one function plus one line here (and its scenarios in `_SCENARIOS`).
REGISTRY: dict[str, Callable[..., Stream]] = {
    'permuted': _domain_stream(permuted),
    'rotated': _domain_stream(rotated),
    'split': split,
    'text_domains': text.make_text_domains,
}
KINDS = tuple(REGISTRY)
# Stream kinds that read their own data (corpora), not the config's `dataset`.
DATASET_FREE = ('text_domains',)
