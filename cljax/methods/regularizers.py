"""Regularization-based continual training: finetune, l2, ewc, online_ewc, si, mas and lwf.

Each constructor takes keyword-only hyperparameters, validates them (a bad value raises a
ValueError naming it as ``<method>.<key>``, its config key) and returns a
`cljax.methods.base.Method`. The states are NamedTuples whose shapes are fixed by ``init(params)``:
every quadratic penalty keeps one importance pytree and one anchor, however many tasks were seen.

Parameters are named by their '/'-joined pytree paths (``'dense0/kernel'``, ``'head/bias'``; see
`cljax.tree`), so that regex rules over these names select what a method touches.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import checks
from cljax import core
from cljax import fisher as fisher_lib
from cljax import tree as tree_lib
from cljax.methods import base

Params = Any


def select_params(params: Params, pattern: str, *, name: str) -> Params:
  """`cljax.tree.select` with one pattern that must match some leaf: a pytree of Python bools."""
  return tree_lib.select(params, pattern, name=name)


def _copy(params: Params) -> Params:
  return jax.tree.map(jnp.copy, params)


def _subset(task_data: core.Batch, num_samples: int, seed: int, task: int) -> core.Batch:
  """``num_samples`` examples of ``task_data`` drawn without replacement, seeded by (seed, task)."""
  rng = np.random.default_rng([seed, task])
  idx = rng.choice(task_data.size, size=min(num_samples, task_data.size), replace=False)
  return jax.tree.map(lambda a: np.asarray(a)[np.sort(idx)], task_data)


def weighted_quadratic(params: Params, weights: Params, anchor: Params) -> jax.Array:
  """sum_i w_i (theta_i - a_i)^2 over every leaf; float32 scalar."""
  return optax.tree.sum(jax.tree.map(lambda w, p, a: w * jnp.square(p - a), weights, params, anchor))


# ------------------------------------------------------------------------------- finetune


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


# ------------------------------------------------------------------------------------- l2


class L2State(NamedTuple):
  """Attributes: ``anchor`` (params after the previous task), ``num_tasks`` (int32 scalar)."""

  anchor: Params
  num_tasks: jax.Array


def l2_penalty(params: Params, anchor: Params, selected: Params) -> jax.Array:
  """sum over the selected leaves of sum_i (theta_i - theta*_i)^2; float32 scalar.

  Args:
    params, anchor: pytrees of the same structure and shapes.
    selected: pytree of Python bools (static), e.g. from `select_params`.
  """
  terms = jax.tree.map(lambda s, p, a: jnp.sum(jnp.square(p - a)) if s else jnp.zeros(()),
                       selected, params, anchor)
  return optax.tree.sum(terms)


def l2(*, strength: float = 1.0, param_regex: str = '.*') -> base.Method:
  """L2 to the previous task's parameters (rehearsal-free L2 parameter regularization).

  Loss term at task t > 0: (strength / 2) * sum_{i selected} (theta_i - theta*_{t-1,i})^2, where
  theta*_{t-1} are the parameters after task t-1: EWC's penalty with the Fisher replaced by the
  identity, as Smith et al. compare it. Zero during the first task.

  Args:
    strength: lambda, >= 0.
    param_regex: selects the regularized parameters by '/'-joined path (``re.fullmatch``), e.g.
      ``'dense.*'`` leaves the head free, ``'.*/kernel'`` leaves biases free.

  Raises:
    ValueError: negative or non-finite strength, an invalid regex; and, from ``init``, a regex
      that matches no parameter (named ``l2.param_regex``).

  References:
    Smith et al., "A Closer Look at Rehearsal-Free Continual Learning", arXiv 2203.17269 (2022):
    the L2 parameter-regularization baseline, EWC's penalty (Kirkpatrick et al. 2017, Eq. 3) with
    uniform importance.
  """
  checks.non_negative('l2.strength', strength)
  tree_lib.compile_patterns(param_regex, name='l2.param_regex')

  def init(params):
    select_params(params, param_regex, name='l2.param_regex')
    return L2State(_copy(params), jnp.zeros((), jnp.int32))

  def loss(params, state, batch, *, logits, apply_fn, key):
    del batch, logits, apply_fn, key
    selected = select_params(params, param_regex, name='l2.param_regex')
    penalty = 0.5 * strength * l2_penalty(params, state.anchor, selected)
    return jnp.where(state.num_tasks > 0, penalty, 0.0)

  def end_task(params, state, task_data, *, apply_fn, key):
    del task_data, apply_fn, key
    return L2State(_copy(params), state.num_tasks + 1)

  return base.Method(init=init, loss=loss, gradient_transform=base.identity_transform,
                     end_task=end_task)


# ------------------------------------------------------------------------------------ ewc


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


def ewc_penalty(params: Params, state: EWCState) -> jax.Array:
  """sum_k sum_i F_k,i (theta_i - theta*_k,i)^2, from the constant-memory state; float32 scalar."""
  return weighted_quadratic(params, state.fisher, state.anchor) + state.offset


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
    decay: multiplies the old penalty first (1 for EWC).
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


def consolidate_online(state: EWCState, fisher: Params, params: Params, *, gamma: float) -> EWCState:
  """Online EWC's update: F <- gamma * F + F_t, anchor <- theta*_t (one anchor, no offset).

  Unlike `consolidate`, the old tasks' quadratics are re-centred on the latest parameters, as in
  Schwarz et al. (2018): the penalty is ||theta - theta*_t||^2 weighted by the running Fisher.
  """
  new_f = jax.tree.map(lambda f, ft: gamma * f + ft, state.fisher, fisher)
  return EWCState(new_f, _copy(params), jnp.zeros((), jnp.float32), state.num_tasks + 1)


def _ewc_init(params):
  return EWCState(optax.tree.zeros_like(params), _copy(params), jnp.zeros((), jnp.float32),
                  jnp.zeros((), jnp.int32))


def _validate_fisher_options(name, fisher_estimator, num_samples, fisher_batch_size):
  if fisher_estimator not in fisher_lib.ESTIMATORS:
    raise ValueError(f'{name}.fisher_estimator must be one of {fisher_lib.ESTIMATORS}, '
                     f'got {fisher_estimator!r}')
  checks.integer(f'{name}.num_samples', num_samples, minimum=1)
  checks.integer(f'{name}.fisher_batch_size', fisher_batch_size, minimum=1)


def task_fisher(apply_fn, params, task_data, *, task, estimator, num_samples, batch_size, seed):
  """The diagonal Fisher of one task on ``num_samples`` of its examples (seeded by seed, task)."""
  subset = _subset(task_data, num_samples, seed, task)
  return fisher_lib.diagonal_fisher(apply_fn, params, subset, estimator=estimator,
                                    key=jax.random.fold_in(jax.random.key(seed), task),
                                    batch_size=batch_size)


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
  checks.non_negative('ewc.strength', strength)
  _validate_fisher_options('ewc', fisher_estimator, num_samples, fisher_batch_size)

  def loss(params, state, batch, *, logits, apply_fn, key):
    del batch, logits, apply_fn, key
    return 0.5 * strength * ewc_penalty(params, state)

  def end_task(params, state, task_data, *, apply_fn, key):
    del key  # The Fisher's subset and sampled labels are seeded by (seed, task).
    f = task_fisher(apply_fn, params, task_data, task=int(state.num_tasks),
                    estimator=fisher_estimator, num_samples=num_samples,
                    batch_size=fisher_batch_size, seed=seed)
    return consolidate(state, f, params)

  return base.Method(init=_ewc_init, loss=loss, gradient_transform=base.identity_transform,
                     end_task=end_task)


def online_ewc(
    *,
    strength: float = 100.0,
    gamma: float = 1.0,
    fisher_estimator: str = 'exact',
    num_samples: int = 1024,
    fisher_batch_size: int = 32,
    seed: int = 0,
) -> base.Method:
  """Online EWC: one running Fisher F <- gamma * F + F_t, anchored at the last task's parameters.

  Loss term: (strength / 2) * sum_i F_i (theta_i - theta*_{t-1,i})^2, where F is the running
  Fisher after task t-1 and theta*_{t-1} the parameters after task t-1. Each task's F_t is the
  diagonal Fisher of `cljax.fisher` at the end of the task, as in `ewc`.

  The penalty uses F itself; Schwarz et al. write the penalty with gamma * F*_{t-1} during task t,
  which is the same up to the factor gamma on the strength (absorbed in ``strength``).

  Args:
    strength: lambda, >= 0.
    gamma: decay of the old Fisher in [0, 1] (1 accumulates without forgetting, 0 keeps only the
      last task's Fisher).
    fisher_estimator, num_samples, fisher_batch_size, seed: as in `ewc`.

  Raises:
    ValueError: a negative or non-finite strength, gamma outside [0, 1], an unknown estimator,
      num_samples < 1.

  References:
    Schwarz et al., "Progress & Compress: A scalable framework for continual learning", ICML 2018:
    online EWC, F*_t = gamma F*_{t-1} + F_t with the penalty anchored at theta*_{t-1}.
    Kirkpatrick et al., PNAS 2017, Eq. 3.
  """
  checks.non_negative('online_ewc.strength', strength)
  checks.fraction('online_ewc.gamma', gamma)
  _validate_fisher_options('online_ewc', fisher_estimator, num_samples, fisher_batch_size)

  def loss(params, state, batch, *, logits, apply_fn, key):
    del batch, logits, apply_fn, key
    return 0.5 * strength * weighted_quadratic(params, state.fisher, state.anchor)

  def end_task(params, state, task_data, *, apply_fn, key):
    del key  # The Fisher's subset and sampled labels are seeded by (seed, task).
    f = task_fisher(apply_fn, params, task_data, task=int(state.num_tasks),
                    estimator=fisher_estimator, num_samples=num_samples,
                    batch_size=fisher_batch_size, seed=seed)
    return consolidate_online(state, f, params, gamma=gamma)

  return base.Method(init=_ewc_init, loss=loss, gradient_transform=base.identity_transform,
                     end_task=end_task)


# ------------------------------------------------------------------------------------- si


class SIState(NamedTuple):
  """Synaptic Intelligence's state.

  Attributes:
    omega: pytree like params, omega_k of the current task: the running path integral
      -sum_steps g_k * delta theta_k of the unregularized gradient along the trajectory (Eq. 3).
    importance: pytree like params, Omega_k = sum over finished tasks of omega / (Delta^2 + xi)
      (Eq. 5).
    anchor: pytree like params, theta~: the parameters at the end of the previous task (the
      initial parameters during the first task).
  """

  omega: Params
  importance: Params
  anchor: Params


def si_path_step(omega: Params, updates: Params, task_grads: Params) -> Params:
  """omega_k <- omega_k - g_k * delta theta_k: one step of the path integral (Eq. 3).

  ``updates`` is the step's parameter change delta theta (the optimizer's updates), and
  ``task_grads`` the unregularized gradient g at the step's start; all pytrees like params.
  """
  return jax.tree.map(lambda w, u, g: w - g * u, omega, updates, task_grads)


def si_consolidate(state: SIState, params: Params, *, damping: float) -> SIState:
  """End of a task: Omega += omega / (Delta^2 + xi) with Delta = theta(end) - theta~ (Eq. 5)."""
  importance = jax.tree.map(lambda big, w, p, a: big + w / (jnp.square(p - a) + damping),
                            state.importance, state.omega, params, state.anchor)
  return SIState(optax.tree.zeros_like(state.omega), importance, _copy(params))


def si(*, strength: float = 0.1, damping: float = 0.1) -> base.Method:
  """Synaptic Intelligence: a per-parameter importance from the path integral of the loss.

  During a task, each step adds -g_k * delta theta_k to omega_k, where g is the gradient of the
  cross-entropy alone (the unregularized loss, passed by the training loop to ``update``) and
  delta theta the parameter change of the step (whatever optimizer made it). At the end of the
  task, Omega_k += omega_k / ((theta_k(end) - theta~_k)^2 + xi) and theta~ <- theta(end).

  Loss term: c * sum_k Omega_k (theta_k - theta~_k)^2 (Eq. 4, without a factor 1/2). Omega is not
  clipped at 0: a parameter whose steps on balance increased the loss gets a negative omega, as
  in the paper's definition.

  Omega grows with the number of steps, not only with the tasks: under SGD noise -g * delta theta
  is positive on average even at a minimum (and more so where the penalty holds the task
  gradient away from 0). The penalty's curvature 2 c Omega must stay within the optimizer's
  stability bound (lr * 2 c max Omega < 2 (1 + momentum) for SGD), which bounds c for long runs.

  Args:
    strength: c, >= 0.
    damping: xi > 0, keeps Omega bounded where a parameter barely moved.

  Raises:
    ValueError: a negative or non-finite strength, or damping <= 0.

  References:
    Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017, Eq. 3
    (omega), Eq. 4 (surrogate loss) and Eq. 5 (Omega).
  """
  checks.non_negative('si.strength', strength)
  checks.positive('si.damping', damping)

  def init(params):
    zeros = optax.tree.zeros_like(params)
    return SIState(zeros, zeros, _copy(params))

  def loss(params, state, batch, *, logits, apply_fn, key):
    del batch, logits, apply_fn, key
    return strength * weighted_quadratic(params, state.importance, state.anchor)

  def update(state, params, updates, task_grads, *, key):
    del params, key
    return state._replace(omega=si_path_step(state.omega, updates, task_grads))

  def end_task(params, state, task_data, *, apply_fn, key):
    del task_data, apply_fn, key
    return si_consolidate(state, params, damping=damping)

  return base.Method(init=init, loss=loss, gradient_transform=base.identity_transform,
                     end_task=end_task, update=update)


# ------------------------------------------------------------------------------------ mas


class MASState(NamedTuple):
  """Attributes: ``importance`` (Omega, summed over tasks), ``anchor`` (theta* after the last
  task), ``num_tasks`` (int32 scalar)."""

  importance: Params
  anchor: Params
  num_tasks: jax.Array


def _squared_output_norm(apply_fn, params, x, mask):
  """||F(x; theta)||_2^2 of one example over its allowed outputs (a task-IL head alone)."""
  logits = apply_fn(params, x[None], train=False)[0].astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, 0.0)
  return jnp.sum(jnp.square(logits))


@functools.partial(jax.jit, static_argnums=0)
def _chunk_mas_sum(apply_fn, params, x, mask, valid):
  per_example = jax.vmap(jax.grad(functools.partial(_squared_output_norm, apply_fn)),
                         in_axes=(None, 0, 0))(params, x, mask)
  weights = valid.astype(jnp.float32)
  return jax.tree.map(lambda g: jnp.tensordot(weights, jnp.abs(g), axes=1), per_example)


def mas_importance(apply_fn: core.ApplyFn, params: Params, data: core.Batch, *,
                   batch_size: int = 32) -> Params:
  """MAS importance: mean over examples of |d ||F(x_k; theta)||_2^2 / d theta|.

  The absolute gradient is taken per example, then averaged (Eq. 2 with the global l2^2 output
  function of Eq. 4), rather than the absolute value of a batch-averaged gradient, which lets
  examples with opposite-signed gradients cancel. F is the model's logits restricted to each
  example's mask (other heads' outputs are zeroed, so a task-IL head is its own function).

  Args:
    apply_fn: ``apply_fn(params, x, train=False) -> logits`` (B, K).
    params: parameter pytree.
    data: `Batch` of host arrays: x (N, ...), mask (N, K) bool; labels are not used.
    batch_size: examples per jitted chunk.

  Returns:
    A pytree like ``params``, float32, non-negative.

  Raises:
    ValueError: empty data.

  References:
    Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018, Eq. 2 and 4.
  """
  n = data.size
  if n == 0:
    raise ValueError('mas_importance needs at least one example')
  total = optax.tree.zeros_like(jax.tree.map(lambda p: p.astype(jnp.float32), params))
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size).clip(max=n - 1)  # Pad to one compiled shape.
    valid = np.arange(start, start + batch_size) < n
    x = np.asarray(data.x)[idx]
    mask = None if data.mask is None else np.asarray(data.mask)[idx]
    total = optax.tree.add(total, _chunk_mas_sum(apply_fn, params, x, mask, jnp.asarray(valid)))
  return optax.tree.scale(1.0 / n, total)


def mas(*, strength: float = 1.0, num_samples: int = 1024, batch_size: int = 32,
        seed: int = 0) -> base.Method:
  """Memory Aware Synapses: importance from the sensitivity of the output norm to each parameter.

  After each task, Omega += `mas_importance` on ``num_samples`` of its training examples (labels
  are not needed), and theta* <- theta. Loss term: lambda * sum_ij Omega_ij (theta_ij -
  theta*_ij)^2 (Eq. 3, without a factor 1/2).

  Args:
    strength: lambda, >= 0.
    num_samples: examples (without replacement, seeded) per task's importance.
    batch_size: examples per jitted chunk.
    seed: seeds the example subset.

  Raises:
    ValueError: a negative or non-finite strength, num_samples < 1, batch_size < 1.

  References:
    Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018, Eq. 2-4.
  """
  checks.non_negative('mas.strength', strength)
  checks.integer('mas.num_samples', num_samples, minimum=1)
  checks.integer('mas.batch_size', batch_size, minimum=1)

  def init(params):
    return MASState(optax.tree.zeros_like(params), _copy(params), jnp.zeros((), jnp.int32))

  def loss(params, state, batch, *, logits, apply_fn, key):
    del batch, logits, apply_fn, key
    return strength * weighted_quadratic(params, state.importance, state.anchor)

  def end_task(params, state, task_data, *, apply_fn, key):
    del key
    subset = _subset(task_data, num_samples, seed, int(state.num_tasks))
    omega = mas_importance(apply_fn, params, subset, batch_size=batch_size)
    return MASState(optax.tree.add(state.importance, omega), _copy(params), state.num_tasks + 1)

  return base.Method(init=init, loss=loss, gradient_transform=base.identity_transform,
                     end_task=end_task)


# ------------------------------------------------------------------------------------ lwf


class LwFState(NamedTuple):
  """Learning without Forgetting's state.

  Attributes:
    old_params: pytree like params, the model after the previous task (the teacher).
    old_outputs: (K,) bool, outputs that were a training label of some earlier task: the "old
      outputs" distilled.
    groups: (K,) int32 in [-1, K): outputs first allowed by the same task's masks share a
      group, numbered 0, 1, ... in order (-1: not allowed yet). Old outputs of one group share
      a softmax: a task-IL stream puts each task's head in its own group, a shared head
      (domain- and class-IL) is a single group.
    num_tasks: int32 scalar, tasks finished.
  """

  old_params: Params
  old_outputs: jax.Array
  groups: jax.Array
  num_tasks: jax.Array


def _segment_log_softmax(logits: jax.Array, segments: jax.Array) -> jax.Array:
  """log-softmax of (B, K) ``logits`` within each group of outputs given by (K,) ``segments``.

  Dense over a (K, K) same-group matrix (a (B, K, K) max and a (B, K) x (K, K) matmul: O(B K^2),
  K the model's output width) rather than segment ops, whose scatters dominated LwF's step on
  CPU. The matmul mixes groups with weight 0, so a non-finite logit would reach every group:
  callers pass finite values outside the groups they use (see `lwf_distillation`).
  """
  same = segments[:, None] == segments[None, :]
  top = jax.lax.stop_gradient(
      jnp.max(jnp.where(same[None], logits[:, None, :], -jnp.inf), axis=-1))
  shifted = logits - top
  return shifted - jnp.log(jnp.exp(shifted) @ same.T.astype(logits.dtype))


def lwf_distillation(logits: jax.Array, old_logits: jax.Array, old_outputs: jax.Array,
                     groups: jax.Array, *, temperature: float) -> jax.Array:
  """Knowledge-distillation loss on the old outputs: mean over the batch of
  -sum_groups sum_{i in group} y'_o(i) log yhat'_o(i), with y'_o = softmax(old_logits / T) and
  yhat'_o = softmax(logits / T) each taken within a group of old outputs (Eq. 2-3 of Li & Hoiem,
  summed over old heads).

  Args:
    logits: (B, K) current model's outputs.
    old_logits: (B, K) previous model's outputs on the same inputs (treated as constants).
    old_outputs: (K,) bool, the outputs distilled.
    groups: (K,) int32 in [-1, K), the softmax group of each output.
    temperature: T > 0.

  Returns:
    float32 scalar; 0 when no output is old.
  """
  k = logits.shape[-1]
  active = old_outputs & (groups >= 0)
  segments = jnp.where(active, groups, k)  # Segment k collects the outputs not distilled.
  # Outputs not distilled are zeroed: whatever they hold (even Inf or NaN) must not reach the
  # distilled groups through the dense log-softmax.
  logits = jnp.where(active, logits.astype(jnp.float32), 0.0)
  old = jnp.where(active, jax.lax.stop_gradient(old_logits.astype(jnp.float32)), 0.0)
  log_q = _segment_log_softmax(logits / temperature, segments)
  p = jnp.exp(_segment_log_softmax(old / temperature, segments))
  return -jnp.mean(jnp.sum(jnp.where(active, p * log_q, 0.0), axis=-1))


def infer_num_outputs(params: Params, *, name: str) -> int:
  """The output size K from the last axis of the ``head`` layer's bias (else kernel).

  `cljax.models` names every model's last layer ``head``.

  Raises:
    ValueError: no parameter path ends in ``head/bias`` or ``head/kernel`` (names ``name``, the
      hyperparameter to set instead).
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for suffix in ('head/bias', 'head/kernel'):
    for path, leaf in leaves:
      leaf_name = tree_lib.path_str(path)
      if leaf_name == suffix or leaf_name.endswith('/' + suffix):
        return int(leaf.shape[-1])
  raise ValueError(f'cannot infer the number of outputs: no parameter named .../head/bias or '
                   f'.../head/kernel; set {name}')


