"""Lazy reading of safetensors checkpoints: Hugging Face model folders and single files.

`open_checkpoint` reads only the headers: every tensor's name, file, dtype and shape. Tensors are
read on demand, whole or a range of rows (slices of the leading axis), with `safetensors.safe_open`
(``framework='numpy'``). Each read opens the file, copies the requested bytes into a fresh NumPy
array and closes the file again: a memory map kept open would count every page read so far in the
process's resident set, so reading a model tensor by tensor would look like loading all of it.

Layouts accepted:

  * a folder with ``model.safetensors.index.json`` (sharded, ``model-0000x-of-0000y.safetensors``):
    the index's ``weight_map`` says which shard holds each tensor, and every shard's header must
    agree with it;
  * a folder with ``model.safetensors``, or with ``*.safetensors`` files and no index (their union;
    a name in two files is an error);
  * a single ``.safetensors`` file.

  * an Orbax PyTree checkpoint (`OrbaxCheckpoint`): a folder written by
    ``orbax.checkpoint.PyTreeCheckpointer().save`` or ``StandardCheckpointer().save``, one step
    of a `cljax.checkpoint.StageCheckpointer` (``<dir>/<step>``, whose ``state`` item is read),
    or that step's item folder (``<dir>/<step>/state``). Tensor names are the '/'-joined pytree
    paths (`cljax.tree.path_str`), e.g. ``params/Dense_0/kernel``; non-array leaves (strings)
    are left out. Each tensor is restored alone through `cljax.checkpoint.PyTreeArrays` (the
    only module that imports Orbax, imported here only when an Orbax checkpoint is opened).

bfloat16 (and float8) tensors come back as `ml_dtypes` NumPy dtypes (safetensors' NumPy backend
and Orbax both use them), so nothing is converted on read.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, NamedTuple, Optional

import ml_dtypes
import numpy as np
import safetensors
from safetensors import safe_open

INDEX_NAME = 'model.safetensors.index.json'
SINGLE_NAME = 'model.safetensors'

# safetensors dtype names <-> NumPy dtypes (ml_dtypes for the types NumPy lacks).
DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2), 'I64': np.dtype(np.int64),
    'I32': np.dtype(np.int32), 'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8),
    'U64': np.dtype(np.uint64), 'U32': np.dtype(np.uint32), 'U16': np.dtype(np.uint16),
    'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ORBAX_MARKERS = ('_CHECKPOINT_METADATA', '_METADATA', 'manifest.ocdbt', 'checkpoint')


class TensorInfo(NamedTuple):
  """Where a tensor lives and what it is.

  Attributes:
    file: absolute path of the .safetensors file holding it.
    dtype: its NumPy dtype (ml_dtypes for bfloat16 / float8).
    shape: its shape, a tuple of ints.
  """

  file: str
  dtype: np.dtype
  shape: tuple

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize


def is_floating(dtype: np.dtype) -> bool:
  """True for float64/32/16, bfloat16 and float8 dtypes (the ones a merge may touch)."""
  return np.dtype(dtype) in (DTYPES['F64'], DTYPES['F32'], DTYPES['F16'], DTYPES['BF16'],
                             DTYPES['F8_E4M3'], DTYPES['F8_E5M2'])


class Checkpoint:
  """A safetensors checkpoint opened lazily; see `open_checkpoint`.

  Attributes:
    path: the folder or file it was opened from (absolute).
    folder: the model folder (config and tokenizer files live here), or None for a lone file.
    tensors: name -> `TensorInfo`, in storage order (shard by shard, by offset within a shard).
    holds_whole_tensors: False: every `read` reads just the rows asked for from disk.
  """

  holds_whole_tensors = False

  def __init__(self, path: str, folder: Optional[str], tensors: Mapping[str, TensorInfo]):
    self.path = path
    self.folder = folder
    self.tensors = dict(tensors)

  def __repr__(self) -> str:
    return f'Checkpoint({self.path!r}, {len(self.tensors)} tensors)'

  def read(self, name: str, start: Optional[int] = None, stop: Optional[int] = None) -> np.ndarray:
    """Reads a tensor, or rows ``[start, stop)`` of its leading axis, into a new NumPy array.

    Args:
      name: the tensor's name.
      start, stop: optional row range (both or neither); a 0-d tensor is always read whole.

    Returns:
      An array of the stored dtype: the tensor's shape, or ``(stop - start, *shape[1:])``.

    Raises:
      KeyError: no tensor of that name (the error names the checkpoint).
    """
    if name not in self.tensors:
      raise KeyError(f'{self.path} has no tensor {name!r}')
    info = self.tensors[name]
    with safe_open(info.file, framework='numpy') as f:
      if start is None or not info.shape:
        return f.get_tensor(name)
      return f.get_slice(name)[start:stop]


class OrbaxCheckpoint(Checkpoint):
  """An Orbax PyTree checkpoint opened lazily; see `open_checkpoint`.

  Orbax stores an array as one chunk, so a range of rows cannot be read without decoding the
  whole array: `read` restores the whole tensor alone (`cljax.checkpoint.PyTreeArrays.read`)
  and keeps it, read-only, until another tensor is read, so that the blocks of one tensor cost
  one restore. At most one tensor of the checkpoint is held at a time.

  Attributes:
    path: the folder it was opened from (absolute).
    folder: None (an Orbax checkpoint has no config or tokenizer files to copy).
    tensors: name -> `TensorInfo` (``file``: the PyTree item folder), in pytree flattening
      order.
    holds_whole_tensors: True: the tensor being read is held whole (see above).
  """

  holds_whole_tensors = True

  def __init__(self, path: str, arrays):
    """Wraps ``arrays``, a `cljax.checkpoint.PyTreeArrays`, opened from ``path``.

    Raises:
      ValueError: an array of a dtype cljax-merge cannot handle (naming the folder and array).
    """
    tensors = {}
    for name, info in arrays.arrays.items():
      if info.dtype not in DTYPE_NAMES:
        raise ValueError(f'{arrays.directory}: array {name!r} has dtype {info.dtype}, which '
                         f'cljax-merge cannot read (supported: '
                         f'{", ".join(str(d) for d in DTYPE_NAMES)})')
      tensors[name] = TensorInfo(arrays.directory, info.dtype, info.shape)
    super().__init__(path, None, tensors)
    self._arrays = arrays
    self._held = (None, None)

  def __repr__(self) -> str:
    return f'OrbaxCheckpoint({self.path!r}, {len(self.tensors)} tensors)'

  def read(self, name: str, start: Optional[int] = None, stop: Optional[int] = None) -> np.ndarray:
    """Reads a tensor, or rows ``[start, stop)`` of its leading axis (see `Checkpoint.read`).

    Returns:
      A read-only array of the stored dtype (a view of the held tensor).

    Raises:
      KeyError: no tensor of that name (the error names the checkpoint).
      ValueError: Orbax cannot restore it (naming the folder and the tensor).
    """
    if name not in self.tensors:
      raise KeyError(f'{self.path} has no tensor {name!r}')
    if self._held[0] != name:
      self._held = (None, None)   # drop the previous tensor before restoring the next
      x = self._arrays.read(name)
      x.setflags(write=False)
      self._held = (name, x)
    x = self._held[1]
    if start is None or not x.shape:
      return x
    return x[start:stop]


def _is_orbax(path: str) -> bool:
  """An Orbax checkpoint's files in ``path``, or ``path`` is a checkpoint manager's root (numbered
  step folders holding them)."""
  def marked(folder):
    return any(os.path.exists(os.path.join(folder, m)) for m in _ORBAX_MARKERS)
  if not os.path.isdir(path):
    return False
  return marked(path) or any(e.isdigit() and marked(os.path.join(path, e))
                             for e in os.listdir(path))


def _open_orbax(path: str) -> OrbaxCheckpoint:
  from cljax import checkpoint   # imports Orbax: only when an Orbax checkpoint is read
  return OrbaxCheckpoint(path, checkpoint.PyTreeArrays(path))


def _header(file: str) -> dict:
  """name -> TensorInfo of one .safetensors file, in offset order (reads only the header)."""
  try:
    with safe_open(file, framework='numpy') as f:
      names = list(f.keys())
      entries = {}
      for name in names:
        sl = f.get_slice(name)
        dtype_name = sl.get_dtype()
        if dtype_name not in DTYPES:
          raise ValueError(f'{file}: tensor {name!r} has dtype {dtype_name}, which cljax-merge '
                           f'cannot read (supported: {", ".join(DTYPES)})')
        entries[name] = TensorInfo(file, DTYPES[dtype_name], tuple(int(d) for d in sl.get_shape()))
  except (OSError, safetensors.SafetensorError) as e:
    raise ValueError(f'{file} is not a readable safetensors file: {e}') from e
  return entries


def _offsets_order(file: str, names: list) -> list:
  """names sorted by their byte offset in ``file`` (storage order), from the JSON header."""
  with open(file, 'rb') as f:
    size = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(size))
  return sorted(names, key=lambda n: header[n]['data_offsets'][0])


def _from_files(path: str, folder: Optional[str], files: list) -> Checkpoint:
  tensors = {}
  for file in files:
    entries = _header(file)
    for name in _offsets_order(file, list(entries)):
      if name in tensors:
        raise ValueError(f'{path}: tensor {name!r} is in both {tensors[name].file} and {file}')
      tensors[name] = entries[name]
  return Checkpoint(path, folder, tensors)


def _from_index(folder: str) -> Checkpoint:
  index_file = os.path.join(folder, INDEX_NAME)
  try:
    with open(index_file) as f:
      weight_map = json.load(f)['weight_map']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{index_file} is not a valid safetensors index (needs a "weight_map" '
                     f'object): {e}') from e
  shards = list(dict.fromkeys(weight_map.values()))
  for shard in shards:
    if not os.path.isfile(os.path.join(folder, shard)):
      raise FileNotFoundError(f'{index_file} names the shard {shard}, which is not in {folder}')
  checkpoint = _from_files(folder, folder, [os.path.join(folder, s) for s in shards])
  for name, shard in weight_map.items():
    info = checkpoint.tensors.get(name)
    if info is None or os.path.basename(info.file) != shard:
      raise ValueError(f'{index_file} maps tensor {name!r} to {shard}, but that shard does not '
                       f'hold it')
  extra = [n for n in checkpoint.tensors if n not in weight_map]
  if extra:
    raise ValueError(f'{index_file} does not list tensor {extra[0]!r} held by '
                     f'{checkpoint.tensors[extra[0]].file}')
  return checkpoint


def open_checkpoint(path: str) -> Checkpoint:
  """Opens a Hugging Face model folder, a .safetensors file or an Orbax PyTree checkpoint without
  reading any tensor.

  Args:
    path: a folder (with ``model.safetensors.index.json``, ``model.safetensors`` or other
      ``*.safetensors`` files), a ``.safetensors`` file, or an Orbax checkpoint folder (see the
      module docstring; safetensors files take precedence in a folder holding both).

  Returns:
    A `Checkpoint` (an `OrbaxCheckpoint` for Orbax).

  Raises:
    FileNotFoundError: ``path`` does not exist (a Hub name must be downloaded first), or a shard
      named by the index is missing.
    ValueError: a folder without safetensors weights that is no Orbax checkpoint (e.g. only
      ``pytorch_model.bin``), an unreadable file, an index that disagrees with its shards, a tensor
      stored twice, an unsupported dtype, an unreadable, unfinished or ambiguous Orbax checkpoint
      (a checkpoint manager's root folder: the error names a step folder to use instead); the
      error names the file or folder.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist (cljax-merge reads local folders and files; '
                            f'download Hub models first, e.g. with `huggingface-cli download`)')
  if os.path.isfile(path):
    return _from_files(path, None, [path])
  if os.path.isfile(os.path.join(path, INDEX_NAME)):
    return _from_index(path)
  if os.path.isfile(os.path.join(path, SINGLE_NAME)):
    return _from_files(path, path, [os.path.join(path, SINGLE_NAME)])
  files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith('.safetensors'))
  if files:
    return _from_files(path, path, files)
  if _is_orbax(path):
    return _open_orbax(path)
  raise ValueError(f'{path} holds no .safetensors weights (PyTorch .bin checkpoints are not read; '
                   f'convert them to safetensors first)')
