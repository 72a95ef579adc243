"""A run's working directory: claim it exclusively, and check that a resume continues the same run.

A workdir holds one run of one config: ``config.json`` (the config as plain JSON), one folder per
method (stage checkpoints, results) and the summaries. `claim` makes it safe to point a second
command at the same folder:

  * the folder is created if missing; a path that is a file, or a folder that cannot be created,
    is refused naming ``--workdir``;
  * an exclusive lock (``fcntl.flock`` on ``workdir/.lock``, which holds the owner's pid) is held
    until the claim is released, so a second run on the same workdir is refused naming the pid of
    the first. The kernel drops the lock when its process dies (``kill -9`` included), so a dead
    run's lock file never blocks a new run;
  * a ``config.json`` already there must equal the run's config (the differing keys are named).

``config.json`` is written only when the first stage is saved (`Claim.record_config`), so a run
that fails before completing a task (a bad value found in task 0) leaves no config behind, and the
corrected command may reuse the folder; a claim that fails that way also removes the empty folders
it created (`Claim.release`). A checkpoint written before ``config.json`` existed, or after it was
deleted, carries the config in its metadata: `check_resume` compares it with the run's before a
resume continues from it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from typing import Any, Mapping, Optional

from cljax import report

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'


class WorkdirError(ValueError):
  """A workdir that cannot be used for this run: a file, busy, or holding another config's run."""


def diff_keys(stored: Any, config: Any, prefix: str = '') -> list[str]:
  """The dotted keys whose values differ between two JSON-like config dicts, sorted.

  Args:
    stored: a config as plain JSON types (nested dicts, lists, numbers, strings, None).
    config: another one.
    prefix: prepended to every key (used by the recursion).

  Returns:
    Dotted key paths (``'ewc.strength'``) present in one dict only or with different values;
    nested dicts are compared key by key, any other values as a whole.
  """
  if isinstance(stored, Mapping) and isinstance(config, Mapping):
    keys = sorted(set(stored) | set(config))
    missing = object()
    out = []
    for k in keys:
      a, b = stored.get(k, missing), config.get(k, missing)
      if a is missing or b is missing:
        out.append(f'{prefix}{k}')
      else:
        out += diff_keys(a, b, f'{prefix}{k}.')
    return out
  return [] if stored == config else [prefix.rstrip('.')]


def check_resume(stored_config: Optional[Mapping[str, Any]], config: Mapping[str, Any], *,
                 workdir: str, method: str, stage: int) -> None:
  """Refuses to resume from a stage checkpoint written with a different config.

  Args:
    stored_config: the config saved in the stage's metadata (``meta['config']``), or None when the
      stage holds none (then nothing can be compared and the resume is refused).
    config: the run's config as plain JSON types.
    workdir: the run's workdir (for the message).
    method: the method whose checkpoint it is.
    stage: the stage's number (tasks completed).

  Raises:
    WorkdirError: the configs differ (naming the keys) or the stage holds no config.
  """
  if stored_config is None:
    raise WorkdirError(f'workdir {workdir!r}: stage {stage} of method {method} holds no config, '
                       'so it cannot be checked against this run; use another --workdir, or '
                       'delete that one to start over')
  diff = diff_keys(dict(stored_config), dict(config))
  if diff:
    raise WorkdirError(f'workdir {workdir!r}: stage {stage} of method {method} was written with a '
                       f'different config (keys differing: {", ".join(diff)}); nothing was '
                       'overwritten. Use another --workdir, or delete that one to start over')


def _lock_owner(path: str) -> str:
  try:
    with open(path) as f:
      pid = f.read().strip()
  except OSError:
    pid = ''
  return f'process {pid}' if pid else 'another process'


