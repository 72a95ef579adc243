"""Jitted training of one task (`fit_task`) and evaluation over a device mesh.

One epoch is one jitted call: the host shuffles the task's data, lays it out as (steps, batch, ...)
and places it on the mesh with the batch axis sharded over ``data``
(`jax.make_array_from_process_local_data`); a `jax.lax.scan` then runs every step on device with
the parameters (replicated, or split by `cljax.sharding` rules), optimizer state and method state
donated from epoch to epoch. The host prepares the next epoch while the device runs this one,
and per-step losses come back once per epoch, so NaN detection costs no host round trip per step.

The loss of a step is the batch's weighted cross-entropy + ``method.loss(...)`` (differentiated;
only the cross-entropy is reported) and the update is
``optax.chain(method.gradient_transform(method_state), optimizer)``. Step s of a task draws its
key as ``fold_in(task_key, s)``: the model's dropout and every method hook get keys from it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cljax import sharding
from cljax import core
from cljax.methods import base

Params = Any
ApplyFn = core.ApplyFn


class TaskResult(NamedTuple):
  """What `fit_task` returns: the trained parameters and state, and per-step losses (S,)."""

  params: Params
  opt_state: Any
  method_state: Any
  losses: np.ndarray


def make_optimizer(name: str, *, learning_rate: float, momentum: float = 0.0) -> optax.GradientTransformation:
  """The optax optimizer named in the config (``sgd`` with optional momentum, or ``adam``).

  Raises:
    ValueError: unknown name or a non-positive learning rate.
  """
  if not learning_rate > 0:
    raise ValueError(f'learning_rate must be > 0, got {learning_rate}')
  if name == 'sgd':
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == 'adam':
    return optax.adam(learning_rate)
  raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam' (config key `optimizer`)")


def _with_dropout(apply_fn: ApplyFn, key: jax.Array) -> ApplyFn:
  """``apply_fn`` whose training-mode calls draw dropout from ``key`` unless given ``rngs``:
  what a method's own forward passes (refresh's ascent, replay's memory batch) receive."""
  def apply(params, x, *, train=False, rngs=None):
    return apply_fn(params, x, train=train, rngs=rngs if rngs is not None else {'dropout': key})
  return apply


def _step_grads(apply_fn: ApplyFn, method: base.Method):
  """``(params, method_state, batch, key) -> (params, cross_entropy, grads, task_grads)``.

  The returned ``params`` are where the step is taken (``method.intercept``'s, else the input).
  ``grads`` are those of cross-entropy + the method's term; the term's value is not returned, so
  XLA drops its computation (its per-leaf reductions cost up to half of a small model's step).

  With no ``update`` hook one combined loss (cross-entropy + the method's term on the same
  logits) is differentiated: one forward and one backward pass. With the hook, the
  cross-entropy and the method's term are differentiated separately, because the hook needs the
  task gradients alone.
  """
  def grads_fn(params, method_state, batch, key):
    # Distinct keys: the loop's dropout, the hooks, the intercept's and the loss's own forwards.
    dropout_key, hook_key, intercept_dropout_key, loss_dropout_key = (
        jax.random.fold_in(key, i) for i in (0, 1, 2, 4))
    forward = apply_fn
    if method.intercept is not None:
      params, forward = method.intercept(params, method_state, batch,
                                         apply_fn=_with_dropout(apply_fn, intercept_dropout_key),
                                         key=hook_key)

    def task_loss(p):
      logits = forward(p, batch.x, train=True, rngs={'dropout': dropout_key})
      return core.batch_loss(logits, batch), logits

    def method_term(p, logits):
      return method.loss(p, method_state, batch, logits=logits,
                         apply_fn=_with_dropout(forward, loss_dropout_key), key=hook_key)

    if method.update is None:
      def total(p):
        ce, logits = task_loss(p)
        return ce + method_term(p, logits), ce
      (_, ce), grads = jax.value_and_grad(total, has_aux=True)(params)
      return params, ce, grads, None
    (ce, _), task_grads = jax.value_and_grad(task_loss, has_aux=True)(params)
    extra_grads = jax.grad(lambda p: method_term(p, task_loss(p)[1]))(params)
    return params, ce, optax.tree.add(task_grads, extra_grads), task_grads
  return grads_fn


