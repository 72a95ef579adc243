"""Refresh learning: unlearn the current batch a little, then relearn it; chained with any method.

Wang et al. (ICLR 2024) cast continual-learning methods as one objective L_CL (cross-entropy plus
the method's output- or weight-space regularizer) and add a plug-in that, at every step, first
*unlearns* the current data by a Fisher-preconditioned, noisy gradient *ascent* step

    theta' = theta + gamma * F^{-1} grad L(theta) + noise                         (unlearn)

and then *relearns* by descending the method's full objective from there,

    update = -eta * grad L_CL(theta').                                             (relearn)

They show that this approximately minimizes L_CL plus a Fisher-weighted gradient norm,
gamma * ||grad L_CL||^2_{F^{-1}}, steering training towards flatter minima, which forget less.

How it is computed here (see `refresh` for the hyperparameters):

  * The unlearn step follows the authors' reference implementation: the ascent direction is the
    gradient of the current batch's cross-entropy, rescaled per parameter tensor to that tensor's
    norm (``normalize=True``), plus Gaussian noise of relative scale ``noise`` (the Langevin
    term; the reference code uses 0.001, here it is off unless asked for), preconditioned
    by the damped inverse diagonal Fisher (1 + c F)^{-1} and scaled by gamma = ``unlearn_rate``.
    F is the diagonal Fisher of the latest task(s) (`cljax.fisher`), computed at each task's end
    (F = 0, no preconditioning, during the first task).
  * The unlearn step is the method's ``intercept``: the training loop moves the parameters to
    theta' and then takes its ordinary step there, theta <- theta' - eta grad L_CL(theta'), with
    every other chained method's terms, gradient transforms and the optimizer: the paper's update
    (Algorithm 1), unlearn displacement included. ``chain(ewc(), refresh())`` (config
    ``methods=('ewc+refresh',)``) is refresh learning around EWC. The step's reported loss is the
    cross-entropy at theta'.

References:
  Wang, Li, Shen & Huang, "A Unified and General Framework for Continual Learning", ICLR 2024,
  Sec. 4 (refresh learning: unlearn by Fisher-preconditioned Langevin ascent, then relearn) and
  Algorithm 1; reference code github.com/joey-wang123/CL-refresh-learning (models/derpp.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cljax import checks
from cljax import core
from cljax import fisher as fisher_lib
from cljax.methods import base
from cljax.methods import regularizers

Params = Any
_EPS = 1e-12


class RefreshState(NamedTuple):
  """Attributes:
    fisher: pytree like params, the (decayed) diagonal Fisher of the tasks so far.
    num_tasks: int32 scalar, tasks finished.

  The unlearning noise is drawn from the loop's per-step key (folded with ``seed``).
  """

  fisher: Params
  num_tasks: jax.Array


def unlearn_displacement(params: Params, grads: Params, fisher: Params, noise: Params, *,
                         unlearn_rate: float, noise_scale: float, fisher_weight: float,
                         normalize: bool) -> Params:
  """The unlearn step's displacement theta' - theta, leaf by leaf:

      gamma * (d + sigma * xi) / (1 + c * F),   d = g * ||theta|| / ||g|| if normalize else g,

  with norms over each leaf (parameter tensor), g the ascent gradient, xi standard normal noise.

  Args:
    params, grads, fisher, noise: pytrees of the same structure and shapes (float).
    unlearn_rate: gamma >= 0.
    noise_scale: sigma >= 0.
    fisher_weight: c >= 0; (1 + c F)^{-1} is the damped inverse Fisher.
    normalize: rescale each leaf's gradient to the leaf's parameter norm.

  Returns:
    A pytree like ``params``.
  """
  def leaf(p, g, f, xi):
    d = g * (jnp.linalg.norm(p) / (jnp.linalg.norm(g) + _EPS)) if normalize else g
    return unlearn_rate * (d + noise_scale * xi) / (1.0 + fisher_weight * f)
  return jax.tree.map(leaf, params, grads, fisher, noise)


def refresh(
    *,
    unlearn_rate: float = 1e-5,
    noise: float = 0.0,
    fisher_weight: float = 0.001,
    normalize: bool = True,
    fisher_decay: float = 0.0,
    fisher_estimator: str = 'empirical',
    num_samples: int = 1024,
    fisher_batch_size: int = 32,
    seed: int = 0,
) -> base.Method:
  """Refresh learning: every step unlearns the batch, then relearns it from the unlearned point.

  See the module docstring for the update. Alone it refreshes plain fine-tuning; chained after
  another method (``chain(ewc(), refresh())``) that method's terms are evaluated at the unlearned
  point and its hooks see the step taken from there.

  Args:
    unlearn_rate: gamma >= 0, the unlearn step's size; with ``normalize`` a fraction of each
      parameter tensor's norm. 0 turns refresh off (no intercept). The default is the reference code's
      ``delta`` (1e-5). Each step keeps its displacement, so the rate must stay well below the
      descent step: around EWC on permuted Fashion-MNIST (SGD lr 0.05, momentum 0.9), measured
      ACC / BWT: 1e-5: 61.5 / -22.5, 1e-4: 69.1 / -13.3, 1e-3: 62.5 / -19.0, and 1e-2 collapses
      to chance (experiments/configs/permuted_fashion_mnist.py).
    noise: sigma >= 0, the Langevin noise's scale relative to the (normalized) ascent direction.
      Off by default: the reference code's 0.001 moves the unlearned point by ~3% of the ascent
      step on an MLP, while drawing a normal per parameter per step (threefry) about doubles the
      step's cost on CPU.
    fisher_weight: c >= 0 in the preconditioner (1 + c F)^{-1} (the reference code's 0.001).
    normalize: rescale the ascent gradient of each tensor to that tensor's norm (as the
      reference code does) rather than use it as is.
    fisher_decay: F <- fisher_decay * F + F_t at each task's end, in [0, 1] (0: the last task's
      Fisher alone; the reference code's 1e-5 is practically 0).
    fisher_estimator, num_samples, fisher_batch_size: the Fisher's estimator ('empirical' by
      default: squared gradients at the true labels, one backward pass per example, the closest
      to the reference code's p(y|x)-weighted true-label squared gradients; or 'exact',
      'sampled', see `cljax.fisher`), examples per task and chunk size. No Fisher is computed
      when fisher_weight is 0.
    seed: seeds the noise, the Fisher's example subset and sampled labels.

  Raises:
    ValueError: a negative or non-finite unlearn_rate, noise or fisher_weight, fisher_decay
      outside [0, 1], an unknown estimator, num_samples or fisher_batch_size < 1.

  References:
    Wang et al., "A Unified and General Framework for Continual Learning", ICLR 2024, Sec. 4 and
    Algorithm 1.
  """
  checks.non_negative('refresh.unlearn_rate', unlearn_rate)
  checks.non_negative('refresh.noise', noise)
  checks.non_negative('refresh.fisher_weight', fisher_weight)
  checks.fraction('refresh.fisher_decay', fisher_decay)
  checks.boolean('refresh.normalize', normalize)
  checks.one_of('refresh.fisher_estimator', fisher_estimator, fisher_lib.ESTIMATORS)
  checks.integer('refresh.num_samples', num_samples, minimum=1)
  checks.integer('refresh.fisher_batch_size', fisher_batch_size, minimum=1)

  def init(params):
    return RefreshState(optax.tree.zeros_like(params), jnp.zeros((), jnp.int32))

  def intercept(params, state, batch, *, apply_fn, key):
    """The unlearn step: theta' = theta + displacement (ascent on the batch's cross-entropy)."""
    def task_loss(p):
      return core.batch_loss(apply_fn(p, batch.x, train=True), batch)
    grads = jax.grad(task_loss)(params)
    if noise > 0:
      xi = optax.tree.random_like(jax.random.fold_in(key, seed), params)
    else:
      xi = optax.tree.zeros_like(params)
    delta = unlearn_displacement(params, grads, state.fisher, xi, unlearn_rate=unlearn_rate,
                                 noise_scale=noise, fisher_weight=fisher_weight,
                                 normalize=normalize)
    return optax.tree.add(params, delta), apply_fn

  def end_task(params, state, task_data, *, apply_fn, key):
    del key  # The Fisher's subset and sampled labels are seeded by (seed, task).
    fisher = state.fisher
    if fisher_weight > 0:
      f = regularizers.task_fisher(apply_fn, params, task_data, task=int(state.num_tasks),
                                   estimator=fisher_estimator, num_samples=num_samples,
                                   batch_size=fisher_batch_size, seed=seed)
      fisher = jax.tree.map(lambda old, new: fisher_decay * old + new, state.fisher, f)
    return RefreshState(fisher, state.num_tasks + 1)

  return base.Method(init=init, loss=base.no_loss, gradient_transform=base.identity_transform,
                     end_task=end_task, intercept=intercept if unlearn_rate > 0 else None)
