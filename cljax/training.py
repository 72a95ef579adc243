"""Jitted training and evaluation over a device mesh, and the per-task continual loop.

One epoch is one jitted call: the host shuffles the task's data, lays it out as (steps, batch, ...)
and places it on the mesh with the batch axis sharded over ``data``
(`jax.make_array_from_process_local_data`); a `jax.lax.scan` then runs every step on device with
the parameters (replicated, or split by `cljax.sharding` rules), optimizer state and method state
donated from epoch to epoch. The host prepares the next epoch while the device runs this one,
and per-step losses come back once per epoch, so NaN detection costs no host round trip per step.

The loss of a step is ``cross_entropy(masked logits, y) + method.loss(...)`` and the update is
``optax.chain(method.gradient_transform(method_state), optimizer)``.
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
from cljax.methods import base

Params = Any
ApplyFn = base.ApplyFn


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


def _train_apply(apply_fn: ApplyFn, method: base.Method, method_state: Any,
                 batch: base.Batch) -> ApplyFn:
  """The forward pass the step differentiates: ``method.wrap_apply``'s, else ``apply_fn``."""
  if method.wrap_apply is None:
    return apply_fn
  return method.wrap_apply(apply_fn, method_state, batch)


def _output_losses_fn(apply_fn: ApplyFn, method: base.Method):
  """``(params, method_state, batch) -> (cross_entropy, output_term)`` from one forward pass."""
  def output_losses(params, method_state, batch: base.Batch):
    apply_fn_ = _train_apply(apply_fn, method, method_state, batch)
    logits = apply_fn_(params, batch.x, train=True)
    ce = base.cross_entropy(logits, batch.y, batch.mask)
    if method.output_loss is None:
      return ce, jnp.zeros((), ce.dtype)
    return ce, method.output_loss(logits, method_state, batch, apply_fn_)
  return output_losses


def _step_grads(apply_fn: ApplyFn, method: base.Method):
  """``(params, method_state, batch) -> (cross_entropy, grads, task_grads)``.

  ``grads`` are those of cross-entropy + the method's term; the term's value is not returned, so
  XLA drops its computation (its per-leaf reductions cost up to half of a small model's step).

  With no ``after_step`` hook one combined loss (cross-entropy + ``output_loss`` on the same
  logits + ``loss``) is differentiated: one forward and one backward pass. With the hook, the
  cross-entropy and the method's terms are differentiated separately, because the hook needs
  the task gradients alone.
  """
  output_losses = _output_losses_fn(apply_fn, method)

  def method_loss(params, method_state, batch):
    return method.loss(params, method_state, batch,
                       _train_apply(apply_fn, method, method_state, batch))

  def method_terms(params, method_state, batch):
    return output_losses(params, method_state, batch)[1] + method_loss(params, method_state, batch)

  if method.after_step is None:
    def total_with_ce(p, s, b):
      ce, output_term = output_losses(p, s, b)
      return ce + output_term + method_loss(p, s, b), ce
    total = jax.value_and_grad(total_with_ce, has_aux=True)

    def combined(params, method_state, batch):
      (_, ce), grads = total(params, method_state, batch)
      return ce, grads, None
    return combined

  def separate(params, method_state, batch):
    ce, task_grads = jax.value_and_grad(lambda p: output_losses(p, method_state, batch)[0])(params)
    extra_grads = jax.grad(method_terms)(params, method_state, batch)
    return ce, optax.tree.add(task_grads, extra_grads), task_grads
  return separate


