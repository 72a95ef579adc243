"""Magnitude-ranked sparsification of task vectors before merging: Model Breadcrumbs and DELLA.

  * `breadcrumbs`: per leaf, drop the largest ``gamma`` fraction of |tau| (outliers) and the
    smallest entries so that ``density`` of them remain, then add the masked task vectors (or
    their TIES-style sign-elected disjoint mean) to the base.
  * `della`: per leaf (or per output unit), MagPrune: keep each entry with a probability that
    grows linearly with its magnitude rank, from ``density - epsilon`` (smallest) to
    ``density + epsilon`` (largest); rescale the kept entries; elect signs and average the
    entries agreeing with the elected sign (TIES's elect and disjoint merge).

Both rank magnitudes with a stable sort: entries of equal magnitude are ordered by their flat
index (the first one counts as the smaller). Counts follow mergekit (``int(fraction * n)``).
Excluded leaves keep the base's value and take no part in any ranking.

References:
  Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
  ECCV 2024 (the per-layer mask removing the largest and the smallest magnitudes;
  theta = theta_0 + alpha sum_t m_t * tau_t).
  Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
  Sampling", arXiv 2406.11617 (MagPrune: per-node rank-linear drop probabilities, rescaling by
  1 / (1 - p_i); elect; fuse).
  mergekit ``sparsify.py`` (``magnitude_outliers``, ``della_magprune``) and
  ``generalized_task_arithmetic.py`` (sign consensus and normalized sum).
  Yadav et al., TIES-Merging, NeurIPS 2023, Sec. 3 (elect sign, disjoint merge).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from cljax.merging import leafwise
from cljax.merging import static
from cljax.merging import task_vectors as tvlib
from cljax.merging import validation

Params = Any
MERGES = ('task_arithmetic', 'ties')
DELLA_RESCALES = ('inverse_probability', 'l1', 'none')
DELLA_GRANULARITIES = ('row', 'tensor')


def _ranks(x: jax.Array, axis: int) -> jax.Array:
  """1-based rank of |x| along ``axis`` (stable: ties ordered by index)."""
  order = jnp.argsort(jnp.abs(x), axis=axis, stable=True)
  return jnp.argsort(order, axis=axis, stable=True) + 1


@functools.partial(jax.jit, static_argnames=('density', 'gamma'))
def breadcrumbs_mask(tv: jax.Array, *, density: float, gamma: float) -> jax.Array:
  """The Breadcrumbs mask of one leaf: True on the entries kept.

  With n entries, k = int(density * n) are kept: the n_top = int(gamma * n) largest
  magnitudes are dropped, then the n_bot = n - k - n_top smallest; if n_bot < 0, fewer of the
  largest are dropped (n_top + n_bot) so that k remain (mergekit's ``magnitude_outliers``).
  density >= 1 keeps everything. Unlike mergekit, n_top = 0 drops no large entries (mergekit's
  ``indices[n_bot:-0]`` would keep none).

  Args:
    tv: a float array (one leaf of a task vector), any shape.
    density: fraction of entries kept, in [0, 1] (static).
    gamma: fraction of the largest magnitudes dropped, in [0, 1] (static).

  Returns:
    A bool array of tv's shape.

  References:
    Davari & Belilovsky, ECCV 2024; mergekit ``sparsify.magnitude_outliers``.
  """
  n = tv.size
  if density >= 1:
    return jnp.ones(tv.shape, bool)
  keep = int(density * n)
  n_top = int(gamma * n)
  n_bot = n - keep - n_top
  if n_bot < 0:
    n_top, n_bot = n_top + n_bot, 0
  rank = _ranks(tv.reshape(-1), 0)          # 1 = smallest magnitude
  kept = (rank > n_bot) & (rank <= n - n_top)
  return kept.reshape(tv.shape)


def _merge_masked(base_leaves: list, masked: list, merge: str, scaling: jax.Array) -> list:
  """base + scaling * (sum or TIES disjoint mean) of the masked task vectors, per leaf."""
  if merge == 'task_arithmetic':
    merged_tv = [functools.reduce(jnp.add, group) for group in zip(*masked)]
  else:
    stacked = [jnp.stack(group) for group in zip(*masked)]
    merged_tv = static.ties_stacked(stacked, 1.0, 'per_tensor', 'mean')
  return [b + scaling * t for b, t in zip(base_leaves, merged_tv)]


def breadcrumbs(base: Params, finetuned: Sequence[Params], *, density: float, scaling: float,
                gamma: float = 0.01, merge: str = 'task_arithmetic',
                exclude: tvlib.Exclude = None) -> Params:
  """Model Breadcrumbs: drop the largest and the smallest |tau| per leaf, then merge.

  Each task vector tau_i is masked leaf by leaf with `breadcrumbs_mask`; then
  ``merge='task_arithmetic'`` returns ``base + scaling * sum_i m_i * tau_i`` (the paper), and
  ``'ties'`` ``base + scaling * disjoint_mean`` of the masked vectors under the elected sign
  (mergekit's ``breadcrumbs_ties`` with unit weights).

  Args:
    base: base params, a pytree of float arrays.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    density: fraction of each leaf's entries kept, in [0, 1] (the paper keeps the middle of the
      magnitude distribution: 1 - beta - gamma of it).
    scaling: alpha, a finite scalar (chosen on held-out data; may be traced).
    gamma: fraction of the largest magnitudes dropped, in [0, 1] (mergekit's default 0.01).
    merge: 'task_arithmetic' or 'ties'.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: mismatching or non-finite inputs (the model and path), density or gamma out of
      [0, 1], an unknown merge, a non-finite scaling, an exclude pattern matching nothing.

  References:
    Davari & Belilovsky, ECCV 2024 (the mask); mergekit ``sparsify.magnitude_outliers``.
  """
  density = validation.check_fraction(density, name='density')
  gamma = validation.check_fraction(gamma, name='gamma')
  validation.check_choice(merge, name='merge', choices=MERGES)
  scaling = leafwise.check_scaling(scaling)
  p = leafwise.prepare(base, finetuned, exclude, method='breadcrumbs')
  masked = [[jnp.where(breadcrumbs_mask(t, density=density, gamma=gamma), t, 0.0) for t in tv]
            for tv in p.task_vectors()]
  return leafwise.finish(base, p, _merge_masked(p.base, masked, merge, scaling),
                         method='breadcrumbs')


def _unit_view(x: jax.Array, granularity: str, layout: str) -> tuple:
  """A (d, units) view whose columns are ranked separately, and the map back to x's shape.

  'row' on a >= 2-D leaf: one column per output unit, the last axis of a Flax kernel
  (``layout='in_out'``) or the first of a PyTorch weight (``'out_in'``, mergekit's rows).
  Otherwise one column for the whole leaf.
  """
  if granularity == 'row' and x.ndim >= 2:
    if layout == 'in_out':
      return x.reshape(-1, x.shape[-1]), lambda v: v.reshape(x.shape)
    return x.reshape(x.shape[0], -1).T, lambda v: v.T.reshape(x.shape)
  return x.reshape(-1, 1), lambda v: v.reshape(x.shape)


@functools.partial(jax.jit, static_argnames=('density', 'epsilon', 'granularity',
                                             'kernel_layout'))
def magprune_probabilities(tv: jax.Array, *, density: float, epsilon: float,
                           granularity: str = 'row', kernel_layout: str = 'in_out') -> jax.Array:
  """DELLA's keep probabilities of one leaf: linear in the magnitude rank.

  Within each ranked group of n entries (an output unit's weights, or the whole leaf), the
  entry of rank r (1 = smallest |tau|) is kept with probability
  ``density - epsilon + 2 epsilon (r - 1) / (n - 1)`` (``density`` when n = 1): mergekit's
  ``della_magprune``; the paper's drop probabilities p_min + eps_paper r / n span eps_paper,
  so eps_paper = 2 epsilon.

  Args:
    tv: a float array (one leaf of a task vector).
    density: mean keep probability, in (0, 1).
    epsilon: half-width of the probabilities, with density +- epsilon inside (0, 1).
    granularity: 'row' (per output unit of >= 2-D leaves; 0-D and 1-D leaves are one group,
      as mergekit's single row) or 'tensor' (the whole leaf).
    kernel_layout: where a >= 2-D leaf keeps its output units: 'in_out' (last axis, Flax) or
      'out_in' (first axis, PyTorch). All four arguments are static.

  Returns:
    float32 probabilities of tv's shape.

  References:
    Deep et al., arXiv 2406.11617 (MagPrune); mergekit ``sparsify.della_magprune``.
  """
  view, back = _unit_view(tv, granularity, kernel_layout)
  n = view.shape[0]
  if n == 1:
    return jnp.full(tv.shape, density, jnp.float32)
  rank = _ranks(view, 0).astype(jnp.float32)
  return back(density - epsilon + 2 * epsilon * (rank - 1) / (n - 1))


def _della_keys(key: jax.Array, model: int, leaf: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(key, model), leaf)


def della_task_vectors(key: jax.Array, tvs: Sequence[Sequence[jax.Array]], *, density: float,
                       epsilon: float, rescale: str, granularity: str,
                       kernel_layout: str = 'in_out') -> list:
  """MagPrune each task vector: per model i and leaf j, entry kept where
  ``uniform(fold_in(fold_in(key, i), j), shape) < magprune_probabilities``; kept entries are
  rescaled by 1 / probability ('inverse_probability', the paper) or the leaf by
  |tau|_1 / |kept|_1 ('l1', mergekit; unchanged if either is below 1e-7), or not at all.

  Args:
    key: a PRNG key.
    tvs: per model, its task-vector leaves (float arrays).
    density, epsilon, granularity, kernel_layout: as `magprune_probabilities` (unchecked).
    rescale: 'inverse_probability', 'l1' or 'none'.

  Returns:
    Per model, its pruned leaves.

  References:
    Deep et al., arXiv 2406.11617 (MagPrune's drop and 1 / (1 - p) rescale); mergekit
    ``sparsify.rescaled_masked_tensor`` ('l1').
  """
  return [[_magprune_leaf(_della_keys(key, i, j), t, density=density, epsilon=epsilon,
                         rescale=rescale, granularity=granularity, kernel_layout=kernel_layout)
           for j, t in enumerate(tv)]
          for i, tv in enumerate(tvs)]


@functools.partial(jax.jit, static_argnames=('density', 'epsilon', 'rescale', 'granularity',
                                             'kernel_layout'))
def _magprune_leaf(key, t, *, density, epsilon, rescale, granularity, kernel_layout):
  probs = magprune_probabilities(t, density=density, epsilon=epsilon, granularity=granularity,
                                 kernel_layout=kernel_layout)
  kept = jnp.where(jax.random.uniform(key, t.shape) < probs, t, 0.0)
  if rescale == 'inverse_probability':
    kept = kept / probs
  elif rescale == 'l1':
    before, after = jnp.sum(jnp.abs(t)), jnp.sum(jnp.abs(kept))
    ok = (before >= 1e-7) & (after >= 1e-7)
    kept = jnp.where(ok, kept * before / jnp.where(ok, after, 1.0), kept)
  return kept


def della(base: Params, finetuned: Sequence[Params], *, key: jax.Array, density: float,
          scaling: float, epsilon: float = 0.15, rescale: str = 'inverse_probability',
          granularity: str = 'row', kernel_layout: str = 'in_out',
          exclude: tvlib.Exclude = None) -> Params:
  """DELLA-Merging: MagPrune (rank-linear keep probabilities, rescale), elect signs, fuse.

  1. Drop: `della_task_vectors` (documents the keys; reproducible from ``key``).
  2. Elect: per entry, the sign of the summed pruned mass.
  3. Fuse: the mean of the pruned entries agreeing with it (0 where none).
  Result: ``base + scaling * fused``.

  Args:
    base: base params, a pytree of float arrays.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    key: a PRNG key (`jax.random.key` or `PRNGKey`).
    density: mean keep probability, in (0, 1).
    epsilon: half-width of the keep probabilities, >= 0 with density +- epsilon in (0, 1)
      (mergekit's ``epsilon``; mergekit's default 0.15).
    scaling: lambda, a finite scalar (may be traced).
    rescale: 'inverse_probability' (the paper), 'l1' (mergekit's current rule) or 'none'.
    granularity: 'row' (ranks per output unit, mergekit's per-row ranking) or 'tensor'.
    kernel_layout: 'in_out' (Flax kernels: units on the last axis) or 'out_in' (PyTorch
      weights, e.g. safetensors checkpoints: units on the first axis).
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: mismatching or non-finite inputs (the model and path), density/epsilon out of
      range, an unknown rescale or granularity, a non-finite scaling, an exclude pattern
      matching nothing.

  References:
    Deep et al., arXiv 2406.11617 (MagPrune, elect, fuse); mergekit
    ``sparsify.della_magprune``.
  """
  density = validation.check_interval(density, name='density', low=0.0, high=1.0, low_open=True,
                                      high_open=True)
  epsilon = validation.check_interval(epsilon, name='epsilon', low=0.0, high=1.0)
  if density - epsilon <= 0 or density + epsilon >= 1:
    raise ValueError(f'della: density +- epsilon must lie in (0, 1); got density {density}, '
                     f'epsilon {epsilon}')
  validation.check_choice(rescale, name='rescale', choices=DELLA_RESCALES)
  validation.check_choice(granularity, name='granularity', choices=DELLA_GRANULARITIES)
  layout = leafwise.check_layout(kernel_layout)
  scaling = leafwise.check_scaling(scaling)
  p = leafwise.prepare(base, finetuned, exclude, method='della')
  pruned = della_task_vectors(key, p.task_vectors(), density=density, epsilon=epsilon,
                              rescale=rescale, granularity=granularity, kernel_layout=layout)
  return leafwise.finish(base, p, _merge_masked(p.base, pruned, 'ties', scaling), method='della')
