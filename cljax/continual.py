"""`run_stream`: the per-task order of continual training, public and the same for every caller.

For each task t of a stream, in order:

  1. ``prepare_task``: the method turns the task's training data (and every earlier task's, for
     `joint`) into the data to train on, at the parameters of the task's start;
  2. `cljax.training.fit_task`: ``epochs`` passes of jitted, scanned steps with a fresh optimizer
     state;
  3. ``end_task``: the method consolidates on the task's own training data;
  4. evaluation on every task's test data: row t of the accuracy and NLL matrices;
  5. ``on_task_end(t + 1, state, row)``: e.g. a stage checkpoint (`cljax.checkpoint`).

Randomness is derived from one key carried in `StreamState`, split once per task, so that a run
resumed from the state after task t draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from cljax import core
from cljax import sharding
from cljax import training
from cljax.methods import base

Params = Any


class StreamState(NamedTuple):
  """Everything a stream needs to continue after a task (what a stage checkpoint stores).

  Attributes:
    params: the parameters.
    opt_state: the last task's optimizer state (a fresh one is made for every task; kept so a
      checkpoint holds the whole training state).
    method_state: the method's state.
    rng: (2,) uint32 key data; split once per task.
  """

  params: Params
  opt_state: Any
  method_state: Any
  rng: Any


class StreamResult(NamedTuple):
  """What `run_stream` returns.

  Attributes:
    state: the `StreamState` after the last task.
    accuracy_matrix: (T, T) float64, R[i, j] = accuracy on task j after training task i
      (fractions in [0, 1]); the rows given in ``rows`` first when resuming.
    nll_matrix: (T, T) float64, mean NLL (nats per labelled position), same layout.
    losses: per task trained in this call, the (steps,) float32 per-step cross-entropies.
  """

  state: StreamState
  accuracy_matrix: np.ndarray
  nll_matrix: np.ndarray
  losses: list


def initial_state(params: Params, method: base.Method, optimizer: optax.GradientTransformation,
                  *, seed: int, mesh: Optional[Mesh] = None) -> StreamState:
  """The `StreamState` before the first task: ``method.init(params)``, a fresh optimizer state,
  and the stream's key from ``seed``."""
  mesh = mesh or sharding.make_mesh()
  method_state = method.init(params)
  opt_state = training.make_opt_init_fn(method, optimizer, mesh)(params, method_state)
  return StreamState(params, opt_state, method_state,
                     jax.random.key_data(jax.random.key(seed + 1)))


def _tasks(stream: Any) -> Sequence[Any]:
  """A stream's tasks: ``stream.tasks`` (a `cljax.data.streams.Stream`) or the sequence itself;
  each has ``train`` and ``test`` `Batch` es."""
  return getattr(stream, 'tasks', stream)


def _task_keys(rng: Any) -> tuple:
  """(next rng data, numpy shuffle seed, training key, prepare key, end-task key) of one task."""
  rng, task_rng = jax.random.split(jax.random.wrap_key_data(rng))
  shuffle_seed = int(jax.random.randint(task_rng, (), 0, np.iinfo(np.int32).max))
  keys = [jax.random.fold_in(task_rng, i) for i in (1, 2, 3)]
  return (jax.random.key_data(rng), shuffle_seed, *keys)


