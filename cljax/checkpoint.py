"""Stage checkpoints with Orbax: one step per completed task (or merged model), and resume.

This is the only module that imports Orbax. A stage holds a pytree ``state`` (params, optimizer
state, method state, PRNG key data: anything with fixed shapes known before restoring) and a JSON
``meta`` dict (accuracy-matrix rows so far, wall time, the config). Orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save leaves no partial step
that a resume could pick up.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp

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
  """

  def __init__(self, directory: str):
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

    Raises:
      ValueError: the stored pytree does not match ``target`` (e.g. another model or method).
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'checkpoint {self._manager.directory}/{step} does not match this run\'s '
                       f'model/method state: {e}') from e
    return Stage(step, restored['state'], dict(restored['meta']))

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> 'StageCheckpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
