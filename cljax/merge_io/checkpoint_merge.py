"""`cljax-merge`'s engine: out-of-core merging of safetensors or Orbax checkpoints into HF folders.

`merge_checkpoints` merges tensor by tensor, and large tensors block by block (rows of at most
``block_entries`` entries), across the base and every model: each block is read from every model
(`cljax.merge_io.safetensors_reader`, upcast to float32), merged by the library call its
`cljax.merge_io.recipes.Recipe` names, cast to the output dtype and appended to its shard
(`cljax.merge_io.safetensors_writer`). No model is ever loaded whole: memory holds one block per
model, the merged block and the library's temporaries, with three exceptions: per-tensor TIES holds
the tensor being merged from every model (its thresholds need the whole tensor, and holding it
reads the disk once), continual TIES and OPCM merge whole tensors (one model at a time), and an
Orbax input holds the tensor being read whole (Orbax stores it as one chunk; see
`cljax.merge_io.safetensors_reader.OrbaxCheckpoint`).
Passes over the data:

  * TIES with ``trim: global``: two passes first for each model's exact threshold over the whole
    model (`cljax.merge_io.magnitude_select`); with ``per_tensor`` trim, the same selection runs on
    the held tensor just before it is merged (and, for mergekit's exact top k, a count of the
    entries tied at each threshold per row block, `_tie_quotas`).
  * DARE with ``rescale: l1``: a first pass over each tensor's blocks sums every model's
    ||tau_i||_1 and ||drop(tau_i)||_1 (the same masks), the second merges.
  * OPCM: a first pass runs the continual merge on every tensor for the whole-model norms, the
    second repeats it and writes ``base + A / lambda``.
  * Everything else: one pass.

Tensors that are not merged keep the base's values: those matching ``exclude`` (regexes over
tensor names, `re.fullmatch`; a pattern matching nothing is an error), non-floating ones (integer
buffers) and empty ones. Every model must hold the base's tensor names and shapes (the error names
the first tensor that differs); floating dtypes may differ (everything is computed in float32).

The output is written into a fresh temporary folder beside the target (``.NAME.tmp-*``) and renamed
into place only when complete, so a failed or interrupted merge leaves no output folder (a
``kill -9`` may leave the hidden temporary folder, never a half-written ``NAME``). An existing
target is never overwritten unless ``force``; then it is replaced only after the new merge
succeeded. The target gets the shards, the index (when sharded), the base model's config and
tokenizer files (``torch_dtype`` updated when ``dtype`` is given) and, when given, the config text
as ``cljax_merge.yml``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import logging
import math
import os
import platform
import re
import shutil
import tempfile
import time
from typing import Iterator, NamedTuple, Optional, Sequence

import jax
import ml_dtypes
import numpy as np
import optax
from tqdm.auto import tqdm

from cljax.merge_io import magnitude_select
from cljax.merge_io import mergekit_config
from cljax.merge_io import recipes
from cljax.merge_io import safetensors_reader
from cljax.merge_io import safetensors_writer

DEFAULT_BLOCK_ENTRIES = 1 << 21
OUTPUT_DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16),
                 'float16': np.dtype(np.float16)}
COPIED_FILES = ('config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json',
                'special_tokens_map.json', 'added_tokens.json', 'tokenizer.model', 'vocab.json',
                'vocab.txt', 'merges.txt', 'spiece.model', 'sentencepiece.bpe.model',
                'chat_template.jinja', 'chat_template.json', 'preprocessor_config.json')
CONFIG_COPY_NAME = 'cljax_merge.yml'

_log = logging.getLogger(__name__)


class MergeSummary(NamedTuple):
  """What `merge_checkpoints` did.

  Attributes:
    output: the output folder.
    recipe: the library call(s) each block went through.
    num_tensors: tensors written.
    num_merged: tensors merged (the rest kept the base's values).
    num_parameters: entries written.
    input_bytes: bytes of tensors read in the merge pass (base and models).
    output_bytes: bytes of tensors written.
    num_shards: safetensors files written.
    seconds: wall time.
  """

  output: str
  recipe: str
  num_tensors: int
  num_merged: int
  num_parameters: int
  input_bytes: int
  output_bytes: int
  num_shards: int
  seconds: float


class _Inputs(NamedTuple):
  base: safetensors_reader.Checkpoint
  models: list
  merged: set            # names of the tensors that are merged


# ------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------


def _check_same_tensors(base: safetensors_reader.Checkpoint,
                        models: Sequence[safetensors_reader.Checkpoint]) -> None:
  """Every model holds the base's tensor names and shapes (errors name the tensor)."""
  for model in models:
    for name, info in base.tensors.items():
      other = model.tensors.get(name)
      if other is None:
        raise ValueError(f'tensor {name!r} is in the base model {base.path} but not in '
                         f'{model.path}')
      if other.shape != info.shape:
        raise ValueError(f'tensor {name!r} has shape {other.shape} in {model.path} but '
                         f'{info.shape} in the base model {base.path}')
      if safetensors_reader.is_floating(other.dtype) != safetensors_reader.is_floating(info.dtype):
        raise ValueError(f'tensor {name!r} has dtype {other.dtype} in {model.path} but '
                         f'{info.dtype} in the base model {base.path}')
    extra = [n for n in model.tensors if n not in base.tensors]
    if extra:
      raise ValueError(f'tensor {extra[0]!r} is in {model.path} but not in the base model '
                       f'{base.path}')


def _excluded(names: Sequence[str], exclude: Sequence[str]) -> set:
  """Names matching any pattern (`re.fullmatch`); a pattern matching nothing is an error."""
  excluded = set()
  for pattern in exclude:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f'exclude pattern {pattern!r} is not a valid regex: {e}') from e
    hits = {n for n in names if regex.fullmatch(n)}
    if not hits:
      examples = ', '.join(repr(n) for n in list(names)[:5])
      raise ValueError(f'exclude pattern {pattern!r} matches no tensor (matched with re.fullmatch '
                       f'against names such as {examples})')
    excluded |= hits
  return excluded


