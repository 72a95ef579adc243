"""TALL masks and Consensus merging (Wang et al. 2024): localize each task's information inside
a merged task vector, and drop the weights that fewer than k tasks need.

With task vectors tau_t and a merged multi-task vector tau_MTL (task arithmetic's sum, or
TIES's merged vector), the TALL mask of task t keeps the entries where the merged model is
closer to the finetuned model than the base is, up to lambda_t:

  m_t = 1{ |tau_t| > lambda_t |tau_MTL - tau_t| }   (|theta_0 - theta_t| vs |theta_MTL - theta_t|)

(strict, as the authors' code; the paper writes >=). The consensus mask keeps the entries used
by at least k tasks, m = 1{ sum_t m_t >= k } (k = 2 drops "catastrophic" weights used by no
task and "selfish" ones used by one), and Consensus merging returns
``base + scaling * m * tau_MTL``. Excluded leaves keep the base's value and are False in every
mask.

References:
  Wang, Dimitriadis, Ortiz-Jimenez, Fleuret & Frossard, "Localizing Task Information for
  Improved Model Merging and Compression", ICML 2024 (TALL masks; consensus mask with
  threshold k; Consensus Task Arithmetic and Consensus TIES).
  Authors' code (github nik-dim/tall_masks; FusionBench ``method/tall_mask/utils.py``):
  ``generate_task_masks`` (strict >, tv = the merged vector), ``construct_consensus_mask``
  (count >= prun_thre_k).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from cljax.merging import leafwise
from cljax.merging import static
from cljax.merging import task_vectors as tvlib
from cljax.merging import validation

Params = Any
MERGES = ('task_arithmetic', 'ties')


def _lambdas(lambdas: Union[float, Sequence[float]], n: int) -> list:
  values = [lambdas] * n if not isinstance(lambdas, Sequence) else list(lambdas)
  if len(values) != n:
    raise ValueError(f'lambdas: {len(values)} values for {n} models')
  return [validation.check_interval(v, name=f'lambdas[{i}]', low=0.0, high=float('inf'))
          for i, v in enumerate(values)]


def _merged_tv(p: leafwise.Prepared, merge: str, density: float, reduce: str) -> list:
  tvs = p.task_vectors()
  if merge == 'task_arithmetic':
    return [sum(group) for group in zip(*tvs)]
  return static.ties_task_vectors(tvs, density=density, trim='global', reduce=reduce)


def _masks(p: leafwise.Prepared, merged_tv: list, lambdas: list) -> list:
  return [[jnp.abs(t) > lam * jnp.abs(mt - t) for t, mt in zip(tv, merged_tv)]
          for tv, lam in zip(p.task_vectors(), lambdas)]


def _as_tree(base: Params, p: leafwise.Prepared, leaves: list) -> Params:
  it = iter(leaves)
  return jax.tree.unflatten(jax.tree.structure(base),
                            [next(it) if m else jnp.zeros(jnp.shape(b), bool)
                             for b, m in zip(jax.tree.leaves(base), jax.tree.leaves(p.mask))])


def tall_masks(base: Params, finetuned: Sequence[Params], *,
               lambdas: Union[float, Sequence[float]] = 0.6, merge: str = 'task_arithmetic',
               density: float = 0.2, reduce: str = 'mean', exclude: tvlib.Exclude = None) -> list:
  """Per finetuned model, its TALL mask ``|tau_t| > lambda_t |tau_MTL - tau_t|``.

  Args:
    base: base params, a pytree of float arrays.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    lambdas: lambda_t >= 0, one for all or one per model (default 0.6, FusionBench's
      ``tall_mask_lambda``; the authors pick each task's from {0.2, ..., 0.6} on its validation
      set).
    merge: tau_MTL: 'task_arithmetic' (sum of the task vectors) or 'ties'
      (`static.ties_task_vectors` with ``density`` and ``reduce``, trimmed globally).
    density, reduce: TIES's, when ``merge='ties'``.
    exclude: regex(es) of leaves that are not merged (False in the masks).

  Returns:
    A list of n bool pytrees with base's structure.

  Raises:
    ValueError: mismatching or non-finite inputs (the model and path), lambdas of the wrong
      length or negative, an unknown merge, a pattern matching nothing.

  References:
    Wang et al., ICML 2024 (TALL masks); authors' ``generate_task_masks``.
  """
  validation.check_choice(merge, name='merge', choices=MERGES)
  p = leafwise.prepare(base, finetuned, exclude, method='tall_masks')
  lams = _lambdas(lambdas, len(p.models))
  masks = _masks(p, _merged_tv(p, merge, density, reduce), lams)
  return [_as_tree(base, p, m) for m in masks]


def consensus_mask(masks: Sequence[Params], *, k: int = 2) -> Params:
  """Entries kept by at least ``k`` of the masks: ``sum_t m_t >= k``.

  Args:
    masks: n >= 1 bool pytrees of one structure (e.g. `tall_masks`).
    k: the threshold, an int >= 0 (0 keeps everything; k > n keeps nothing).

  Returns:
    A bool pytree with the masks' structure.

  Raises:
    ValueError: no masks, or a bad k.

  References:
    Wang et al., ICML 2024 (consensus mask); authors' ``construct_consensus_mask``.
  """
  if not masks:
    raise ValueError('consensus_mask needs at least one mask')
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ValueError(f'k must be an int >= 0; got {k!r}')
  counts = jax.tree.map(lambda *ms: sum(m.astype(jnp.int32) for m in ms), *masks)
  return jax.tree.map(lambda c: c >= k, counts)


def consensus(base: Params, finetuned: Sequence[Params], *, scaling: float,
              lambdas: Union[float, Sequence[float]] = 0.6, k: int = 2,
              merge: str = 'task_arithmetic',
              density: float = 0.2, reduce: str = 'mean',
              exclude: tvlib.Exclude = None) -> Params:
  """Consensus merging: ``base + scaling * consensus_mask * tau_MTL``.

  tau_MTL is the task-arithmetic sum (Consensus TA) or the TIES-merged vector (Consensus TIES);
  the TALL masks are taken against that same vector (`tall_masks`).

  Args:
    base: base params, a pytree of float arrays.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    scaling: alpha, a finite scalar (chosen on held-out data; may be traced).
    lambdas: the TALL masks' lambda_t (one or per model; default 0.6, FusionBench's
      ``tall_mask_lambda``; the authors choose each task's on its validation set).
    k: the consensus threshold (the paper's default 2).
    merge: 'task_arithmetic' or 'ties'.
    density, reduce: TIES's, when ``merge='ties'``.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: as `tall_masks` and `consensus_mask`, or a non-finite scaling.

  References:
    Wang et al., ICML 2024 (Consensus Task Arithmetic / Consensus TIES).
  """
  validation.check_choice(merge, name='merge', choices=MERGES)
  scaling = leafwise.check_scaling(scaling)
  p = leafwise.prepare(base, finetuned, exclude, method='consensus')
  lams = _lambdas(lambdas, len(p.models))
  merged_tv = _merged_tv(p, merge, density, reduce)
  cons = consensus_mask(_masks(p, merged_tv, lams), k=k)
  merged = [b + scaling * jnp.where(m, t, 0.0) for b, m, t in zip(p.base, cons, merged_tv)]
  return leafwise.finish(base, p, merged, method='consensus')
