"""Regularization-based continual training: finetune (no regularizer) and EWC.

Each constructor takes keyword-only hyperparameters and returns a `cljax.methods.base.Method`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import fisher as fisher_lib
from cljax.methods import base

Params = Any


def finetune() -> base.Method:
  """Naive sequential fine-tuning: each task trained with plain cross-entropy, no protection.

  The lower bound every continual method is compared with.
  """
  return base.Method(
      init=lambda params: base.EmptyState(),
      loss=base.no_loss,
      gradient_transform=base.identity_transform,
      end_task=base.keep_state,
  )


class EWCState(NamedTuple):
  """EWC's quadratic penalty in constant memory.

  Attributes:
    fisher: pytree like params, sum_k F_k of the Fishers of the tasks consolidated so far.
    anchor: pytree like params, the Fisher-weighted mean of the anchors,
      (sum_k F_k theta*_k) / (sum_k F_k); the latest anchor where the summed Fisher is 0.
    offset: scalar, sum_k F_k theta*_k^2 - fisher * anchor^2 summed over all elements, so that
      the penalty's value (not only its gradient) equals the per-task sum.
    num_tasks: scalar int32, tasks consolidated.
  """

  fisher: Params
  anchor: Params
  offset: jax.Array
  num_tasks: jax.Array


def _validate_strength(name: str, value: float) -> None:
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
    raise ValueError(f'{name} must be a finite number >= 0, got {value!r}')


def ewc_penalty(params: Params, state: EWCState) -> jax.Array:
  """sum_k sum_i F_k,i (theta_i - theta*_k,i)^2, from the constant-memory state; float32 scalar."""
  quad = optax.tree.sum(jax.tree.map(lambda f, p, a: f * jnp.square(p - a), state.fisher, params,
                                     state.anchor))
  return quad + state.offset


def consolidate(state: EWCState, fisher: Params, params: Params, *, decay: float = 1.0) -> EWCState:
  """Adds a task's quadratic F_t (theta - theta*_t)^2 to the (decayed) accumulated penalty.

  With ``decay=1`` this is exactly the sum of per-task EWC penalties (Kirkpatrick et al. 2017,
  Eq. 3 applied to every earlier task): a sum of diagonal quadratics is one diagonal quadratic,
  sum_k F_k (theta - a_k)^2 = A (theta - m)^2 + c with A = sum_k F_k, m = (sum_k F_k a_k) / A and
  c = sum_k F_k a_k^2 - A m^2, so memory does not grow with the number of tasks.

  Args:
    state: the accumulated penalty.
    fisher: the new task's diagonal Fisher, pytree like params.
    params: the new anchor theta*_t (parameters after the task).
    decay: multiplies the old penalty first (online EWC's gamma; 1 for EWC).
  """
  old_f = optax.tree.scale(decay, state.fisher)
  new_f = optax.tree.add(old_f, fisher)
  weighted = jax.tree.map(lambda fo, ao, ft, p: fo * ao + ft * p, old_f, state.anchor, fisher, params)
  anchor = jax.tree.map(lambda w, f, p: jnp.where(f > 0, w / jnp.where(f > 0, f, 1.0), p),
                        weighted, new_f, params)
  second_moment = optax.tree.sum(jax.tree.map(
      lambda fo, ao, ft, p: fo * jnp.square(ao) + ft * jnp.square(p), old_f, state.anchor, fisher, params))
  offset = decay * state.offset + second_moment - optax.tree.sum(
      jax.tree.map(lambda f, m: f * jnp.square(m), new_f, anchor))
  return EWCState(new_f, anchor, offset, state.num_tasks + 1)


def ewc(
    *,
    strength: float = 100.0,
    fisher_estimator: str = 'exact',
    num_samples: int = 1024,
    fisher_batch_size: int = 32,
    seed: int = 0,
) -> base.Method:
  """Elastic Weight Consolidation with a diagonal Fisher.

  Loss term: (strength / 2) * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2 over every earlier task
  k, with F_k computed at the end of task k on ``num_samples`` of its training examples.

  Args:
    strength: lambda of Eq. 3, >= 0.
    fisher_estimator: 'exact' (default: expectation over the model's own predictive
      distribution, summed exactly over classes), 'sampled' or 'empirical'; see `cljax.fisher`.
    num_samples: examples (drawn without replacement, seeded) used for each task's Fisher.
    fisher_batch_size: examples per jitted Fisher chunk.
    seed: seeds the example subset and, for 'sampled', the labels.

  Raises:
    ValueError: a negative or non-finite strength, an unknown estimator, num_samples < 1.

  References:
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017, Eq. 3.
  """
  _validate_strength('ewc.strength', strength)
  if fisher_estimator not in fisher_lib.ESTIMATORS:
    raise ValueError(f'ewc.fisher_estimator must be one of {fisher_lib.ESTIMATORS}, '
                     f'got {fisher_estimator!r}')
  if num_samples < 1:
    raise ValueError(f'ewc.num_samples must be >= 1, got {num_samples}')

  def init(params):
    zeros = optax.tree.zeros_like(params)
    return EWCState(zeros, jax.tree.map(jnp.copy, params), jnp.zeros((), jnp.float32),
                    jnp.zeros((), jnp.int32))

  def loss(params, state, batch, apply_fn):
    del batch, apply_fn
    return 0.5 * strength * ewc_penalty(params, state)

  def end_task(params, state, task_data, apply_fn):
    task = int(state.num_tasks)
    rng = np.random.default_rng([seed, task])
    idx = rng.choice(task_data.size, size=min(num_samples, task_data.size), replace=False)
    subset = base.Batch(*(np.asarray(a)[np.sort(idx)] for a in task_data))
    f = fisher_lib.diagonal_fisher(apply_fn, params, subset, estimator=fisher_estimator,
                                   key=jax.random.fold_in(jax.random.key(seed), task),
                                   batch_size=fisher_batch_size)
    return consolidate(state, f, params)

  return base.Method(init=init, loss=loss, gradient_transform=base.identity_transform,
                     end_task=end_task)
