"""cljax.data.streams refuses a stream larger than the memory available, before allocating."""

from __future__ import annotations

import collections
import time

import numpy as np
import pytest

from cljax.data import sources
from cljax.data import streams

_Memory = collections.namedtuple('_Memory', 'available')


def _dataset():
  rng = np.random.default_rng(0)
  x_train = rng.random((6, 3, 4, 2), dtype=np.float32)
  x_test = rng.random((4, 3, 4, 2), dtype=np.float32)
  return sources.Dataset('tiny', x_train, np.arange(6, dtype=np.int32) % 3, x_test,
                         np.arange(4, dtype=np.int32) % 3, 3)


def _stream_bytes(stream, shared):
  """Bytes of the stream's own arrays (those not the dataset's), counted on the real arrays."""
  total = 0
  for task in stream.tasks:
    for batch in (task.train, task.test):
      for array in (batch.x, batch.y, batch.mask):
        if not any(array is s for s in shared):
          total += array.nbytes
  return total


@pytest.mark.parametrize('kind,scenario,kwargs', [
    ('permuted', 'domain', {}), ('permuted', 'task', {}),
    ('permuted', 'domain', {'first_identity': True}), ('rotated', 'task', {})])
def test_estimate_equals_the_arrays_allocated(kind, scenario, kwargs):
  data = _dataset()
  stream = streams.make_stream(kind, data, num_tasks=3, seed=0, scenario=scenario, **kwargs)
  shared = (data.x_train, data.x_test)
  permutations = 3 * 8 * 24 if kind == 'permuted' else 0   # one int64 permutation per task
  copies = 3 - (1 if kind == 'rotated' or kwargs else 0)
  assert streams.transformed_stream_bytes(
      data, 3, multi_head=scenario == 'task', num_copies=copies,
      permutation_size=24 if kind == 'permuted' else 0) == (
          _stream_bytes(stream, shared) + permutations)


def test_by_hand():
  # 10 examples, 24 pixels, 3 classes, 2 tasks: per task 10 * (4 + 3) label/mask bytes and
  # 8 * 24 permutation bytes; 2 copies of 10 * 24 float32 pixels.
  assert streams.transformed_stream_bytes(_dataset(), 2, multi_head=False, num_copies=2,
                                          permutation_size=24) == 2 * (70 + 192) + 2 * 960


def test_refused_when_over_the_available_memory(monkeypatch):
  data = _dataset()
  need = 2 * (70 + 192) + 2 * 960
  monkeypatch.setattr(streams.psutil, 'virtual_memory', lambda: _Memory(need - 1))
  with pytest.raises(ValueError, match=r'permuted: num_tasks=2 would materialise 2\.44e-06 GB '
                                       r'of task arrays .* more than the 2\.44e-06 GB of memory '
                                       r'available; lower num_tasks'):
    streams.make_stream('permuted', data, num_tasks=2, seed=0)
  monkeypatch.setattr(streams.psutil, 'virtual_memory', lambda: _Memory(need))
  assert len(streams.make_stream('permuted', data, num_tasks=2, seed=0).tasks) == 2


def test_huge_num_tasks_is_refused_at_once():
  digits = sources.digits()
  start = time.time()
  for kind in ('permuted', 'rotated'):
    with pytest.raises(ValueError, match=rf'{kind}: num_tasks=10000000 would materialise'):
      streams.make_stream(kind, digits, num_tasks=10**7, seed=0)
  assert time.time() - start < 5.0   # nothing was drawn or allocated