@functools.lru_cache(maxsize=64)
def make_epoch_fn(apply_fn: ApplyFn, method: base.Method, optimizer: optax.GradientTransformation,
                  mesh: Mesh):
  """Jitted ``epoch(params, opt_state, method_state, batches, steps, key) -> (params, opt_state,
  method_state, losses)``, cached per (apply_fn, method, optimizer, mesh).

  The update is ``optax.chain(method.gradient_transform(method_state), optimizer)``, built inside
  the traced function from the traced method state: the same compiled program serves every task
  (no retrace when bases or anchors change, only when shapes do). It is built from the state at
  the epoch's start, so what a transform reads must not be changed by ``method.update`` within
  a task (CoSO's update changes its sketches; its transform reads only the bases). ``batches`` is a `Batch` of
  arrays shaped (S, B, ...), sharded along B; ``steps`` (S,) int32 the steps' indices within the
  task; ``key`` the task's PRNG key, from which step s draws ``fold_in(key, s)``; ``losses`` (S,).
  """
  step_grads = _step_grads(apply_fn, method)
  del mesh  # Shardings come from the arguments (and propagate to the outputs).

  def epoch(params, opt_state, method_state, batches, steps, key):
    tx = optax.chain(method.gradient_transform(method_state), optimizer)

    def step(carry, xs):
      params, opt_state, method_state = carry
      batch, index = xs
      step_key = jax.random.fold_in(key, index)
      params, loss, grads, task_grads = step_grads(params, method_state, batch, step_key)
      updates, opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      if method.update is not None:
        # The step's updates, not the new parameters: a hook reading both old and new
        # parameters makes XLA copy the parameters every step (the carry is updated in place).
        method_state = method.update(method_state, params, updates, task_grads,
                                     key=jax.random.fold_in(step_key, 3))
      return (new_params, opt_state, method_state), loss

    carry, losses = jax.lax.scan(step, (params, opt_state, method_state), (batches, steps))
    return (*carry, losses)

  return jax.jit(epoch, donate_argnums=(0, 1, 2))


@functools.lru_cache(maxsize=64)
def make_opt_init_fn(method: base.Method, optimizer: optax.GradientTransformation, mesh: Mesh):
  """Jitted ``init(params, method_state) -> opt_state`` of the chained update (fresh per task)."""
  del mesh  # The optimizer state follows the parameters' shardings.

  def init(params, method_state):
    return optax.chain(method.gradient_transform(method_state), optimizer).init(params)
  return jax.jit(init)


def _epoch_batches(data: core.Batch, perm: np.ndarray, batch_size: int) -> core.Batch:
  """Host (S, B, ...) arrays of one epoch; the last partial batch is dropped (fixed shapes)."""
  steps = len(perm) // batch_size
  idx = perm[: steps * batch_size].reshape(steps, batch_size)
  return jax.tree.map(lambda a: np.take(a, idx, axis=0), data)


@jax.jit
def _all_finite(tree) -> jax.Array:
  """Whether every entry of every leaf is finite (one fused reduction per leaf)."""
  return jnp.all(jnp.stack([jnp.isfinite(jnp.sum(x * jnp.zeros((), x.dtype)))
                            for x in jax.tree.leaves(tree)]))


