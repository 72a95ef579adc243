"""Tests for cljax.data.streams: permuted, rotated and split task sequences."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cljax.data import sources
from cljax.data import streams
from cljax.methods.base import Batch


def _distinct_pixel_dataset(num_train=6, num_test=4, shape=(3, 4, 2), num_classes=3):
  """Images whose pixels all differ, so a permutation can be read back from one image."""
  rng = np.random.default_rng(42)
  size = int(np.prod(shape))
  def images(n):
    return np.stack([rng.permutation(size) for _ in range(n)]).astype(np.float32).reshape(
        (n,) + shape) / size
  y_train = (np.arange(num_train) % num_classes).astype(np.int32)
  y_test = (np.arange(num_test) % num_classes).astype(np.int32)
  return sources.Dataset('distinct', images(num_train), y_train, images(num_test), y_test,
                         num_classes)


@pytest.fixture(scope='module')
def digits():
  return sources.digits()


def _recover_permutation(source_image, permuted_image):
  """p with permuted.ravel() == source.ravel()[p], read off distinct pixel values."""
  src, dst = source_image.ravel(), permuted_image.ravel()
  where = {value: i for i, value in enumerate(src.tolist())}
  return np.array([where[value] for value in dst.tolist()])


def _assert_batch_types(batch: Batch, num_outputs: int, shape):
  assert isinstance(batch, Batch)
  assert batch.x.dtype == np.float32 and batch.x.shape[1:] == tuple(shape)
  assert batch.y.dtype == np.int32 and batch.y.shape == batch.x.shape[:1]
  assert batch.mask.dtype == np.bool_ and batch.mask.shape == (batch.y.shape[0], num_outputs)
  assert np.all((batch.y >= 0) & (batch.y < num_outputs))
  # Every example may use its own label.
  assert np.all(batch.mask[np.arange(batch.y.shape[0]), batch.y])


# ------------------------------------------------------------------------------- permuted


def test_permuted_tasks_are_pixel_permutations_shared_by_train_and_test():
  data = _distinct_pixel_dataset()
  stream = streams.permuted(data, num_tasks=3, seed=0)
  assert stream.scenario == 'domain' and stream.num_outputs == 3
  assert stream.input_shape == (3, 4, 2) and len(stream.tasks) == 3
  assert [t.name for t in stream.tasks] == ['permuted-0', 'permuted-1', 'permuted-2']
  found = []
  for task in stream.tasks:
    perm = _recover_permutation(data.x_train[0], task.train.x[0])
    np.testing.assert_array_equal(np.sort(perm), np.arange(24))  # A permutation.
    for x_src, x_task in ((data.x_train, task.train.x), (data.x_test, task.test.x)):
      np.testing.assert_array_equal(x_task.reshape(len(x_task), -1),
                                    x_src.reshape(len(x_src), -1)[:, perm])
    for batch in (task.train, task.test):
      _assert_batch_types(batch, 3, (3, 4, 2))
    np.testing.assert_array_equal(task.train.y, data.y_train)
    np.testing.assert_array_equal(task.test.y, data.y_test)
    assert task.train.mask.all() and task.test.mask.all()
    found.append(tuple(perm))
  assert len(set(found)) == 3 and tuple(range(24)) not in found


def test_permuted_real_digits_keep_pixel_multisets(digits):
  stream = streams.permuted(digits, num_tasks=2, seed=5)
  for task in stream.tasks:
    _assert_batch_types(task.test, 10, (8, 8, 1))
    np.testing.assert_array_equal(np.sort(task.test.x.reshape(-1, 64), axis=1),
                                  np.sort(digits.x_test.reshape(-1, 64), axis=1))
    assert not np.array_equal(task.test.x, digits.x_test)


def test_permuted_first_identity():
  data = _distinct_pixel_dataset()
  stream = streams.permuted(data, num_tasks=2, seed=0, first_identity=True)
  np.testing.assert_array_equal(stream.tasks[0].train.x, data.x_train)
  np.testing.assert_array_equal(stream.tasks[0].test.x, data.x_test)
  # Later tasks are the same as without first_identity.
  plain = streams.permuted(data, num_tasks=2, seed=0)
  np.testing.assert_array_equal(stream.tasks[1].train.x, plain.tasks[1].train.x)


def test_permuted_deterministic_from_seed():
  data = _distinct_pixel_dataset()
  a, b = (streams.permuted(data, num_tasks=2, seed=7) for _ in range(2))
  c = streams.permuted(data, num_tasks=2, seed=8)
  for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks):
    np.testing.assert_array_equal(ta.train.x, tb.train.x)
    np.testing.assert_array_equal(ta.test.x, tb.test.x)
    assert not np.array_equal(ta.train.x, tc.train.x)


def test_permuted_multi_head_blocks():
  data = _distinct_pixel_dataset()
  stream = streams.permuted(data, num_tasks=3, seed=0, multi_head=True)
  assert stream.scenario == 'task' and stream.num_outputs == 9
  for t, task in enumerate(stream.tasks):
    for batch, y in ((task.train, data.y_train), (task.test, data.y_test)):
      _assert_batch_types(batch, 9, (3, 4, 2))
      np.testing.assert_array_equal(batch.y, y + 3 * t)
      expected = np.zeros(9, bool)
      expected[3 * t:3 * t + 3] = True
      np.testing.assert_array_equal(batch.mask, np.tile(expected, (len(y), 1)))


# -------------------------------------------------------------------------------- rotated


def _single_image_dataset(image):
  x = image[None, ..., None].astype(np.float32)
  y = np.zeros(1, np.int32)
  return sources.Dataset('one', x, y, x.copy(), y.copy(), 2)


def test_rotated_90_degrees_matches_rot90():
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(9, 9)).astype(np.float32)
  stream = streams.rotated(_single_image_dataset(image), num_tasks=2, seed=0, max_degrees=180)
  by_angle = {task.name.split(':')[1]: task for task in stream.tasks}
  assert sorted(by_angle) == ['0', '90']
  np.testing.assert_array_equal(by_angle['0'].train.x[0, ..., 0], image)
  rotated = by_angle['90'].test.x[0, ..., 0]
  expected = np.rot90(image)
  np.testing.assert_allclose(rotated[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1e-5)
  np.testing.assert_allclose(rotated, expected, atol=0.05)  # Borders: interpolation with 0.


def test_rotated_direction_on_hand_made_image():
  image = np.zeros((5, 5), np.float32)
  image[0, 1] = 1.0  # Row 0, column 1; a counter-clockwise quarter turn sends it to (3, 0).
  image[2, 2] = 0.5  # The centre stays put.
  stream = streams.rotated(_single_image_dataset(image), num_tasks=4, seed=0, max_degrees=360)
  task = next(t for t in stream.tasks if t.name.endswith(':90'))
  expected = np.zeros((5, 5), np.float32)
  expected[3, 0], expected[2, 2] = 1.0, 0.5
  np.testing.assert_allclose(task.train.x[0, ..., 0], expected, atol=1e-5)


def test_rotated_angles_order_values_and_heads(digits):
  small = sources.subsample(digits, max_train=60, max_test=30)
  stream = streams.rotated(small, num_tasks=4, seed=1, max_degrees=90, multi_head=True)
  angles = [float(t.name.split(':')[1]) for t in stream.tasks]
  assert sorted(angles) == [0.0, 22.5, 45.0, 67.5]
  assert stream.scenario == 'task' and stream.num_outputs == 40
  orders = {tuple(t.name.split(':')[1] for t in
                  streams.rotated(small, num_tasks=4, seed=s, max_degrees=90).tasks)
            for s in range(6)}
  assert len(orders) > 1  # The seed shuffles the task order.
  for t, task in enumerate(stream.tasks):
    for batch, y in ((task.train, small.y_train), (task.test, small.y_test)):
      _assert_batch_types(batch, 40, (8, 8, 1))
      assert batch.x.min() >= 0.0 and batch.x.max() <= 1.0
      np.testing.assert_array_equal(batch.y, y + 10 * t)
      assert batch.mask[:, 10 * t:10 * t + 10].all() and batch.mask.sum() == 10 * len(y)


def test_rotated_deterministic(digits):
  small = sources.subsample(digits, max_train=40, max_test=20)
  a = streams.rotated(small, num_tasks=3, seed=4)
  b = streams.rotated(small, num_tasks=3, seed=4)
  for ta, tb in zip(a.tasks, b.tasks):
    assert ta.name == tb.name
    np.testing.assert_array_equal(ta.train.x, tb.train.x)


# ---------------------------------------------------------------------------------- split


@pytest.mark.parametrize('num_tasks', [1, 3, 5, 10])
def test_split_groups_partition_the_classes(digits, num_tasks):
  stream = streams.split(digits, num_tasks=num_tasks, seed=0)
  groups = [sorted(set(task.train.y.tolist())) for task in stream.tasks]
  named = [sorted(int(c) for c in task.name.split(':')[1].split(',')) for task in stream.tasks]
  assert groups == named
  assert sorted(c for g in groups for c in g) == list(range(10))  # Disjoint, covering.
  sizes = [len(g) for g in groups]
  assert max(sizes) - min(sizes) <= 1
  assert stream.num_outputs == 10 and stream.scenario == 'class'
  for task, group in zip(stream.tasks, groups):
    for batch, x, y in ((task.train, digits.x_train, digits.y_train),
                        (task.test, digits.x_test, digits.y_test)):
      _assert_batch_types(batch, 10, (8, 8, 1))
      keep = np.isin(y, group)
      np.testing.assert_array_equal(batch.x, x[keep])  # All of the group's examples, in order.
      np.testing.assert_array_equal(batch.y, y[keep])
      assert batch.mask.all()  # Class-incremental: one shared head.


def test_split_task_incremental_masks(digits):
  stream = streams.split(digits, num_tasks=4, seed=3, scenario='task')
  assert stream.scenario == 'task' and stream.num_outputs == 10
  for task in stream.tasks:
    group = [int(c) for c in task.name.split(':')[1].split(',')]
    expected = np.isin(np.arange(10), group)
    for batch in (task.train, task.test):
      _assert_batch_types(batch, 10, (8, 8, 1))  # Includes: mask holds each example's label.
      np.testing.assert_array_equal(batch.mask, np.tile(expected, (batch.size, 1)))


def test_split_unshuffled_and_seeded(digits):
  stream = streams.split(digits, num_tasks=5, seed=0, shuffle_classes=False)
  assert [t.name for t in stream.tasks] == ['split-0:0,1', 'split-1:2,3', 'split-2:4,5',
                                           'split-3:6,7', 'split-4:8,9']
  names = {tuple(t.name for t in streams.split(digits, num_tasks=5, seed=s).tasks)
           for s in range(4)}
  assert len(names) > 1
  again = streams.split(digits, num_tasks=5, seed=2)
  assert [t.name for t in again.tasks] == [
      t.name for t in streams.split(digits, num_tasks=5, seed=2).tasks]


def test_split_errors(digits):
  with pytest.raises(ValueError, match=r'num_tasks.*at most 10'):
    streams.split(digits, num_tasks=11, seed=0)
  with pytest.raises(ValueError, match='scenario'):
    streams.split(digits, num_tasks=2, seed=0, scenario='domain')


# ---------------------------------------------------------------------- errors, make_stream


@pytest.mark.parametrize('kind', streams.KINDS)
@pytest.mark.parametrize('num_tasks', [0, -1, True, 2.0])
def test_bad_num_tasks(kind, num_tasks):
  with pytest.raises(ValueError, match='num_tasks'):
    streams.make_stream(kind, _distinct_pixel_dataset(), num_tasks=num_tasks, seed=0)


def test_make_stream_dispatch():
  data = _distinct_pixel_dataset()
  a = streams.make_stream('permuted', data, num_tasks=2, seed=1, scenario='task')
  b = streams.permuted(data, num_tasks=2, seed=1, multi_head=True)
  assert a.scenario == b.scenario == 'task' and a.num_outputs == b.num_outputs == 6
  for ta, tb in zip(a.tasks, b.tasks):
    np.testing.assert_array_equal(ta.train.x, tb.train.x)
    np.testing.assert_array_equal(ta.test.mask, tb.test.mask)
  assert streams.make_stream('rotated', data, num_tasks=2, seed=0).scenario == 'domain'
  c = streams.make_stream('split', data, num_tasks=3, seed=0, shuffle_classes=False)
  assert c.scenario == 'class' and [t.name for t in c.tasks] == ['split-0:0', 'split-1:1',
                                                                'split-2:2']
  assert streams.make_stream('split', data, num_tasks=3, seed=0, scenario='task').scenario == (
      'task')


def test_make_stream_errors():
  data = _distinct_pixel_dataset()
  with pytest.raises(ValueError, match="permuted, rotated, split"):
    streams.make_stream('blurred', data, num_tasks=2, seed=0)
  with pytest.raises(ValueError, match="'domain' or 'task'"):
    streams.make_stream('rotated', data, num_tasks=2, seed=0, scenario='class')
  with pytest.raises(ValueError, match="'class' or 'task'"):
    streams.make_stream('split', data, num_tasks=2, seed=0, scenario='domain')
  with pytest.raises(ValueError, match='multi_head'):
    streams.make_stream('permuted', data, num_tasks=2, seed=0, scenario='domain',
                        multi_head=True)


def test_malformed_dataset():
  data = _distinct_pixel_dataset()
  with pytest.raises(ValueError, match='x_train'):
    streams.permuted(data._replace(y_train=data.y_train[:-1]), num_tasks=1, seed=0)


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR),
                    reason=f'{sources.FASHION_MNIST_DIR} absent: '
                    'apt-get install -y dataset-fashion-mnist')
def test_permuted_fashion_mnist_subset():
  data = sources.subsample(sources.fashion_mnist(), max_train=1000, max_test=200)
  stream = streams.make_stream('permuted', data, num_tasks=2, seed=0)
  assert stream.input_shape == (28, 28, 1) and stream.num_outputs == 10
  for task in stream.tasks:
    _assert_batch_types(task.train, 10, (28, 28, 1))
    assert task.train.size == 1000 and task.test.size == 200