@functools.partial(jax.jit, static_argnums=0)
def _forward(apply_fn, params, x):
  return apply_fn(params, x, train=False).astype(jnp.float32)


def record_logits(apply_fn: core.ApplyFn, params: Params, x: np.ndarray, *,
                  batch_size: int = 1024) -> np.ndarray:
  """A model's outputs on every input, in fixed-size jitted chunks (one compile).

  Args:
    apply_fn, params: the model.
    x: (N, ...) host inputs.
    batch_size: chunk size (the last chunk is padded).

  Returns:
    (N, K) float32 host array.
  """
  n = len(x)
  out = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size).clip(max=n - 1)
    out.append(np.asarray(_forward(apply_fn, params, np.asarray(x)[idx]))[: n - start])
  return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)


TEACHER_LOGITS = 'teacher_logits'  # `Batch.aux` key of LwF's recorded old-model outputs.


def lwf(*, strength: float = 1.0, temperature: float = 2.0, num_outputs: int = 0) -> base.Method:
  """Learning without Forgetting: distillation to the previous model on the current inputs.

  Loss term at task t > 0: lambda_o * `lwf_distillation` between the current model and the model
  after task t-1 (a frozen copy in the state), on the current batch's inputs, over the old
  outputs, softened by temperature T. Which outputs are old depends on the scenario, read off the
  earlier tasks' labels and masks (no scenario flag needed):

    * task-incremental (per-task heads, masks select a block): every earlier task's head,
      each with its own softmax (LwF's sum over old tasks);
    * domain-incremental (shared head, all outputs used by every task): all outputs, one softmax;
    * class-incremental (shared head, new classes per task): the classes of earlier tasks only,
      one softmax over them (the new classes have no old response to preserve).

  As Li & Hoiem's Algorithm 1, the old model's responses Y_o on the task's inputs are recorded
  once before the task (``prepare_task`` adds ``aux['teacher_logits']``), so a training step
  costs no teacher forward pass, and the distillation is a ``loss`` term on the loop's own
  logits (one backward pass for cross-entropy and distillation). On a batch without recorded
  responses the term runs the old model.

  LwF's warm-up phase (training the new head alone first) is not done: with a shared output
  layer there is no separate new head.

  Args:
    strength: lambda_o, >= 0.
    temperature: T > 0 (Li & Hoiem use 2).
    num_outputs: K, the model's output size; 0 infers it from the ``head`` layer (see
      `infer_num_outputs`).

  Raises:
    ValueError: a negative or non-finite strength, a temperature <= 0, num_outputs < 0; from
      ``init``, no ``head`` layer to infer num_outputs from.

  References:
    Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017, Eq. 2 (L_old) and Eq. 3
    (temperature-softened probabilities).
  """
  checks.non_negative('lwf.strength', strength)
  checks.positive('lwf.temperature', temperature)
  checks.integer('lwf.num_outputs', num_outputs, minimum=0)

  def init(params):
    k = num_outputs or infer_num_outputs(params, name='lwf.num_outputs')
    return LwFState(_copy(params), jnp.zeros((k,), bool), jnp.full((k,), -1, jnp.int32),
                    jnp.zeros((), jnp.int32))

  def loss(params, state, batch, *, logits, apply_fn, key):
    del params, key
    old_logits = batch.aux.get(TEACHER_LOGITS)
    if old_logits is None:
      old_logits = apply_fn(state.old_params, batch.x, train=False)
    kd = lwf_distillation(logits, old_logits, state.old_outputs, state.groups,
                          temperature=temperature)
    return jnp.where(state.num_tasks > 0, strength * kd, 0.0)

  def end_task(params, state, task_data, *, apply_fn, key):
    del apply_fn, key
    k = state.old_outputs.shape[0]
    labels = np.asarray(task_data.y).reshape(-1)
    mask = (np.ones((1, k), bool) if task_data.mask is None else np.asarray(task_data.mask))
    if mask.shape[-1] != k:
      raise ValueError(f'lwf.num_outputs: the state has {k} outputs but the task data has '
                       f'{mask.shape[-1]}')
    allowed = mask.any(axis=0)
    groups = np.asarray(state.groups)
    groups = np.where((groups < 0) & allowed, groups.max() + 1, groups).astype(np.int32)
    old = np.asarray(state.old_outputs) | (np.bincount(labels, minlength=k)[:k] > 0)
    return LwFState(_copy(params), jnp.asarray(old), jnp.asarray(groups), state.num_tasks + 1)

  def prepare_task(params, state, data, *, seen, apply_fn, key):
    del params, seen, key  # The teacher is the model after the previous task, in the state.
    return data.with_aux(**{TEACHER_LOGITS: record_logits(apply_fn, state.old_params, data.x)})

  return base.Method(init=init, loss=loss, gradient_transform=base.identity_transform,
                     end_task=end_task, prepare_task=prepare_task)