@functools.lru_cache(maxsize=64)
def make_epoch_fn(apply_fn: ApplyFn, method: base.Method, optimizer: optax.GradientTransformation,
                  mesh: Mesh):
  """Jitted ``epoch(params, opt_state, method_state, batches) -> (params, opt_state, method_state,
  losses)``, cached per (apply_fn, method, optimizer, mesh).

  The update is ``optax.chain(method.gradient_transform(method_state), optimizer)``, built inside
  the traced function from the traced method state: the same compiled program serves every task
  (no retrace when bases or anchors change, only when shapes do). ``batches`` is a `Batch` of
  arrays shaped (S, B, ...), sharded along B; ``losses`` is (S,).
  """
  step_grads = _step_grads(apply_fn, method)
  del mesh  # Shardings come from the arguments (and propagate to the outputs).

  def epoch(params, opt_state, method_state, batches):
    tx = optax.chain(method.gradient_transform(method_state), optimizer)

    def step(carry, batch):
      params, opt_state, method_state = carry
      if method.before_step is not None:
        params = method.before_step(params, method_state, batch, apply_fn)
      loss, grads, task_grads = step_grads(params, method_state, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      if method.after_step is not None:
        # The step's updates, not the new parameters: a hook reading both old and new
        # parameters makes XLA copy the parameters every step (the carry is updated in place).
        method_state = method.after_step(method_state, params, updates, task_grads)
      return (new_params, opt_state, method_state), loss

    carry, losses = jax.lax.scan(step, (params, opt_state, method_state), batches)
    return (*carry, losses)

  return jax.jit(epoch, donate_argnums=(0, 1, 2))


@functools.lru_cache(maxsize=64)
def make_opt_init_fn(method: base.Method, optimizer: optax.GradientTransformation, mesh: Mesh):
  """Jitted ``init(params, method_state) -> opt_state`` of the chained update (fresh per task)."""
  del mesh  # The optimizer state follows the parameters' shardings.

  def init(params, method_state):
    return optax.chain(method.gradient_transform(method_state), optimizer).init(params)
  return jax.jit(init)


def _epoch_batches(data: base.Batch, perm: np.ndarray, batch_size: int) -> base.Batch:
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
    data: base.Batch,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    mesh: Mesh,
    param_rules: Sequence[sharding.Rule] = (),
    task_index: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> TaskResult:
  """Trains on one task's data for ``epochs`` epochs with a fresh optimizer state.

  Args:
    apply_fn, method, optimizer: the model function, continual method and optax optimizer.
    params: the parameter pytree at the start of the task (copied once onto the mesh; the
      copies' buffers are then donated from epoch to epoch).
    method_state: the method's state; changed during the task only by ``method.after_step``
      (consolidation is ``end_task``, called by the caller).
    data: the task's training data, host arrays (N, ...); passed through the method's
      ``prepare_data`` first, when it has one.
    epochs: passes over the data.
    batch_size: global batch size; a multiple of the mesh's ``data`` size.
    seed: seeds the per-epoch shuffles (numpy), so that a resumed run shuffles identically.
    mesh: the device mesh (axes ``data``, ``model``).
    param_rules: `cljax.sharding` rules for the parameters (and the optimizer state, which
      follows them); unmatched leaves, and the method state, are replicated.
    task_index: for error messages.
    progress: called with the number of steps after each epoch (e.g. a tqdm update).

  Returns:
    `TaskResult`; ``losses`` has one entry per step, float32: the cross-entropy of the step's
    batch (the method's term is differentiated but its value not computed).

  Raises:
    ValueError: fewer examples than one batch, or a bad batch size.
    FloatingPointError: the loss or, after an epoch's last step, the parameters became NaN or
      infinite; names the task, epoch and step.
  """
  sharding.check_batch_size(batch_size, mesh)
  if method.prepare_data is not None:
    data = method.prepare_data(params, method_state, data, apply_fn)
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
  all_losses, batches = [], place()
  for epoch in range(epochs):
    params, opt_state, method_state, losses = epoch_fn(params, opt_state, method_state, batches)
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
    if progress is not None:
      progress(len(losses))
  logging.info('task %d: %d steps, final loss %.4f', task_index, sum(map(len, all_losses)),
               all_losses[-1][-1] if all_losses else float('nan'))
  return TaskResult(params, opt_state, method_state, np.concatenate(all_losses))


def make_eval_fn(apply_fn: ApplyFn, mesh: Mesh):
  """Jitted ``correct(params, batch) -> (B,) bool``: whether each example is classified right."""
  del mesh  # Shardings come from the arguments.

  def correct(params, batch: base.Batch):
    logits = apply_fn(params, batch.x, train=False)
    return jnp.argmax(base.masked_logits(logits, batch.mask), axis=-1) == batch.y

  return jax.jit(correct)


def evaluate(eval_fn, params: Params, data: base.Batch, *, batch_size: int, mesh: Mesh) -> float:
  """Accuracy (fraction in [0, 1]) on ``data``, in fixed-size padded batches (one compile).

  Args:
    eval_fn: from `make_eval_fn`.
    params: replicated parameters.
    data: host arrays (N, ...).
    batch_size: a multiple of the mesh's ``data`` size.
    mesh: the device mesh.
  """
  sharding.check_batch_size(batch_size, mesh)
  n = data.size
  correct = 0
  for start in range(0, n, batch_size):
    chunk = jax.tree.map(lambda a: a[start:start + batch_size], data)
    k = len(chunk.y)
    if k < batch_size:  # Pad to the compiled shape; padded rows are not counted.
      chunk = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], batch_size - k, axis=0)]),
                           chunk)
    batch = jax.tree.map(lambda a: sharding.shard_batch(mesh, a, axis=0), chunk)
    correct += int(np.asarray(eval_fn(params, batch))[:k].sum())
  return correct / n


def evaluate_tasks(eval_fn, params: Params, tests: Sequence[base.Batch], *, batch_size: int,
                   mesh: Mesh) -> np.ndarray:
  """Accuracy on each task's test data: (T,) float64 fractions (one row of the accuracy matrix)."""
  return np.asarray([evaluate(eval_fn, params, t, batch_size=batch_size, mesh=mesh) for t in tests])