def _placed_copy(tree, shardings):
  """New buffers holding ``tree`` with ``shardings``. (`jax.device_put(..., may_alias=False)`
  is not enough: placing a single-device array on a multi-device mesh can reuse its buffer as
  one of the shards, which the donated epoch would then delete under the caller.)"""
  return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def fit_task(
    apply_fn: ApplyFn,
    method: base.Method,
    optimizer: optax.GradientTransformation,
    params: Params,
    method_state: Any,
    data: core.Batch,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    mesh: Mesh,
    key: Optional[jax.Array] = None,
    param_rules: Sequence[sharding.Rule] = (),
    task_index: int = 0,
    on_epoch: Optional[Callable[[int, np.ndarray], None]] = None,
) -> TaskResult:
  """Trains on one task's data for ``epochs`` epochs with a fresh optimizer state.

  Args:
    apply_fn, method, optimizer: the model function, continual method and optax optimizer.
    params: the parameter pytree at the start of the task (copied once onto the mesh; the
      copies' buffers are then donated from epoch to epoch).
    method_state: the method's state; changed during the task only by ``method.update``
      (``prepare_task`` and ``end_task`` are the caller's: see `cljax.continual.run_stream`).
    data: the data to train on, host arrays (N, ...) (already through ``prepare_task``).
    epochs: passes over the data.
    batch_size: global batch size; a multiple of the mesh's ``data`` size.
    seed: seeds the per-epoch shuffles (numpy), so that a resumed run shuffles identically.
    mesh: the device mesh (axes ``data``, ``model``).
    key: the task's PRNG key; step s of the task (counted over its epochs) hands
      ``fold_in(key, s)`` to the method's hooks and the model's dropout. Default: from ``seed``.
    param_rules: `cljax.sharding` rules for the parameters (and the optimizer state, which
      follows them); unmatched leaves, and the method state, are replicated.
    task_index: for error messages.
    on_epoch: called after each epoch with (epoch, its (S,) per-step losses), e.g. to update a
      progress bar or write the losses.

  Returns:
    `TaskResult`; ``losses`` has one entry per step, float32: the cross-entropy of the step's
    batch (the method's term is differentiated but its value not computed).

  Raises:
    ValueError: fewer examples than one batch, or a bad batch size.
    FloatingPointError: the loss or, after an epoch's last step, the parameters became NaN or
      infinite; names the task, epoch and step.
  """
  sharding.check_batch_size(batch_size, mesh)
  if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
    raise ValueError(f'epochs must be an int >= 1, got {epochs!r}')
  if key is None:
    key = jax.random.key(seed)
  n = data.size
  if n < batch_size:
    raise ValueError(f'task {task_index} has {n} training examples, fewer than batch_size={batch_size}')
  # Fresh copies: the epoch donates its inputs, and the caller keeps its arrays.
  params = _placed_copy(params, sharding.param_shardings(params, mesh, param_rules))
  method_state = _placed_copy(method_state, sharding.replicated(mesh))
  opt_state = make_opt_init_fn(method, optimizer, mesh)(params, method_state)
  epoch_fn = make_epoch_fn(apply_fn, method, optimizer, mesh)
  rng = np.random.default_rng(seed)
  place = lambda: jax.tree.map(lambda a: sharding.shard_batch(mesh, a, axis=1),
                               _epoch_batches(data, rng.permutation(n), batch_size))
  steps_per_epoch = n // batch_size
  all_losses, batches = [], place()
  for epoch in range(epochs):
    steps = jnp.arange(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch, dtype=jnp.int32)
    params, opt_state, method_state, losses = epoch_fn(params, opt_state, method_state, batches,
                                                       steps, key)
    if epoch + 1 < epochs:  # Shuffle and transfer the next epoch while this one computes.
      batches = place()
    losses = np.asarray(losses)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
      # The loss is the cross-entropy: a non-finite method term shows up one step later, through
      # the parameters its gradient made non-finite.
      step = epoch * len(losses) + int(bad[0])
      raise FloatingPointError(f'loss became {losses[bad[0]]} at task {task_index}, epoch {epoch}, '
                               f'step {step} (step {bad[0]} of the epoch; or the update of the step '
                               'before it was not finite); lower the learning rate or the method '
                               'strength')
    if not bool(_all_finite(params)):  # The last step's update, which no loss has seen yet.
      step = (epoch + 1) * len(losses) - 1
      raise FloatingPointError(f'parameters became non-finite at task {task_index}, epoch {epoch}, '
                               f'step {step} (the last of the epoch; its loss was finite, so the '
                               'method\'s term or its gradient was not); lower the learning rate or '
                               'the method strength')
    all_losses.append(losses)
    if on_epoch is not None:
      on_epoch(epoch, losses)
  logging.debug('task %d: %d steps, final loss %.4f', task_index, sum(map(len, all_losses)),
               all_losses[-1][-1] if all_losses else float('nan'))
  return TaskResult(params, opt_state, method_state, np.concatenate(all_losses))


def make_eval_fn(apply_fn: ApplyFn, mesh: Mesh):
  """Jitted ``sums(params, batch) -> core.EvalSums`` over the batch's weighted labelled
  positions (padding rows carry weight 0)."""
  del mesh  # Shardings come from the arguments.

  def sums(params, batch: core.Batch):
    logits = apply_fn(params, batch.x, train=False)
    return core.eval_sums(logits, batch.y, batch.mask, batch.weights)

  return jax.jit(sums)