def run_stream(
    apply_fn: core.ApplyFn,
    params: Params,
    method: base.Method,
    optimizer: optax.GradientTransformation,
    stream: Any,
    *,
    epochs: int,
    batch_size: int,
    eval_batch_size: Optional[int] = None,
    seed: int = 0,
    mesh: Optional[Mesh] = None,
    param_rules: Sequence[sharding.Rule] = (),
    start: int = 0,
    state: Optional[StreamState] = None,
    rows: Sequence[core.Evaluation] = (),
    on_task_start: Optional[Callable[[int, int], None]] = None,
    on_epoch: Optional[Callable[[int, int, np.ndarray], None]] = None,
    on_task_end: Optional[Callable[[int, StreamState, core.Evaluation], None]] = None,
    evaluate: bool = True,
) -> StreamResult:
  """Trains ``method`` on every task of ``stream`` in order and evaluates after each task.

  Args:
    apply_fn: ``apply_fn(params, x, *, train=False, rngs=None) -> logits``.
    params: the initial parameters (ignored when ``state`` is given).
    method: the continual method (`cljax.methods.get`, or a `chain`).
    optimizer: an optax optimizer; a fresh state is made for each task.
    stream: a `cljax.data.streams.Stream`, or a sequence of tasks with ``train`` / ``test``
      `Batch` es of host arrays.
    epochs: passes over each task's training data.
    batch_size: training batch size (a multiple of the mesh's ``data`` size).
    eval_batch_size: evaluation batch size (default ``batch_size``).
    seed: seeds the stream's key (when ``state`` is None).
    mesh: the device mesh; default all devices on ``data``.
    param_rules: `cljax.sharding` rules for the parameters.
    start: tasks already done (resume); training starts at task ``start``.
    state: the `StreamState` after task ``start`` (a restored stage); None: `initial_state`.
    rows: the accuracy/NLL rows of tasks ``0 .. start - 1`` (a restored stage's).
    on_task_start: called with (task index, steps to train) before fitting each task.
    on_epoch: called with (task index, epoch, that epoch's (S,) per-step losses).
    on_task_end: called with (tasks done, state, this task's row), e.g. to save a stage.
    evaluate: False skips the evaluation (tasks need no ``test``; rows and matrices are empty,
      ``on_task_end`` gets None): training a model to be used elsewhere, e.g. a merge's expert.

  Returns:
    `StreamResult`.

  Raises:
    ValueError: ``start`` outside [0, T], ``rows`` not ``start`` long, a task with fewer training
      examples than one batch.
    FloatingPointError: the loss or parameters became non-finite (names task, epoch, step).
  """
  tasks = _tasks(stream)
  mesh = mesh or sharding.make_mesh()
  eval_batch_size = eval_batch_size or batch_size
  if not 0 <= start <= len(tasks) or len(rows) != start:
    raise ValueError(f'run_stream: start={start} with {len(rows)} rows for {len(tasks)} tasks')
  if state is None:
    state = initial_state(params, method, optimizer, seed=seed, mesh=mesh)
  evaluator = evaluate and training.Evaluator(apply_fn, [task.test for task in tasks],
                                              batch_size=eval_batch_size, mesh=mesh)
  rows, losses = list(rows), []
  for t in range(start, len(tasks)):
    rng, shuffle_seed, fit_key, prepare_key, end_key = _task_keys(state.rng)
    data = tasks[t].train
    if method.prepare_task is not None:
      data = method.prepare_task(state.params, state.method_state, data,
                                 seen=[task.train for task in tasks[:t + 1]], apply_fn=apply_fn,
                                 key=prepare_key)
    if on_task_start is not None:
      on_task_start(t, epochs * (data.size // batch_size))
    fit = training.fit_task(
        apply_fn, method, optimizer, state.params, state.method_state, data, epochs=epochs,
        batch_size=batch_size, seed=shuffle_seed, key=fit_key, mesh=mesh, param_rules=param_rules,
        task_index=t,
        on_epoch=None if on_epoch is None else (lambda e, l, t=t: on_epoch(t, e, l)))
    method_state = method.end_task(fit.params, fit.method_state, tasks[t].train,
                                   apply_fn=apply_fn, key=end_key)
    state = StreamState(fit.params, fit.opt_state, method_state, rng)
    row = evaluator.evaluate_all(state.params) if evaluate else None
    if evaluate:
      rows.append(row)
    losses.append(fit.losses)
    if on_task_end is not None:
      on_task_end(t + 1, state, row)
  return StreamResult(state, np.asarray([r.accuracy for r in rows]),
                      np.asarray([r.nll for r in rows]), losses)


def evaluate_stream(apply_fn: core.ApplyFn, params: Params, stream: Any, *, batch_size: int,
                    mesh: Optional[Mesh] = None) -> core.Evaluation:
  """Accuracy and NLL of ``params`` on every task's test data, (T,) each (e.g. at random init,
  the baseline of FWT)."""
  mesh = mesh or sharding.make_mesh()
  return training.Evaluator(apply_fn, [task.test for task in _tasks(stream)],
                            batch_size=batch_size, mesh=mesh).evaluate_all(params)
