"""Stage checkpoints with Orbax: one step per completed task (or merged model), and resume.

This is the only module that imports Orbax. A stage holds a pytree ``state`` (params, optimizer
state, method state, PRNG key data: anything with fixed shapes known before restoring) and a JSON
``meta`` dict (accuracy-matrix rows so far, wall time, the config). Orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save leaves no partial step
that a resume could pick up.

`PyTreeArrays` reads the arrays of any Orbax PyTree checkpoint one at a time (for `cljax-merge`):
a folder written by ``PyTreeCheckpointer`` / ``StandardCheckpointer``, or one step of a
`StageCheckpointer` (its ``state`` item). Arrays are named by their '/'-joined pytree paths, as
`cljax.tree.path_str` writes them.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Optional

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from cljax import tree as tree_lib

PyTree = Any


class Stage(NamedTuple):
  """A restored stage: ``step`` (completed tasks), the ``state`` pytree and the ``meta`` dict."""

  step: int
  state: PyTree
  meta: dict


class StageCheckpointer:
  """Saves and restores stages under ``directory`` (one Orbax step per stage, all kept).

  Use as a context manager, or call `close`; saves are synchronous so a stage is complete on disk
  when `save` returns.

  Args:
    directory: the folder of the numbered stage folders (created if missing).
    name: what the stages belong to (a method's name), for error messages.
  """

  def __init__(self, directory: str, *, name: Optional[str] = None):
    self._name = name
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                             enable_async_checkpointing=False),
        item_names=('state', 'meta'),
    )

  def latest_step(self) -> Optional[int]:
    """The last completed stage, or None if there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any]) -> None:
    """Writes stage ``step``; refuses to overwrite an existing one.

    Raises:
      FileExistsError: the stage already exists (nothing is overwritten).
    """
    if step in self._manager.all_steps():
      raise FileExistsError(f'stage {step} already exists in {self._manager.directory}; '
                            'refusing to overwrite it')
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))))
    self._manager.wait_until_finished()

  def restore(self, step: int, target: PyTree) -> Stage:
    """Restores stage ``step`` into the structure, shapes and dtypes of ``target``.

    Args:
      step: the stage (a step `latest_step` or `save` named).
      target: a pytree of arrays (or ``jax.ShapeDtypeStruct``) of the state's layout.

    Returns:
      The `Stage`.

    Raises:
      ValueError: the stage's files are damaged (truncated, garbled or missing array data or
        metadata): "stage N of method M is damaged: <folder>; delete that folder to recompute
        it"; or its stored arrays, intact, do not match ``target`` (another model or method).
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      meta = restored['meta']
      if not isinstance(meta, Mapping):
        raise ValueError(f'meta is a {type(meta).__name__}, not a JSON object')
    except Exception as e:   # Orbax and TensorStore raise many types for damaged files
      mismatch = self._mismatch(step, abstract)
      if mismatch:
        raise ValueError(f'checkpoint {self.step_directory(step)} does not match this run\'s '
                         f'model/method state: {mismatch}') from e
      raise ValueError(self._damaged(step)) from e
    return Stage(step, restored['state'], dict(meta))

  def restore_meta(self, step: int) -> dict:
    """The metadata of stage ``step`` alone (e.g. its stored config, to check before restoring
    arrays whose layout that config decides).

    Raises:
      ValueError: the metadata is damaged ("stage N of method M is damaged: ...").
    """
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta']
      if not isinstance(meta, Mapping):
        raise ValueError(f'meta is a {type(meta).__name__}, not a JSON object')
    except Exception as e:   # Orbax raises many types for damaged files
      raise ValueError(self._damaged(step)) from e
    return dict(meta)

  def step_directory(self, step: int) -> str:
    """The folder of stage ``step``."""
    return os.path.join(os.fspath(self._manager.directory), str(step))

  def _damaged(self, step: int) -> str:
    what = f'stage {step} of method {self._name}' if self._name else f'stage {step}'
    return (f'{what} is damaged: {self.step_directory(step)}; delete that folder to recompute '
            'it')

  def _mismatch(self, step: int, abstract: PyTree) -> str:
    """How the stored arrays differ from ``abstract``; '' if they match or cannot be read."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
      tree = handler.metadata(epath.Path(self.step_directory(step)) / 'state').tree
      stored, _ = _array_infos(self.step_directory(step), tree)
    except Exception:   # unreadable metadata: damaged, not a mismatch
      return ''
    finally:
      handler.close()
    wanted, _ = _array_infos('target', abstract)
    for name in sorted(set(stored) | set(wanted)):
      if name not in stored:
        return f'{name!r} is in this run\'s state but not in the checkpoint'
      if name not in wanted:
        return f'{name!r} is in the checkpoint but not in this run\'s state'
      if stored[name] != wanted[name]:
        return (f'{name!r} is stored with shape {stored[name].shape} {stored[name].dtype}, this '
                f'run has {wanted[name].shape} {wanted[name].dtype}')
    return ''

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> 'StageCheckpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------------------------------
# Reading single arrays of an Orbax PyTree checkpoint
# ------------------------------------------------------------------------------------------