def _padded(data: core.Batch, start: int, batch_size: int) -> core.Batch:
  """Examples ``[start, start + batch_size)``, padded to ``batch_size`` with weight-0 rows."""
  chunk = jax.tree.map(lambda a: a[start:start + batch_size], data)
  k = len(chunk.y)
  weights = (np.ones(chunk.y.shape[:1], np.float32) if chunk.weights is None
             else np.asarray(chunk.weights, np.float32))
  chunk = chunk._replace(weights=weights)
  if k < batch_size:  # Pad to the compiled shape; padded rows weigh 0.
    chunk = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], batch_size - k, axis=0)]),
                         chunk)
    chunk = chunk._replace(weights=np.concatenate(
        [weights, np.zeros((batch_size - k,) + weights.shape[1:], np.float32)]))
  return chunk


def evaluate(eval_fn, params: Params, data: core.Batch, *, batch_size: int,
             mesh: Mesh) -> core.Evaluation:
  """Accuracy and mean NLL over ``data``'s labelled positions, in fixed-size padded batches.

  Accuracy is (weighted) correct / (weighted) positions, a fraction in [0, 1], for (B,) labels
  (examples) and (B, L) labels (tokens) alike; NLL is in nats per position.

  Args:
    eval_fn: from `make_eval_fn`.
    params: replicated parameters.
    data: host arrays (N, ...).
    batch_size: a multiple of the mesh's ``data`` size.
    mesh: the device mesh.

  Raises:
    ValueError: ``data`` has no labelled position (every weight 0).
  """
  sharding.check_batch_size(batch_size, mesh)
  correct = nll = weight = 0.0
  for start in range(0, data.size, batch_size):
    batch = jax.tree.map(lambda a: sharding.shard_batch(mesh, a, axis=0),
                         _padded(data, start, batch_size))
    sums = jax.device_get(eval_fn(params, batch))
    correct, nll, weight = (correct + float(sums.correct), nll + float(sums.nll),
                            weight + float(sums.weight))
  if weight <= 0:
    raise ValueError('evaluate: the data have no labelled position (all weights are 0)')
  return core.Evaluation(correct / weight, nll / weight)


class Evaluator:
  """`evaluate` on fixed test sets whose padded batches are placed on the mesh once.

  The continual loop evaluates every task after every task (T^2 evaluations) and the merge
  experiment hundreds of merged models on the same test sets: transferring the test data once
  keeps evaluation at the cost of the forward passes.

  Args:
    apply_fn: the model function.
    tests: per task, its test `Batch` of host arrays.
    batch_size: evaluation batch size (a multiple of the mesh's ``data`` size).
    mesh: the device mesh.
  """

  def __init__(self, apply_fn: ApplyFn, tests: Sequence[core.Batch], *, batch_size: int,
               mesh: Mesh):
    sharding.check_batch_size(batch_size, mesh)
    self._eval_fn = make_eval_fn(apply_fn, mesh)
    self._tasks = [
        [jax.tree.map(lambda a: sharding.shard_batch(mesh, a), _padded(data, start, batch_size))
         for start in range(0, data.size, batch_size)]
        for data in tests]

  def evaluate(self, params: Params, task: int) -> core.Evaluation:
    """Accuracy and mean NLL of ``params`` on task ``task``'s test data.

    Raises:
      ValueError: the task's test data have no labelled position.
    """
    sums = jax.device_get([self._eval_fn(params, batch) for batch in self._tasks[task]])
    weight = sum(float(s.weight) for s in sums)
    if weight <= 0:
      raise ValueError(f'task {task}: the test data have no labelled position')
    return core.Evaluation(sum(float(s.correct) for s in sums) / weight,
                           sum(float(s.nll) for s in sums) / weight)

  def accuracy(self, params: Params, task: int) -> float:
    """Fraction of task ``task``'s labelled test positions that ``params`` predicts right."""
    return self.evaluate(params, task).accuracy

  def evaluate_all(self, params: Params) -> core.Evaluation:
    """(T,) accuracies and NLLs: one row of the accuracy and NLL matrices."""
    rows = [self.evaluate(params, t) for t in range(len(self._tasks))]
    return core.Evaluation(np.asarray([r.accuracy for r in rows]),
                           np.asarray([r.nll for r in rows]))
