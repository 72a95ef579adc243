"""WUDI merging (Cheng et al. 2025, "Whoever Started the Interference Should End It"): a
data-free optimisation of each linear layer's merged task vector against the task vectors.

A linear layer's task vector tau_i spans the inputs its task cares about (its rows, in
PyTorch's (out, in) layout), so the interference of a merged vector tau_m on task i is measured
on them: per 2-D leaf WUDI minimises

  L(tau_m) = sum_i || (tau_m - tau_i) tau_i^T ||_F^2 / || tau_i ||_F^2

from tau_m = sum_i tau_i, with Adam (lr 1e-5, 300 steps in the authors' code; FusionBench's
config runs 400). Leaves that are not 2-D get the mean task vector. The merged model is
``base + scaling * tau_m`` (the authors add tau_m unscaled: scaling 1).

References:
  Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model
  Merging via Task Vectors", ICML 2025 (arXiv 2503.08099): the interference loss of the task
  vectors and its per-layer minimisation.
  FusionBench ``method/wudi/wudi.py`` (``wudi_merging``: init at the sum, Adam lr 1e-5, the loss
  divided by each task vector's squared norm, non-2-D parameters averaged).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from cljax.merging import leafwise
from cljax.merging import task_vectors as tvlib
from cljax.merging import validation

Params = Any


def interference_loss(merged: jax.Array, tvs: jax.Array) -> jax.Array:
  """``sum_i |(merged - tau_i) tau_i^T|_F^2 / |tau_i|_F^2`` of (out, in) matrices.

  Args:
    merged: (m, n) float.
    tvs: (T, m, n) float, the task vectors.

  Returns:
    float32 scalar.

  References:
    Cheng et al., ICML 2025 (the interference loss); FusionBench ``wudi_merging``.
  """
  norms = jnp.sum(tvs * tvs, axis=(1, 2))
  product = jnp.einsum('tmn,tkn->tmk', merged[None] - tvs, tvs)
  return jnp.sum(jnp.sum(product * product, axis=(1, 2)) / norms)


@functools.partial(jax.jit, static_argnames=('optimizer', 'num_steps'))
def wudi_matrix(tvs: jax.Array, *, optimizer: optax.GradientTransformation,
                num_steps: int) -> tuple:
  """WUDI's merged (out, in) matrix, optimised from the sum of the task vectors.

  Args:
    tvs: (T, out, in) float task vectors (each nonzero).
    optimizer: an optax transformation (static; the authors' Adam with lr 1e-5).
    num_steps: steps, >= 1 (static).

  Returns:
    ``(merged, losses)``: (out, in) float32, and (num_steps,) the loss before each step.

  References:
    Cheng et al., ICML 2025; FusionBench ``wudi_merging``.
  """
  merged = jnp.sum(tvs, axis=0)

  def step(carry, _):
    x, state = carry
    loss, grad = jax.value_and_grad(interference_loss)(x, tvs)
    updates, state = optimizer.update(grad, state, x)
    return (optax.apply_updates(x, updates), state), loss

  (merged, _), losses = jax.lax.scan(step, (merged, optimizer.init(merged)), None,
                                     length=num_steps)
  return merged, losses


def wudi(base: Params, finetuned: Sequence[Params], *, num_steps: int = 300,
         learning_rate: float = 1e-5, optimizer: Optional[optax.GradientTransformation] = None,
         scaling: float = 1.0, kernel_layout: str = 'in_out', average_only: tvlib.Exclude = None,
         exclude: tvlib.Exclude = None) -> Params:
  """WUDI merging: per 2-D leaf, the task-vector interference loss minimised by Adam.

  Args:
    base: base params, a pytree of float arrays.
    finetuned: T >= 1 params pytrees with base's structure, shapes and dtypes.
    num_steps: optimisation steps per leaf, >= 1 (the authors' 300).
    learning_rate: Adam's when ``optimizer`` is None (the authors' 1e-5).
    optimizer: any optax transformation (overrides learning_rate).
    scaling: multiplies the merged task vector (1: the authors'; may be traced).
    kernel_layout: 'in_out' (Flax / Haiku Dense kernels, transposed into the authors' (out, in)
      layout: the loss contracts the input dimension) or 'out_in' (PyTorch).
    average_only: regex(es) of 2-D leaves averaged instead (the authors' ``exclude_keys``).
    exclude: regex(es) of leaves that are not merged (base's value is kept).

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: mismatching or non-finite inputs (the model and path); bad num_steps,
      learning_rate, kernel_layout or scaling; a 2-D leaf where some task vector is 0 (its
      path: the loss divides by its norm; exclude it or list it in average_only).

  References:
    Cheng et al., ICML 2025 (arXiv 2503.08099); FusionBench ``wudi_merging``.
  """
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f'num_steps must be an int >= 1; got {num_steps!r}')
  if optimizer is None:
    learning_rate = validation.check_interval(learning_rate, name='learning_rate', low=0.0,
                                              high=float('inf'), low_open=True)
    optimizer = optax.adam(learning_rate)
  layout = leafwise.check_layout(kernel_layout)
  scaling = leafwise.check_scaling(scaling)
  p = leafwise.prepare(base, finetuned, exclude, method='wudi')
  flags = leafwise.matrix_flags(base, p, average_only)
  merged = []
  for j, (name, b, is_matrix) in enumerate(zip(p.names, p.base, flags)):
    if not is_matrix:
      merged.append(b + scaling * leafwise.mean_task_vector(p, j))
      continue
    tvs = jnp.stack([leafwise.as_out_in(m[j] - b, layout) for m in p.models])
    nonzero = jnp.all(jnp.sum(tvs * tvs, axis=(1, 2)) > 0)
    if not validation.is_traced(nonzero) and not bool(nonzero):
      raise ValueError(f'wudi: a task vector is zero at {name!r}; the interference loss divides '
                       f'by its norm (exclude the leaf or list it in average_only)')
    tau_m, _ = wudi_matrix(tvs, optimizer=optimizer, num_steps=num_steps)
    merged.append(b + scaling * leafwise.as_out_in(tau_m, layout))
  return leafwise.finish(base, p, merged, method='wudi')