PYTREE_METADATA_FILE = '_METADATA'   # the tree metadata every Orbax PyTree item folder holds


class ArrayInfo(NamedTuple):
  """An array's shape (tuple of ints) and NumPy dtype (ml_dtypes for bfloat16 / float8)."""

  shape: tuple
  dtype: np.dtype


def _check_finished(path: str) -> None:
  """Raises if ``path`` or a folder above it is an unfinished Orbax save (a temporary folder)."""
  for part in path.split(os.sep):
    if ocp.utils.TMP_DIR_SUFFIX in part:
      raise ValueError(f'{path} is an unfinished Orbax save (a temporary folder, '
                       f'{ocp.utils.TMP_DIR_SUFFIX}*); use a finished checkpoint')


def pytree_directory(path: str) -> str:
  """The PyTree item folder of an Orbax checkpoint: ``path`` itself or its single PyTree item.

  Accepted: a folder holding ``_METADATA`` (written by ``PyTreeCheckpointer().save`` or
  ``StandardCheckpointer().save``, or an item folder of a step such as ``<stage dir>/3/state``),
  or a step folder holding exactly one such item (a `StageCheckpointer` step, ``<stage dir>/3``:
  its ``state``; ``meta`` is JSON).

  Args:
    path: the folder.

  Returns:
    The absolute path of the item folder.

  Raises:
    FileNotFoundError: ``path`` is not a folder.
    ValueError: an unfinished (temporary) save; a step with several PyTree items; a checkpoint
      manager's root folder (numbered steps: the error names the latest step's folder); no
      PyTree metadata.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path} is not a folder (an Orbax checkpoint is one)')
  _check_finished(path)
  if os.path.isfile(os.path.join(path, PYTREE_METADATA_FILE)):
    return path
  entries = sorted(os.listdir(path))
  items = [e for e in entries if os.path.isfile(os.path.join(path, e, PYTREE_METADATA_FILE))]
  if len(items) == 1:
    return os.path.join(path, items[0])
  if items:
    raise ValueError(f'{path} holds several Orbax PyTree items ({", ".join(items)}); point at '
                     f'one of them, e.g. {os.path.join(path, items[0])}')
  steps = sorted(int(e) for e in entries if e.isdigit() and os.path.isdir(os.path.join(path, e)))
  if steps:
    raise ValueError(f'{path} is an Orbax checkpoint folder with steps {steps}; point at one '
                     f'step, e.g. {os.path.join(path, str(steps[-1]))}')
  raise ValueError(f'{path} is not a readable Orbax PyTree checkpoint: no '
                   f'{PYTREE_METADATA_FILE} file in it or in an item folder inside it')


def _array_infos(directory: str, tree: Any) -> tuple:
  """(name -> ArrayInfo, names of non-array leaves) of a metadata tree."""
  arrays, skipped = {}, []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = tree_lib.path_str(key_path)
    if name in arrays:
      raise ValueError(f'{directory}: two leaves have the path {name!r} '
                       f'({jax.tree_util.keystr(key_path)} and an earlier one)')
    dtype, shape = getattr(leaf, 'dtype', None), getattr(leaf, 'shape', None)
    if dtype is None or shape is None:   # strings and other non-array leaves
      skipped.append(name)
      continue
    arrays[name] = ArrayInfo(tuple(int(d) for d in shape), np.dtype(dtype))
  return arrays, skipped


class PyTreeArrays:
  """The arrays of an Orbax PyTree checkpoint, listed from its metadata and read one at a time.

  Opening reads only the metadata (the tree, and each array's shape and dtype); `read` restores
  one array through Orbax (``PyTreeCheckpointHandler.restore`` with every other leaf a
  ``PLACEHOLDER``, so no other array is read) as a NumPy array of the stored dtype.

  Attributes:
    directory: the PyTree item folder (see `pytree_directory`).
    arrays: name -> `ArrayInfo`, in pytree flattening order; names are '/'-joined pytree paths
      (`cljax.tree.path_str`), e.g. ``'params/Dense_0/kernel'``.
    skipped: names of leaves that are not arrays (strings), which `read` does not return.
  """

  def __init__(self, path: str):
    """Opens the checkpoint at ``path`` (see `pytree_directory` for the layouts accepted).

    Raises:
      FileNotFoundError: ``path`` is not a folder.
      ValueError: as `pytree_directory`, unreadable metadata (naming the folder and its
        ``_METADATA`` file), two leaves with the same '/'-joined path.
    """
    self.directory = pytree_directory(path)
    handler = ocp.PyTreeCheckpointHandler()
    try:
      tree = handler.metadata(epath.Path(self.directory)).tree
    except Exception as e:   # Orbax raises many types for corrupt or partial folders
      raise ValueError(f'{self.directory} is not a readable Orbax PyTree checkpoint (reading '
                       f'{os.path.join(self.directory, PYTREE_METADATA_FILE)} and the arrays\' '
                       f'metadata failed): {type(e).__name__}: {e}') from e
    finally:
      handler.close()
    self._leaves, self._treedef = jax.tree.flatten(tree)
    self.arrays, self.skipped = _array_infos(self.directory, tree)
    names = tree_lib.leaf_paths(tree)
    self._index = {n: i for i, n in enumerate(names) if n in self.arrays}

  def __repr__(self) -> str:
    return f'PyTreeArrays({self.directory!r}, {len(self.arrays)} arrays)'

  def _restore_tree(self, i: int, leaf: Any) -> Any:
    return jax.tree.unflatten(self._treedef, [leaf if j == i else ocp.PLACEHOLDER
                                              for j in range(len(self._leaves))])

  def read(self, name: str) -> np.ndarray:
    """Restores the array ``name`` alone.

    Args:
      name: its '/'-joined path (a key of `arrays`).

    Returns:
      A NumPy array of the stored shape and dtype.

    Raises:
      KeyError: no array of that name (the error names the folder).
      ValueError: Orbax cannot read it (missing or corrupt data), or it does not match its
        metadata; the error names the folder and the array.
    """
    if name not in self.arrays:
      raise KeyError(f'{self.directory} has no array {name!r}')
    i = self._index[name]
    args = ocp.args.PyTreeRestore(
        item=self._restore_tree(i, self._leaves[i]),
        restore_args=self._restore_tree(i, ocp.RestoreArgs(restore_type=np.ndarray)))
    handler = ocp.PyTreeCheckpointHandler()
    try:
      restored = handler.restore(epath.Path(self.directory), args=args)
    except Exception as e:   # tensorstore / Orbax errors for missing or corrupt data
      raise ValueError(f'{self.directory}: array {name!r} cannot be read: '
                       f'{type(e).__name__}: {e}') from e
    finally:
      handler.close()
    leaves = jax.tree.leaves(restored)   # the other leaves are PLACEHOLDERs
    if len(leaves) != len(self._leaves):
      raise ValueError(f'{self.directory}: restoring array {name!r} returned a tree of '
                       f'{len(leaves)} leaves instead of {len(self._leaves)}')
    x = np.asarray(leaves[i])
    info = self.arrays[name]
    if x.shape != info.shape or x.dtype != info.dtype:
      raise ValueError(f'{self.directory}: array {name!r} was restored with shape {x.shape} and '
                       f'dtype {x.dtype}, but its metadata says {info.shape} {info.dtype}')
    return x


def list_arrays(path: str) -> dict:
  """name -> `ArrayInfo` of the arrays of an Orbax PyTree checkpoint (see `PyTreeArrays`)."""
  return PyTreeArrays(path).arrays


def read_array(path: str, name: str) -> np.ndarray:
  """One array of an Orbax PyTree checkpoint, restored alone (see `PyTreeArrays.read`).

  Reads the checkpoint's metadata first; to read many arrays, open a `PyTreeArrays` once.
  """
  return PyTreeArrays(path).read(name)
