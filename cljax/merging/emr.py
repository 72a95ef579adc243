"""EMR-Merging (Huang et al. 2024): Elect a unified task vector, then give every task a
lightweight modulator, a mask and a rescaler, that recovers its own model from it.

With task vectors tau_t:

  * Elect: gamma = sgn(sum_t tau_t) (an entry whose sum is 0 counts as negative, as the
    authors' code), epsilon = max_t |tau_t| over the tasks whose sign agrees with gamma;
    tau_uni = gamma * epsilon.
  * Mask: M_t = (tau_t * gamma > 0).
  * Rescale: lambda_t = sum_l mean|tau_t^l| / sum_l mean|M_t^l * tau_uni^l| (sums over the merged
    leaves l of per-leaf means, as the authors' code).
  * Task t's model: theta_0 + lambda_t * M_t * tau_uni (`emr_task_model`).

EMR does not return one merged model: `emr` returns the unified vector and the modulators
(`EMRResult`); evaluation applies task t's modulator for task t.

References:
  Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging",
  NeurIPS 2024 (elect, mask, rescale).
  FusionBench ``method/emr_merging/utils.py`` (``emr_merge``: sign with zeros negative, per-leaf
  mean magnitudes summed for the rescalers).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from cljax.merging import leafwise
from cljax.merging import task_vectors as tvlib
from cljax.merging import validation

Params = Any


class EMRResult(NamedTuple):
  """EMR's unified task vector and per-task modulators.

  Attributes:
    unified: tau_uni, a pytree with base's structure (float32 or wider; 0 at excluded leaves).
    masks: T bool pytrees with base's structure (False at excluded leaves).
    rescalers: float32 (T,), lambda_t.
  """

  unified: Params
  masks: list
  rescalers: jax.Array


def _elect(tvs_leaf: list) -> tuple:
  flag = jnp.where(sum(tvs_leaf) > 0, 1.0, -1.0)
  masks = [t * flag > 0 for t in tvs_leaf]
  magnitude = jnp.zeros_like(tvs_leaf[0])
  for t, m in zip(tvs_leaf, masks):
    magnitude = jnp.maximum(magnitude, jnp.abs(jnp.where(m, t, 0.0)))
  return magnitude * flag, masks


def emr(base: Params, finetuned: Sequence[Params], *, exclude: tvlib.Exclude = None) -> EMRResult:
  """EMR-Merging: the elected unified task vector with per-task masks and rescalers.

  Args:
    base: base params theta_0, a pytree of float arrays.
    finetuned: T >= 1 params pytrees with base's structure, shapes and dtypes.
    exclude: regex(es) of leaves that are not merged (tau_uni 0, masks False; they take no
      part in the rescalers).

  Returns:
    An `EMRResult`.

  Raises:
    ValueError: mismatching or non-finite inputs (the model and path), an exclude pattern
      matching nothing, or a task whose masked unified vector is zero everywhere (its rescaler
      would divide by 0; the task index).

  References:
    Huang et al., NeurIPS 2024; FusionBench ``emr_merge``.
  """
  p = leafwise.prepare(base, finetuned, exclude, method='emr')
  tvs = p.task_vectors()
  n = len(tvs)
  unified, masks = [], [[] for _ in range(n)]
  for group in zip(*tvs):
    u, ms = _elect(list(group))
    unified.append(u)
    for t, m in enumerate(ms):
      masks[t].append(m)
  scales = jnp.stack([sum(jnp.mean(jnp.abs(x)) for x in tv) for tv in tvs])
  new_scales = jnp.stack([sum(jnp.mean(jnp.abs(jnp.where(m, u, 0.0)))
                              for m, u in zip(masks[t], unified)) for t in range(n)])
  if not validation.is_traced(new_scales):
    for t, s in enumerate(jax.device_get(new_scales)):
      if not float(s) > 0:
        raise ValueError(f'emr: the masked unified vector of finetuned[{t}] is zero everywhere '
                         f'(its task vector is 0 or disagrees with every elected sign); its '
                         f'rescaler is undefined')
  rescalers = (scales / new_scales).astype(jnp.float32)

  def tree(leaves, fill):
    it = iter(leaves)
    return jax.tree.unflatten(jax.tree.structure(base), [
        next(it) if m else fill(b) for b, m in zip(jax.tree.leaves(base),
                                                   jax.tree.leaves(p.mask))])

  zeros = lambda b: jnp.zeros(jnp.shape(b), tvlib.compute_dtype(b.dtype))
  falses = lambda b: jnp.zeros(jnp.shape(b), bool)
  return EMRResult(tree(unified, zeros), [tree(m, falses) for m in masks], rescalers)


def emr_task_model(base: Params, result: EMRResult, task: int) -> Params:
  """Task ``task``'s model: ``theta_0 + lambda_t * M_t * tau_uni``, in base's dtypes.

  Args:
    base: the base params `emr` was given.
    result: `emr`'s result.
    task: the task's index t, 0 <= t < T.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: task out of range; result not of base's structure.

  References:
    Huang et al., NeurIPS 2024; FusionBench ``EMRTaskModulator.apply``.
  """
  n = len(result.masks)
  if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < n:
    raise ValueError(f'emr_task_model: task must be an int in [0, {n}); got {task!r}')
  validation.check_same_structure(base, result.unified, other_name='result.unified',
                                  check_dtype=False)
  lam = result.rescalers[task]
  return jax.tree.map(
      lambda b, u, m: (b.astype(u.dtype) + lam * jnp.where(m, u, 0.0)).astype(b.dtype),
      base, result.unified, result.masks[task])