class Claim:
  """An exclusive claim on a workdir (see `claim`); a context manager.

  Attributes:
    workdir: the folder.
    config: the run's config (plain JSON types).
    created: whether this claim created the folder.
    config_recorded: whether ``config.json`` exists and holds this config.
  """

  def __init__(self, workdir: str, config: Mapping[str, Any], *, created: bool,
               lock_fd: Optional[int], primary: bool, config_recorded: bool):
    self.workdir, self.config, self.created = workdir, dict(config), created
    self.config_recorded = config_recorded
    self._lock_fd, self._primary = lock_fd, primary

  def record_config(self) -> None:
    """Writes ``config.json`` (atomically) if it is not there yet; call when a stage is saved
    or restored.

    Only the primary process writes; on the others it only marks the config as recorded.
    """
    if not self.config_recorded and self._primary:
      report.write_json(os.path.join(self.workdir, CONFIG_FILE), self.config)
    self.config_recorded = True

  def release(self, *, failed: bool = False) -> None:
    """Drops the lock; after a failure before any stage, removes the empty folders it created.

    Args:
      failed: the run raised. If no stage was recorded (`record_config` never called) and this
        claim created the workdir, the lock file and every empty folder under the workdir
        (the workdir included) are removed; a file anywhere keeps its folders.
    """
    if self._lock_fd is not None:
      if failed and self.created and not self.config_recorded:
        try:
          os.remove(os.path.join(self.workdir, LOCK_FILE))
        except FileNotFoundError:
          pass
      os.close(self._lock_fd)   # closing the descriptor drops the flock
      self._lock_fd = None
    if failed and self.created and not self.config_recorded and self._primary:
      _remove_empty_folders(self.workdir)

  def __enter__(self) -> 'Claim':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.release(failed=exc_type is not None)


def _remove_empty_folders(top: str) -> None:
  """Removes every folder under ``top`` (``top`` included) that holds no file, bottom up."""
  for folder, _, _ in os.walk(top, topdown=False):
    try:
      os.rmdir(folder)
    except OSError:   # not empty (a file below), or already gone
      pass


def _make_folder(workdir: str) -> bool:
  """Creates ``workdir`` (and parents); returns whether it was created."""
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir {workdir!r} is a file, not a folder; pass a folder path')
  if os.path.isdir(workdir):
    return False
  try:
    os.makedirs(workdir)
  except FileExistsError:   # created concurrently by another process of this run
    return False
  except OSError as e:
    raise WorkdirError(f'--workdir {workdir!r} cannot be created: {e.strerror}') from e
  return True


def _lock(workdir: str) -> int:
  """Takes the exclusive flock of ``workdir/.lock`` and writes this pid into it."""
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f'--workdir {workdir!r} is not writable ({path}: {e.strerror})') from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise WorkdirError(f'workdir {workdir!r} is in use by {_lock_owner(path)} (it holds '
                         f'{path}); wait for that run to end or use another --workdir') from e
    raise
  os.ftruncate(fd, 0)
  os.write(fd, f'{os.getpid()}\n'.encode())
  os.fsync(fd)
  return fd


def claim(workdir: str, config: Mapping[str, Any], *, primary: bool = True) -> Claim:
  """Claims ``workdir`` for a run of ``config``: create, lock, and compare any ``config.json``.

  Call it after every check that can run before training, and hold the claim (``with``) for the
  whole run; call `Claim.record_config` once the first stage is saved, or once a restored stage
  passed `check_resume` (a finished run whose ``config.json`` was deleted gets it back).

  Args:
    workdir: the run's output folder (created with its parents if missing).
    config: the run's config as plain JSON types (``json.loads(config.to_json_best_effort())``).
    primary: whether this is the process that writes (process 0 of a multi-host run); only it
      takes the lock and writes ``config.json``, every process creates the folder.

  Returns:
    A `Claim` holding the lock until it is released.

  Raises:
    WorkdirError: ``workdir`` is a file or cannot be created; another live process holds its lock
      (naming its pid); its ``config.json`` holds a different config (naming the differing keys).
      Nothing in the folder is changed then, except a lock file created in a folder with none.
  """
  workdir = os.fspath(workdir)
  created = _make_folder(workdir)
  fd = _lock(workdir) if primary else None
  try:
    path = os.path.join(workdir, CONFIG_FILE)
    recorded = False
    if os.path.exists(path):
      try:
        with open(path) as f:
          stored = json.load(f)
      except (OSError, ValueError) as e:
        raise WorkdirError(f'workdir {workdir!r}: {path} is unreadable ({e}); delete it to let '
                           'the stage checkpoints\' configs be checked instead') from e
      diff = diff_keys(stored, dict(config))
      if diff:
        raise WorkdirError(f'workdir {workdir!r} holds a run of a different config (keys '
                           f'differing: {", ".join(diff)}); nothing was overwritten. Use another '
                           '--workdir, or delete that one to start over')
      recorded = True
  except BaseException:
    if fd is not None:
      os.close(fd)
    raise
  return Claim(workdir, config, created=created, lock_fd=fd, primary=primary,
               config_recorded=recorded)
