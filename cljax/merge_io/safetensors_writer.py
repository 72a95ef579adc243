"""Streaming, sharded safetensors writing in the Hugging Face layout.

Every output tensor's name, dtype and shape are known before any is computed, so the shards are
planned up front (`plan_shards`: greedy in the given order, a new shard when the next tensor would
push the current one past ``max_shard_size``; a tensor larger than the limit gets a shard of its
own, as `transformers` does). Each shard file is then written front to back: its header (all
offsets known from the plan) and the tensors' bytes as they are produced, block by block
(`ShardWriter`), so no shard is ever held in memory. The format is the safetensors one: an 8-byte
little-endian header length, a JSON header padded with spaces to a multiple of 8 bytes (with
``"__metadata__": {"format": "pt"}``, which `transformers` requires), then the tensors' bytes
back to back in header order.

File names follow ``save_pretrained``: one shard is ``model.safetensors`` with no index; several
are ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json`` holding
``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Callable, NamedTuple, Sequence

import numpy as np

from cljax.merge_io import safetensors_reader

INDEX_NAME = safetensors_reader.INDEX_NAME
_UNITS = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12,
          'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}


def parse_size(size: 'str | int') -> int:
  """A byte count from an int or a string such as ``'5GB'``, ``'500MB'``, ``'2GiB'``, ``'1000'``.

  Units as in `transformers`: KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of 2.

  Raises:
    ValueError: not a positive size (the error quotes the input).
  """
  if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
    value = int(size)
  else:
    match = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*', str(size))
    if not match or match.group(2).upper() not in _UNITS:
      raise ValueError(f"max shard size must look like '5GB', '500MB', '2GiB' or a byte count; "
                       f'got {size!r}')
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
  if value <= 0:
    raise ValueError(f'max shard size must be positive; got {size!r}')
  return value


class TensorSpec(NamedTuple):
  """An output tensor: name, NumPy dtype (ml_dtypes for bfloat16) and shape."""

  name: str
  dtype: np.dtype
  shape: tuple

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class ShardPlan(NamedTuple):
  """One output file: its name and the tensors it holds, in write order."""

  filename: str
  tensors: tuple

  @property
  def nbytes(self) -> int:
    return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: Sequence[TensorSpec], max_shard_size: 'str | int') -> list:
  """Splits tensors (in order) into shards of at most ``max_shard_size`` bytes of tensor data.

  Args:
    tensors: the output tensors, in the order they will be written.
    max_shard_size: bytes or a string for `parse_size`.

  Returns:
    A list of `ShardPlan` with Hugging Face file names.

  Raises:
    ValueError: a bad size, no tensors, or a duplicate name.
  """
  limit = parse_size(max_shard_size)
  if not tensors:
    raise ValueError('nothing to write: the checkpoint has no tensors')
  names = [t.name for t in tensors]
  if len(set(names)) != len(names):
    raise ValueError(f'duplicate tensor name {next(n for n in names if names.count(n) > 1)!r}')
  groups, current, current_size = [], [], 0
  for t in tensors:
    if current and current_size + t.nbytes > limit:
      groups.append(current)
      current, current_size = [], 0
    current.append(t)
    current_size += t.nbytes
  groups.append(current)
  if len(groups) == 1:
    return [ShardPlan(safetensors_reader.SINGLE_NAME, tuple(groups[0]))]
  n = len(groups)
  return [ShardPlan(f'model-{i + 1:05d}-of-{n:05d}.safetensors', tuple(g))
          for i, g in enumerate(groups)]


def _header_bytes(plan: ShardPlan) -> bytes:
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for t in plan.tensors:
    header[t.name] = {'dtype': safetensors_reader.DTYPE_NAMES[np.dtype(t.dtype)],
                      'shape': [int(d) for d in t.shape],
                      'data_offsets': [offset, offset + t.nbytes]}
    offset += t.nbytes
  raw = json.dumps(header, separators=(',', ':')).encode('utf-8')
  raw += b' ' * (-len(raw) % 8)
  return len(raw).to_bytes(8, 'little') + raw


class ShardWriter:
  """Writes one planned shard front to back; use as a context manager.

  Call `write` with each tensor's data, in plan order, whole or in consecutive row blocks (C
  order). Closing checks that every planned byte was written, so a short shard is an error rather
  than a corrupt file.
  """

  def __init__(self, folder: str, plan: ShardPlan):
    if sys.byteorder != 'little':
      raise RuntimeError('safetensors files are little-endian; this machine is not')
    self.path = os.path.join(folder, plan.filename)
    self._tensors = plan.tensors
    self._left = [t.nbytes for t in plan.tensors]   # bytes still due, per tensor
    self._i = 0                                      # the tensor being written
    self._file = open(self.path, 'xb')
    self._file.write(_header_bytes(plan))

  def write(self, name: str, block: np.ndarray) -> None:
    """Appends ``block`` (the next rows of tensor ``name``, in its planned dtype).

    Raises:
      ValueError: ``name`` is not the tensor due next, a wrong dtype or row shape, or more bytes
        than planned.
    """
    while (self._i < len(self._tensors) and not self._left[self._i]
           and self._tensors[self._i].name != name):
      self._i += 1
    if self._i >= len(self._tensors) or self._tensors[self._i].name != name:
      raise ValueError(f'{self.path}: got tensor {name!r} out of the planned order')
    spec = self._tensors[self._i]
    if np.dtype(block.dtype) != np.dtype(spec.dtype):
      raise ValueError(f'{self.path}: tensor {name!r} planned as {np.dtype(spec.dtype)}, got '
                       f'{block.dtype}')
    if block.ndim != len(spec.shape) or tuple(block.shape[1:]) != tuple(spec.shape[1:]):
      raise ValueError(f'{self.path}: tensor {name!r} has shape {tuple(spec.shape)}; got a block '
                       f'of shape {block.shape}')
    data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
    if data.size > self._left[self._i]:
      raise ValueError(f'{self.path}: tensor {name!r} got more than its {spec.nbytes} bytes')
    self._file.write(data)
    self._left[self._i] -= data.size

  def close(self) -> None:
    """Closes the file.

    Raises:
      ValueError: a planned tensor was not (fully) written.
    """
    self._file.close()
    unfinished = [t.name for t, left in zip(self._tensors, self._left) if left]
    if unfinished:
      raise ValueError(f'{self.path}: tensor {unfinished[0]!r} was not fully written')

  def __enter__(self) -> 'ShardWriter':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self._file.close()


def write_index(folder: str, plans: Sequence[ShardPlan]) -> None:
  """Writes ``model.safetensors.index.json`` for several shards (nothing for one).

  The index has ``metadata.total_size`` (bytes of tensor data over all shards) and a
  ``weight_map`` naming every tensor's shard file.
  """
  if len(plans) < 2:
    return
  index = {'metadata': {'total_size': sum(p.nbytes for p in plans)},
           'weight_map': {t.name: p.filename for p in plans for t in p.tensors}}
  with open(os.path.join(folder, INDEX_NAME), 'x') as f:
    json.dump(index, f, indent=2)
    f.write('\n')


def write_checkpoint(folder: str, specs: Sequence[TensorSpec], produce: Callable[[str], np.ndarray],
                     max_shard_size: 'str | int' = '5GB') -> list:
  """Writes tensors as a Hugging Face safetensors folder (shards + index), one tensor at a time.

  ``produce(name)`` is called once per tensor, when it is written, so memory never holds more
  than one tensor (e.g. ``produce=tensors.__getitem__`` for a dict, or a generator of random
  weights for a benchmark).

  Args:
    folder: an existing folder (the shard and index files must not exist yet).
    specs: every tensor's `TensorSpec`, in write order.
    produce: name -> array of that spec's shape and dtype.
    max_shard_size: shard size limit, bytes or e.g. '5GB'.

  Returns:
    The `ShardPlan` s written.

  Raises:
    ValueError: a produced array of the wrong dtype or size (naming the tensor and file).
  """
  plans = plan_shards(specs, max_shard_size)
  for plan in plans:
    with ShardWriter(folder, plan) as writer:
      for spec in plan.tensors:
        writer.write(spec.name, np.asarray(produce(spec.name)))
  write_index(folder, plans)
  return plans