def _open_inputs(config: mergekit_config.MergeConfig, exclude: Sequence[str]) -> _Inputs:
  base = safetensors_reader.open_checkpoint(config.base_model)
  models = [safetensors_reader.open_checkpoint(m.path) for m in config.models]
  _check_same_tensors(base, models)
  excluded = _excluded(list(base.tensors), exclude)
  merged = {n for n, info in base.tensors.items()
            if n not in excluded and info.size and safetensors_reader.is_floating(info.dtype)}
  return _Inputs(base, models, merged)


def _check_output(output: str, inputs: _Inputs, force: bool) -> str:
  final = os.path.abspath(os.path.expanduser(output))
  for ckpt in [inputs.base] + inputs.models:
    inside = os.path.commonpath([final, ckpt.path])
    if inside in (final, ckpt.path):
      raise ValueError(f'output {final} overlaps the input {ckpt.path}; write elsewhere')
  if os.path.lexists(final):
    if not force:
      raise FileExistsError(f'{final} already exists; cljax-merge never overwrites it (pass '
                            f'--force to replace it once the new merge has succeeded)')
    if not os.path.isdir(final) or os.path.islink(final):
      raise FileExistsError(f'{final} exists and is not a folder; not replacing it')
  return final


# ------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------


def _row_blocks(shape: tuple, block_entries: int, blockwise: bool) -> list:
  """[(start, stop)] row ranges of at most ``block_entries`` entries (whole rows); [(None, None)]
  for a 0-d tensor or when the merge needs whole tensors."""
  if not shape or not blockwise:
    return [(None, None)]
  row = int(np.prod(shape[1:], dtype=np.int64))
  rows = max(1, block_entries // max(row, 1))
  return [(r, min(r + rows, shape[0])) for r in range(0, shape[0], rows)] or [(0, 0)]


class _Source:
  """One model's tensor, read block by block from disk, or held whole (blocks are then views).

  Attributes:
    bytes_read: bytes read from disk so far (stored dtype).
  """

  def __init__(self, ckpt: safetensors_reader.Checkpoint, name: str, *,
               whole_blocks: Optional[list] = None, is_base: bool = False):
    self.ckpt, self.name, self.is_base = ckpt, name, is_base
    self._data = None
    self.bytes_read = 0
    if whole_blocks is not None and ckpt.holds_whole_tensors:   # Orbax: held anyway, no copy
      self._data = ckpt.read(name)
      self.bytes_read = self._data.nbytes
    elif whole_blocks is not None:   # read block by block into one array: a whole-tensor read
      info = ckpt.tensors[name]      # would map all its file pages at once (counted in RSS)
      self._data = np.empty(info.shape, info.dtype)
      for rows in whole_blocks:
        if rows[0] is None:
          self._data[...] = ckpt.read(name)
        else:
          self._data[rows[0]:rows[1]] = ckpt.read(name, *rows)
      self.bytes_read = self._data.nbytes

  def rows(self, rows: tuple) -> np.ndarray:
    """Rows ``[start, stop)`` (or everything for (None, None)), upcast to float32.

    Raises:
      ValueError: NaN or Inf in the rows (naming this model's folder and the tensor).
    """
    if self._data is not None:
      x = self._data if rows[0] is None else self._data[rows[0]:rows[1]]
    else:
      x = self.ckpt.read(self.name, *rows)
      self.bytes_read += x.nbytes
    x = x.astype(np.float32, copy=False)
    _check_finite(x, self.name, self.ckpt.path, is_base=self.is_base)
    return x


def _sources(inputs: _Inputs, name: str, whole_blocks: Optional[list] = None) -> tuple:
  """The base's and the models' `_Source` of a tensor (held whole if ``whole_blocks``)."""
  return (_Source(inputs.base, name, whole_blocks=whole_blocks, is_base=True),
          [_Source(m, name, whole_blocks=whole_blocks) for m in inputs.models])


def _check_finite(x: np.ndarray, name: str, path: str, *, is_base: bool = False) -> None:
  """Raises naming the model (``path``; "the base model" for the base) and the tensor."""
  if not np.isfinite(x).all():
    which = f'the base model {path}' if is_base else path
    raise ValueError(f'{which} has non-finite values in tensor {name!r} '
                     f'({int(np.isnan(x).sum())} NaN, {int(np.isinf(x).sum())} Inf); refusing to '
                     'merge it')


# ------------------------------------------------------------------------------------------
# TIES thresholds
# ------------------------------------------------------------------------------------------


def _selectors(densities: Sequence[float], size: int, selection: str = 'threshold') -> list:
  return [magnitude_select.KthLargestMagnitude(
      magnitude_select.keep_count(d, size, selection), size) for d in densities]


def _tie_quotas(selectors: list, thresholds: tuple, base_src, model_srcs, blocks: list) -> list:
  """mergekit's exact top k per tensor: per row block, per model, how many entries with
  |tau_i| equal to the threshold t_i the block keeps. The k - #{|tau_i| > t_i} tied entries kept
  are the first in row-major order of the tensor (block by block, then within the block)."""
  remaining = [s.k - s.greater() if s.needs_data else 0 for s in selectors]
  quotas = []
  for rows in blocks:
    base = base_src.rows(rows)
    block = []
    for i, (m, t) in enumerate(zip(model_srcs, thresholds)):
      if not selectors[i].needs_data:   # k <= 0: nothing kept; k > size: everything
        block.append(0 if selectors[i].k <= 0 else base.size)
        continue
      ties = int(np.count_nonzero(np.abs(m.rows(rows) - base) == np.float32(t)))
      block.append(min(ties, remaining[i]))
      remaining[i] -= block[-1]
    quotas.append(tuple(block))
  return quotas


def _task_vector_blocks(items: Sequence[tuple]) -> Iterator:
  """(name, [tau_i block], model sources, bytes) per (name, base, model sources, rows) item."""
  for name, base, models, rows in items:
    b = base.rows(rows)
    yield name, [m.rows(rows) - b for m in models], models, b.nbytes * (len(models) + 1)


def _select_thresholds(selectors: list, items: Sequence[tuple], bar=None) -> tuple:
  """Both radix passes of every model's selector over ``items`` (see `_task_vector_blocks`)."""
  if any(s.needs_data for s in selectors):
    for name, tvs, models, nbytes in _task_vector_blocks(items):
      for select, tv, model in zip(selectors, tvs, models):
        _check_finite(tv, name, model.ckpt.path)
        select.add_high(tv)
      if bar is not None:
        bar.update(nbytes)
    for select in selectors:
      select.finish_high()
    for _, tvs, _, nbytes in _task_vector_blocks(items):
      for select, tv in zip(selectors, tvs):
        select.add_low(tv)
      if bar is not None:
        bar.update(nbytes)
  return tuple(s.threshold() for s in selectors)


def _global_thresholds(recipe: recipes.Recipe, inputs: _Inputs, order: list,
                       block_entries: int, progress: bool) -> tuple:
  """Each model's threshold over every merged tensor (two passes, block by block)."""
  names = [n for n in order if n in inputs.merged]
  size = sum(inputs.base.tensors[n].size for n in names)
  items = []
  for name in names:
    base, models = _sources(inputs, name)
    items += [(name, base, models, rows)
              for rows in _row_blocks(inputs.base.tensors[name].shape, block_entries, True)]
  total = 2 * sum(inputs.base.tensors[n].size * 4 * (len(inputs.models) + 1) for n in names)
  with tqdm(total=total, unit='B', unit_scale=True, desc='global TIES thresholds',
            disable=not progress, dynamic_ncols=True) as bar:
    return _select_thresholds(_selectors(recipe.densities, size), items, bar)


# ------------------------------------------------------------------------------------------
# OPCM's whole-model rescaling
# ------------------------------------------------------------------------------------------


def _continual_state(recipe: recipes.Recipe, inputs: _Inputs, name: str, rows: tuple,
                     norms: Optional[np.ndarray] = None):
  """Runs init / update over the models on one block; optionally adds each ||tau_i||^2."""
  base = inputs.base.read(name, *rows).astype(np.float32, copy=False)
  _check_finite(base, name, inputs.base.path, is_base=True)
  state = recipe.continual.init({name: base})
  for i, model in enumerate(inputs.models):
    x = model.read(name, *rows).astype(np.float32, copy=False)
    _check_finite(x, name, model.path)
    if norms is not None:
      tv = (x - base).astype(np.float64)
      norms[i] += float(np.dot(tv.reshape(-1), tv.reshape(-1)))
    state = recipe.continual.update(state, {name: x})
  return base, state


def _opcm_scale(recipe: recipes.Recipe, inputs: _Inputs, order: list, progress: bool) -> float:
  """mean_i ||tau_i|| / ||A||, the norms over every merged tensor (OPCM's 1 / lambda_t)."""
  norms = np.zeros(len(inputs.models))
  merged_sq = 0.0
  names = [n for n in order if n in inputs.merged]
  for name in tqdm(names, desc='OPCM norms', disable=not progress, dynamic_ncols=True):
    _, state = _continual_state(recipe, inputs, name, (None, None), norms)
    a = np.asarray(state.projected_sum[name], np.float64).reshape(-1)
    merged_sq += float(np.dot(a, a))
  mean_norm = float(np.mean(np.sqrt(norms)))
  return mean_norm / math.sqrt(merged_sq) if merged_sq > 0 else 0.0


@jax.jit
def _base_plus(base, tv, scale):
  return optax.tree.add_scale(base, scale, tv).astype(base.dtype)


# ------------------------------------------------------------------------------------------
# The merge pass
# ------------------------------------------------------------------------------------------


def _merge_tensor(recipe: recipes.Recipe, inputs: _Inputs, name: str, out_dtype: np.dtype,
                  writer: safetensors_writer.ShardWriter, *, block_entries: int, seed: int,
                  thresholds: Optional[tuple], opcm_scale: Optional[float], bar) -> int:
  """Merges (or copies) one tensor into ``writer``; returns the bytes read from disk."""
  info = inputs.base.tensors[name]
  if name not in inputs.merged:
    read = 0
    for rows in _row_blocks(info.shape, block_entries, True):
      block = inputs.base.read(name, *rows)
      writer.write(name, block.astype(out_dtype, copy=False))
      read += block.nbytes
      bar.update(block.nbytes)
    return read
  blocks = _row_blocks(info.shape, block_entries, recipe.blockwise)
  if recipe.continual is not None:
    read = 0
    for rows in blocks:
      base, state = _continual_state(recipe, inputs, name, rows)
      if recipe.global_rescale:
        out = _base_plus(base, state.projected_sum[name], np.float32(opcm_scale))
      else:
        out = recipe.continual.params(state)[name]
      writer.write(name, np.asarray(out).astype(out_dtype, copy=False))
      nbytes = base.size * info.dtype.itemsize * (len(inputs.models) + 1)
      read += nbytes
      bar.update(nbytes)
    return read
  # Per-tensor TIES holds the tensor of every model ((n + 1) tensors, stored dtype) so that its
  # thresholds and its merge read the disk once; other merges read block by block.
  per_tensor_ties = recipe.densities is not None and recipe.trim == 'per_tensor'
  whole_blocks = _row_blocks(info.shape, block_entries, True) if per_tensor_ties else None
  base_src, model_srcs = _sources(inputs, name, whole_blocks)
  quotas = None
  if per_tensor_ties:
    items = [(name, base_src, model_srcs, rows) for rows in blocks]
    selectors = _selectors(recipe.densities, info.size, recipe.selection)
    thresholds = _select_thresholds(selectors, items)
    if recipe.selection == 'exact':
      quotas = _tie_quotas(selectors, thresholds, base_src, model_srcs, blocks)
  scales = None
  if recipe.l1_sums is not None:   # DARE's rescale: l1 needs the whole tensor's norms first
    sums = sum(recipe.l1_sums(recipes.Block(name, base_src.rows(rows),
                                            [m.rows(rows) for m in model_srcs],
                                            key=recipes.dare_key(seed, name, j)))
               for j, rows in enumerate(blocks))
    scales = recipes.l1_scales(sums)
  for j, rows in enumerate(blocks):
    base = base_src.rows(rows)
    models = [m.rows(rows) for m in model_srcs]
    key = recipes.dare_key(seed, name, j) if recipe.uses_key else None
    out = recipe.merge(recipes.Block(name, base, models, thresholds, key,
                                     None if quotas is None else quotas[j], scales))
    writer.write(name, np.asarray(out).astype(out_dtype, copy=False))
    bar.update(base.size * info.dtype.itemsize * (len(models) + 1))
  return sum(s.bytes_read for s in [base_src] + model_srcs)


def _tensor_order(base: safetensors_reader.Checkpoint) -> list:
  return list(base.tensors)   # storage order: shard by shard, by offset


def _output_specs(inputs: _Inputs, order: list, dtype: Optional[str]) -> list:
  specs = []
  for name in order:
    info = inputs.base.tensors[name]
    out = info.dtype
    if dtype is not None and safetensors_reader.is_floating(info.dtype):
      out = OUTPUT_DTYPES[dtype]
    specs.append(safetensors_writer.TensorSpec(name, out, info.shape))
  return specs


# ------------------------------------------------------------------------------------------
# Output folder
# ------------------------------------------------------------------------------------------


def _copy_model_files(folder: Optional[str], target: str, dtype: Optional[str]) -> None:
  """Copies the base model's config and tokenizer files; records a new dtype in config.json."""
  if folder is None:
    return
  names = list(COPIED_FILES) + [os.path.basename(p) for p in glob.glob(os.path.join(folder,
                                                                                    '*.tiktoken'))]
  for name in names:
    source = os.path.join(folder, name)
    if os.path.isfile(source):
      shutil.copyfile(source, os.path.join(target, name))
  config_file = os.path.join(target, 'config.json')
  if dtype is not None and os.path.isfile(config_file):
    with open(config_file) as f:
      model_config = json.load(f)
    model_config['torch_dtype'] = dtype
    if 'dtype' in model_config:
      model_config['dtype'] = dtype
    with open(config_file, 'w') as f:
      json.dump(model_config, f, indent=2)
      f.write('\n')


def _chmod_like_mkdir(folder: str) -> None:
  """mkdtemp makes 0700 folders; give the output the permissions mkdir would (umask)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(folder, 0o777 & ~umask)


def _move_into_place(tmp: str, final: str) -> None:
  """Renames the finished ``tmp`` to ``final``; with an existing ``final``, a recoverable swap.

  The old folder is first renamed to ``.NAME.old-*`` and removed after the new one is in place;
  a process killed between the two renames leaves ``.NAME.old-*`` and ``.NAME.tmp-*`` but no
  ``NAME``, which the next merge into ``NAME`` rolls back (`_recover_output`).
  """
  if os.path.lexists(final):   # force: swap only now that the new merge is complete
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(final)}.old-', dir=os.path.dirname(final))
    os.rmdir(old)
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, final)


def _lock_output(final: str) -> tuple:
  """Takes the exclusive lock ``.NAME.lock`` beside ``final`` (holding this pid).

  Returns:
    (file descriptor, lock path), for `_unlock_output`.

  Raises:
    ValueError: another live process holds it (naming its pid).
  """
  path = os.path.join(os.path.dirname(final), f'.{os.path.basename(final)}.lock')
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise
    try:
      with open(path) as f:
        pid = f.read().strip() or 'unknown'
    except OSError:
      pid = 'unknown'
    raise ValueError(f'{final} is being written by another cljax-merge (process {pid}, which '
                     f'holds {path}); wait for it to end or write elsewhere') from e
  os.ftruncate(fd, 0)
  os.write(fd, f'{os.getpid()}\n'.encode())
  return fd, path


def _unlock_output(lock: tuple) -> None:
  fd, path = lock
  try:
    os.remove(path)
  except FileNotFoundError:
    pass
  os.close(fd)


def _recover_output(final: str) -> list:
  """Finishes or rolls back what a killed merge into ``final`` left; returns what it did.

  Call holding `_lock_output`: every ``.NAME.tmp-*`` and ``.NAME.old-*`` beside ``final`` then
  belongs to a dead process. A ``.NAME.old-*`` without ``NAME`` (killed between the two renames
  of a forced swap) is renamed back to ``NAME``: the previous output is restored. Every other
  ``.NAME.old-*`` (the swap finished, its removal did not) and every ``.NAME.tmp-*`` (an
  unfinished merge) is removed.

  Returns:
    One line per action, for the log.
  """
  parent, name = os.path.dirname(final), os.path.basename(final)
  if not os.path.isdir(parent):
    return []
  entries = sorted(os.listdir(parent))
  olds = [os.path.join(parent, e) for e in entries if e.startswith(f'.{name}.old-')]
  tmps = [os.path.join(parent, e) for e in entries if e.startswith(f'.{name}.tmp-')]
  done = []
  if olds and not os.path.lexists(final):
    latest = max(olds, key=os.path.getmtime)
    os.rename(latest, final)
    olds.remove(latest)
    done.append(f'restored {final} from {latest}, left by a merge killed while replacing it')
  for path in olds + tmps:
    shutil.rmtree(path, ignore_errors=True)
    done.append(f'removed {path}, left by a killed merge')
  return done


def return_freed_blocks_to_os(threshold: int = 1 << 20) -> bool:
  """Makes glibc serve allocations of ``threshold`` bytes or more with mmap, freed at once.

  glibc raises its mmap threshold (up to 32 MB) whenever a large mmapped buffer is freed, after
  which block-sized arrays come from the heap and stay in the resident set after they are freed
  (fragmentation): a merge that held a 250 MB tensor for a while then grows by hundreds of MB.
  Pinning the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also stops that adjustment) keeps
  the peak at what is alive. It changes how this process allocates from then on, so the command
  line calls it and library users may; it is a no-op (False) without glibc.

  Returns:
    True if the threshold was set.
  """
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  m_mmap_threshold = -3
  return bool(ctypes.CDLL(None).mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(threshold)))


def merge_checkpoints(config: mergekit_config.MergeConfig, output: str, *,
                      dtype: Optional[str] = None, max_shard_size: 'str | int' = '5GB',
                      force: bool = False, seed: int = 0, progress: bool = True,
                      block_entries: int = DEFAULT_BLOCK_ENTRIES,
                      config_text: Optional[str] = None) -> MergeSummary:
  """Merges safetensors or Orbax checkpoints out of core into a Hugging Face folder.

  Args:
    config: the checked merge config (`cljax.merge_io.mergekit_config.load_config`).
    output: the folder to create (must not exist unless ``force``; its parent is created).
    dtype: output dtype of floating tensors ('float32', 'bfloat16', 'float16'); default the
      config's ``dtype``, else each tensor keeps the base model's dtype.
    max_shard_size: shard size limit, bytes or e.g. '5GB', '500MB'.
    force: replace an existing ``output`` (only after the new merge succeeded).
    seed: DARE's seed (see `cljax.merge_io.recipes.dare_key`).
    progress: show tqdm bars (bytes/s).
    block_entries: most entries per block of a tensor merged at once (memory vs. call overhead;
      DARE's masks depend on it, see `cljax.merge_io.recipes`).
    config_text: written to ``cljax_merge.yml`` in the output for provenance.

  Memory: one block per model, the merged block and the library's temporaries; with per-tensor
  TIES, every model's copy of the tensor being merged. Call `return_freed_blocks_to_os` first
  (the command line does) so that freed blocks leave the resident set.

  Returns:
    A `MergeSummary`.

  Raises:
    FileNotFoundError: an input path does not exist.
    FileExistsError: ``output`` exists and ``force`` is False.
    ValueError: bad config values, unreadable inputs, tensor names / shapes differing
      between models (naming the tensor), NaN/Inf in a model (naming the tensor), an exclude
      pattern matching nothing, an output overlapping an input.
  """
  start = time.time()
  dtype = dtype if dtype is not None else config.dtype
  if dtype is not None and dtype not in OUTPUT_DTYPES:
    raise ValueError(f'dtype must be one of {", ".join(OUTPUT_DTYPES)}; got {dtype!r}')
  if block_entries < 1:
    raise ValueError(f'block_entries must be >= 1; got {block_entries}')
  recipe = recipes.make_recipe(config)
  inputs = _open_inputs(config, config.exclude)
  final = _check_output(output, inputs, force)
  order = _tensor_order(inputs.base)
  plans = safetensors_writer.plan_shards(_output_specs(inputs, order, dtype), max_shard_size)
  try:
    os.makedirs(os.path.dirname(final), exist_ok=True)
    lock = _lock_output(final)
  except PermissionError as e:
    raise ValueError(f'cannot write the output {final}: {e.strerror} ({e.filename})') from e
  try:
    for line in _recover_output(final):
      _log.warning('%s', line)
    final = _check_output(output, inputs, force)   # again: a rolled-back swap restored it
    _log.info('%s of %d models -> %s: %s', config.method, len(inputs.models), final,
              recipe.description)
    read = _write_output(config, recipe, inputs, final, plans, order, dtype=dtype, seed=seed,
                         progress=progress, block_entries=block_entries, config_text=config_text)
  finally:
    _unlock_output(lock)
  specs = [t for p in plans for t in p.tensors]
  return MergeSummary(
      output=final, recipe=recipe.description, num_tensors=len(specs),
      num_merged=len(inputs.merged),
      num_parameters=sum(int(np.prod(t.shape, dtype=np.int64)) for t in specs),
      input_bytes=read, output_bytes=sum(p.nbytes for p in plans), num_shards=len(plans),
      seconds=time.time() - start)


def _write_output(config: mergekit_config.MergeConfig, recipe: recipes.Recipe, inputs: _Inputs,
                  final: str, plans: list, order: list, *, dtype: Optional[str], seed: int,
                  progress: bool, block_entries: int, config_text: Optional[str]) -> int:
  """The merge passes into a fresh ``.NAME.tmp-*`` folder renamed to ``final``; bytes read."""
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(final)}.tmp-', dir=os.path.dirname(final))
  try:
    _chmod_like_mkdir(tmp)
    thresholds = opcm_scale = None
    if recipe.densities is not None and recipe.trim == 'global':
      thresholds = _global_thresholds(recipe, inputs, order, block_entries, progress)
    if recipe.global_rescale:
      opcm_scale = _opcm_scale(recipe, inputs, order, progress)
    n = len(inputs.models) + 1
    total = sum(inputs.base.tensors[k].nbytes * (n if k in inputs.merged else 1) for k in order)
    read = 0
    with tqdm(total=total, unit='B', unit_scale=True, desc=config.method, disable=not progress,
              dynamic_ncols=True) as bar:
      for plan in plans:
        with safetensors_writer.ShardWriter(tmp, plan) as writer:
          for spec in plan.tensors:
            bar.set_postfix_str(spec.name, refresh=False)
            read += _merge_tensor(recipe, inputs, spec.name, spec.dtype, writer,
                                  block_entries=block_entries, seed=seed, thresholds=thresholds,
                                  opcm_scale=opcm_scale, bar=bar)
    safetensors_writer.write_index(tmp, plans)
    _copy_model_files(inputs.base.folder, tmp, dtype)
    if config_text is not None:
      with open(os.path.join(tmp, CONFIG_COPY_NAME), 'w') as f:
        f.write(config_text)
    _move_into_place(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return read
