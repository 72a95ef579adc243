"""Continual merges: models arrive one at a time; memory does not grow with their number.

Each constructor returns a `ContinualMerge`, a NamedTuple of pure functions in the style of
`optax.GradientTransformation`:

  * ``init(base) -> state``: nothing merged yet (``params(init(base))`` is the base); the state
    holds its own copy of the base, so donating the state never deletes the caller's arrays;
  * ``update(state, finetuned) -> state``: merge one more finetuned model;
  * ``params(state) -> Params``: the merged model now, in the base's dtypes.

The state is a NamedTuple of the base, one pytree shaped like the base (float32 or wider) and a
few scalars, whatever the number of models merged, so it jits, shards, donates and checkpoints
like params: ``jax.jit(merge.update, donate_argnums=0)`` works. Updates are leaf-by-leaf tree
maps; the only cross-leaf quantities are norms and TIES's global threshold (reductions). Called
eagerly, ``update`` runs its checks on the host and the arithmetic in a cached jitted function.

``exclude`` (regex over '/'-joined leaf paths) works as in the static merges: excluded leaves
keep the base's value and take no part in norms, thresholds or projections.

Checks: ``init`` and ``update`` check structure, shapes and dtypes against the base (the first
mismatching path) and refuse NaN/Inf in an input model (its path). Under an outer `jax.jit` the
values are not visible, so run `cljax.merging.check_finite(finetuned)` on the host
before a jitted ``update``.

References:
  Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable
  Continual Model Merging", arXiv 2501.09522 (OPCM, Sec. 3 and Algorithm 1; continual task
  arithmetic / TIES / averaging baselines, implemented in FusionBench
  ``fusion_bench/method/opcm/{opcm,task_arithmetic,ties_merging,weight_average}.py``).
  Ilharco et al., ICLR 2023 (task arithmetic); Yadav et al., NeurIPS 2023 (TIES).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cljax import subspace
from cljax import tree as tree_lib
from cljax.merging import static
from cljax.merging import task_vectors as tvlib
from cljax.merging import validation

Params = Any
Exclude = tvlib.Exclude

_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


class ContinualMerge(NamedTuple):
  """A continual merge as three pure functions; see the module docstring."""

  init: Callable[[Params], Any]
  update: Callable[[Any, Params], Any]
  params: Callable[[Any], Params]


class SumState(NamedTuple):
  """State of `continual_average` and `continual_task_arithmetic`.

  Attributes:
    base: the base params (unchanged).
    task_vector_sum: sum of the task vectors merged so far, base's structure, float32 or wider,
      zero on excluded leaves.
    count: int32 scalar, number of models merged.
  """

  base: Params
  task_vector_sum: Params
  count: jax.Array


class TiesState(NamedTuple):
  """State of `continual_ties`.

  Attributes:
    base: the base params.
    merged_task_vector: m_t, the running merged task vector (params = base + m_t).
    count: int32 scalar, number of models merged.
  """

  base: Params
  merged_task_vector: Params
  count: jax.Array


class OPCMState(NamedTuple):
  """State of `opcm`.

  Attributes:
    base: the base params.
    projected_sum: the unscaled merged task vector, sum_i P(tau_i) (tau_1 unprojected); the
      merged model is base + projected_sum / lambda_t.
    norm_sum: float32 scalar, sum of the task-vector norms ||tau_i|| merged so far.
    count: int32 scalar, number of models merged.
  """

  base: Params
  projected_sum: Params
  norm_sum: jax.Array
  count: jax.Array


# --------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------


def _own_base(base: Params, exclude: Exclude) -> Params:
  """Checks the base and returns a copy owned by the state.

  The copy makes donation safe: ``jax.jit(update, donate_argnums=0)`` consumes the state's
  buffers, never the caller's ``base``.
  """
  mask = tvlib.merge_mask(base, exclude)
  validation.check_floating(base, mask)
  validation.check_finite(base, name='base')
  return jax.tree.map(jnp.array, base)


def _zeros_state_tree(base: Params) -> Params:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, tvlib.compute_dtype(x.dtype)), base)


def _check_update(base: Params, finetuned: Params, exclude: Exclude) -> tuple:
  """The eager checks of ``update``; returns the static merge flags, one per leaf."""
  validation.check_same_structure(base, finetuned)
  mask = tvlib.merge_mask(base, exclude)
  validation.check_finite(finetuned, name='finetuned')
  return tuple(jax.tree.leaves(mask))


def _task_vector_leaves(base: Params, finetuned: Params, flags: tuple) -> list:
  """finetuned - base (upcast) for the merged leaves, in flattening order."""
  return [f.astype(tvlib.compute_dtype(b.dtype)) - b.astype(tvlib.compute_dtype(b.dtype))
          for b, f, m in zip(jax.tree.leaves(base), jax.tree.leaves(finetuned), flags) if m]


def _replace_included(tree: Params, flags: tuple, new: list) -> Params:
  it = iter(new)
  leaves = [next(it) if m else x for x, m in zip(jax.tree.leaves(tree), flags)]
  return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def _included(tree: Params, flags: tuple) -> list:
  return [x for x, m in zip(jax.tree.leaves(tree), flags) if m]


@jax.jit
def _base_plus(base: Params, tv: Params, scale: Any) -> Params:
  """base + scale * tv in base's dtypes (tv is zero on excluded leaves, which stay exact)."""
  def leaf(b, t):
    return (b.astype(t.dtype) + scale * t).astype(b.dtype)
  return jax.tree.map(leaf, base, tv)


# --------------------------------------------------------------------------------------------
# Continual average and task arithmetic
# --------------------------------------------------------------------------------------------


def _sum_init(exclude: Exclude) -> Callable[[Params], SumState]:
  def init(base: Params) -> SumState:
    base = _own_base(base, exclude)
    return SumState(base, _zeros_state_tree(base), jnp.zeros((), jnp.int32))
  return init


@functools.partial(jax.jit, static_argnames=('flags',))
def _sum_update_impl(state: SumState, finetuned: Params, *, flags: tuple) -> SumState:
  tv = _task_vector_leaves(state.base, finetuned, flags)
  total = optax.tree.add(_included(state.task_vector_sum, flags), tv)
  return SumState(state.base, _replace_included(state.task_vector_sum, flags, total),
                  state.count + 1)


def _sum_update(exclude: Exclude) -> Callable[[SumState, Params], SumState]:
  def update(state: SumState, finetuned: Params) -> SumState:
    flags = _check_update(state.base, finetuned, exclude)
    return _sum_update_impl(state, finetuned, flags=flags)
  return update


def continual_average(*, exclude: Exclude = None) -> ContinualMerge:
  """Running uniform average: after n updates, ``base + (1/n) sum_i tau_i``, the static average.

  Args:
    exclude: regex(es) of leaves that are not merged.

  Returns:
    A `ContinualMerge` over `SumState`. ``params`` of the initial state is the base.

  References:
    Wortsman et al., ICML 2022 (uniform soup); FusionBench ``opcm/weight_average.py``.
  """
  def params(state: SumState) -> Params:
    return _base_plus(state.base, state.task_vector_sum,
                      1.0 / jnp.maximum(state.count, 1).astype(jnp.float32))

  return ContinualMerge(_sum_init(exclude), _sum_update(exclude), params)


def continual_task_arithmetic(*, scaling: float, exclude: Exclude = None) -> ContinualMerge:
  """Running task arithmetic: ``base + scaling * sum_i tau_i`` over the models merged so far.

  theta_t = theta_{t-1} + scaling * tau_t, i.e. the static task arithmetic of the same models.

  Args:
    scaling: lambda, a finite scalar.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    A `ContinualMerge` over `SumState`.

  Raises:
    ValueError: non-finite scaling.

  References:
    Ilharco et al., ICLR 2023, Sec. 2; FusionBench ``opcm/task_arithmetic.py``.
  """
  scaling = validation.check_finite_scalar(scaling, name='scaling')

  def params(state: SumState) -> Params:
    return _base_plus(state.base, state.task_vector_sum, scaling)

  return ContinualMerge(_sum_init(exclude), _sum_update(exclude), params)


# --------------------------------------------------------------------------------------------
# Continual TIES
# --------------------------------------------------------------------------------------------


def continual_ties(*, scaling: float, density: float = 0.2, trim: str = 'global',
                   reduce: str = 'sum', exclude: Exclude = None) -> ContinualMerge:
  """Continual TIES-Merging: TIES of the running merged task vector and the new task vector.

  The recurrence (FusionBench's ``ContinualTiesMergingForCLIP``, the continual-TIES baseline of
  Tang et al. 2025), with m_t the merged task vector and params_t = base + m_t:

    m_1 = scaling * tau_1                                            (no trim for the first)
    m_t = m_{t-1} + scaling * TIES(m_{t-1}, tau_t)                   (t >= 2)

  where TIES(a, b) = `static.ties_task_vectors`([a, b], density, trim, reduce): each of a and b
  trimmed to its top-``density`` magnitudes, sign elected per entry by the summed mass, then the
  disjoint sum (``reduce='sum'``, FusionBench's default ``merge_func``) or mean of the agreeing
  entries. Note that m_{t-1} enters twice: entries of m_{t-1} that survive its trim and agree
  with the elected sign grow by a factor (1 + scaling) at each step, as in the reference code.

  Args:
    scaling: lambda, a finite scalar (FusionBench's configuration uses 0.5).
    density: fraction kept by each trim, in [0, 1] (FusionBench: threshold 20 -> 0.2).
    trim: 'global' (over all merged leaves, as the reference, which flattens the model) or
      'per_tensor'.
    reduce: 'sum' or 'mean' for the disjoint merge.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    A `ContinualMerge` over `TiesState`.

  Raises:
    ValueError: non-finite scaling, density outside [0, 1], unknown trim or reduce.

  References:
    Yadav et al., NeurIPS 2023, Sec. 3; Tang et al., arXiv 2501.09522 (continual TIES baseline);
    FusionBench ``fusion_bench/method/opcm/ties_merging.py``.
  """
  scaling = validation.check_finite_scalar(scaling, name='scaling')
  density = validation.check_fraction(density, name='density')
  validation.check_choice(trim, name='trim', choices=static.TRIM_MODES)
  validation.check_choice(reduce, name='reduce', choices=('mean', 'sum'))

  def init(base: Params) -> TiesState:
    base = _own_base(base, exclude)
    return TiesState(base, _zeros_state_tree(base), jnp.zeros((), jnp.int32))

  def update(state: TiesState, finetuned: Params) -> TiesState:
    flags = _check_update(state.base, finetuned, exclude)
    return _ties_update_impl(state, finetuned, scaling=scaling, density=density, trim=trim,
                             reduce=reduce, flags=flags)

  def params(state: TiesState) -> Params:
    return _base_plus(state.base, state.merged_task_vector, 1.0)

  return ContinualMerge(init, update, params)


@functools.partial(jax.jit, static_argnames=('scaling', 'density', 'trim', 'reduce', 'flags'))
def _ties_update_impl(state: TiesState, finetuned: Params, *, scaling: float, density: float,
                      trim: str, reduce: str, flags: tuple) -> TiesState:
  t_leaves = _task_vector_leaves(state.base, finetuned, flags)
  m_leaves = _included(state.merged_task_vector, flags)

  def first(m, t):
    del m
    return [scaling * x for x in t]

  def later(m, t):
    stacked = [jnp.stack([x, y]) for x, y in zip(m, t)]
    merged = static.ties_stacked(stacked, density, trim, reduce)
    return [a + scaling * b for a, b in zip(m, merged)]

  new = jax.lax.cond(state.count == 0, first, later, m_leaves, t_leaves)
  return TiesState(state.base, _replace_included(state.merged_task_vector, flags, new),
                   state.count + 1)


# --------------------------------------------------------------------------------------------
# OPCM
# --------------------------------------------------------------------------------------------


def mass_rank(singular_values: jax.Array, alpha: Any) -> jax.Array:
  """Smallest r whose leading singular values reach the ``alpha`` share of their sum.

  ``r = min{r >= 1 : sum_{i<=r} s_i >= alpha * sum_i s_i}`` (singular values, not their squares:
  OPCM measures the mass of the spectrum, unlike GPM's energy), 0 for an all-zero input. Jittable.

  Args:
    singular_values: (k,) nonnegative, descending.
    alpha: scalar in (0, 1].

  Returns:
    int32 scalar in [0, k].

  Raises:
    ValueError: a concrete alpha outside (0, 1].

  References:
    Tang et al., arXiv 2501.09522, Sec. 3 (r_alpha).
  """
  if not validation.is_traced(alpha):
    validation.check_interval(alpha, name='alpha', low=0.0, high=1.0, low_open=True)
  s = singular_values.astype(jnp.float32)
  cumulative = jnp.cumsum(s)
  total = cumulative[-1]   # the prefix sums' own rounding, so that alpha = 1 reaches r = k
  short = jnp.sum(cumulative < alpha * total, dtype=jnp.int32)
  return jnp.where(total > 0, jnp.minimum(short + 1, s.shape[0]), 0)


def split_index(singular_values: jax.Array, alpha: Any) -> jax.Array:
  """The authors' OPCM split: the first index whose cumulative singular-value share exceeds alpha.

  ``r = argmax_i [sum_{j<=i} s_j / sum_j s_j > alpha]`` (0-based), 0 when no share exceeds alpha
  (alpha = 1, or an all-zero input): FusionBench's ``split_rank``, which zeroes an r x r block.
  For a share that never equals alpha exactly this is ``mass_rank - 1``. Jittable.

  Args:
    singular_values: (k,) nonnegative, descending.
    alpha: scalar in (0, 1].

  Returns:
    int32 scalar in [0, k - 1].

  Raises:
    ValueError: a concrete alpha outside (0, 1].

  References:
    Tang et al., arXiv 2501.09522, Sec. 3; FusionBench ``fusion_bench/method/opcm/opcm_general.py``
    (``merge_linear_weights``: ``(s.cumsum(0) / s.sum() > alpha).float().argmax()``).
  """
  if not validation.is_traced(alpha):
    validation.check_interval(alpha, name='alpha', low=0.0, high=1.0, low_open=True)
  s = singular_values.astype(tvlib.compute_dtype(singular_values.dtype))
  total = jnp.sum(s)
  share = jnp.cumsum(s) / jnp.where(total > 0, total, 1.0)
  exceeds = (share > alpha) & (total > 0)
  return jnp.argmax(exceeds).astype(jnp.int32)   # argmax of all-False is 0, as in torch


RANK_RULES = ('index', 'count')
# OPCM's projected leaves by default: 2-D Dense kernels (Flax's '.../kernel'; conv kernels are
# 4-D, embeddings are named 'embedding'), as the authors project only nn.Linear weights.
DEFAULT_PROJECT = r'(.*/)?kernel'


def _block_size(s: jax.Array, alpha: Any, rank_rule: str) -> jax.Array:
  return split_index(s, alpha) if rank_rule == 'index' else mass_rank(s, alpha)


def opcm_projection(task_vector: jax.Array, merged_task_vector: jax.Array, *,
                    alpha: Any, rank_rule: str = 'index') -> jax.Array:
  """OPCM's projection of a new 2-D task vector against the merged task vector's SVD.

  With ``merged_task_vector = U S Vᵀ`` (thin SVD, k = min(m, n), `cljax.subspace.truncated_svd`)
  and a block size r from S, the coefficients C = Uᵀ tau V (k x k) lose their diagonal and their
  leading r x r block:

    P(tau) = tau - U (M ⊙ C) Vᵀ,   M_ij = [i == j or (i < r and j < r)].

  ``rank_rule='index'`` (default, the authors' code): r = `split_index`(S, alpha), the index at
  which the cumulative share of singular values first exceeds alpha. ``'count'``: r =
  `mass_rank`(S, alpha), the smallest number of values reaching alpha (one more row and column,
  unless a share equals alpha exactly). This equals mapping back U_full C'_full V_fullᵀ the
  full-SVD coefficients with those entries zeroed (every zeroed entry lies in the leading k x k
  block), without forming the m x m and n x n bases. If the merged task vector is zero there is
  nothing to protect and tau is returned unchanged (the authors' code would divide by zero).
  Jittable; matmuls at HIGHEST precision.

  Args:
    task_vector: (m, n) float, the new task vector's leaf.
    merged_task_vector: (m, n) float, the current merged task vector's leaf (any positive
      scaling of it gives the same projection).
    alpha: scalar in (0, 1] (checked when concrete).
    rank_rule: 'index' or 'count' (above).

  Returns:
    (m, n) float32 (or wider).

  Raises:
    ValueError: inputs not 2-D or of different shapes; alpha outside (0, 1]; unknown rank_rule.

  References:
    Tang et al., arXiv 2501.09522, Sec. 3 (projection onto the subspace orthogonal to the merged
    task vector's singular directions, diagonal and leading block removed); FusionBench
    ``opcm/opcm_general.py`` ``merge_linear_weights``.
  """
  if task_vector.ndim != 2 or task_vector.shape != merged_task_vector.shape:
    raise ValueError(f'opcm_projection needs two 2-D arrays of one shape; got '
                     f'{task_vector.shape} and {merged_task_vector.shape}')
  if not validation.is_traced(alpha):
    validation.check_interval(alpha, name='alpha', low=0.0, high=1.0, low_open=True)
  validation.check_choice(rank_rule, name='rank_rule', choices=RANK_RULES)
  dtype = tvlib.compute_dtype(task_vector.dtype)
  tau = task_vector.astype(dtype)
  u, s, v = subspace.truncated_svd(merged_task_vector.astype(dtype), min(tau.shape))
  r = _block_size(s, alpha, rank_rule)
  coeff = _matmul(_matmul(u.T, tau), v)
  idx = jnp.arange(s.shape[0])
  remove = (idx[:, None] == idx[None, :]) | ((idx[:, None] < r) & (idx[None, :] < r))
  projected = tau - _matmul(_matmul(u, jnp.where(remove, coeff, 0.0)), v.T)
  return jnp.where(s[0] > 0, projected, tau)


def _project_flags(base: Params, flags: tuple, project: Exclude) -> tuple:
  """Per merged leaf (flattening order): projected (2-D and a ``project`` pattern matches)."""
  matched = jax.tree.leaves(tree_lib.select(base, project, name='opcm.project',
                                            require_match=False))
  return tuple(x.ndim == 2 and p for x, p, m in zip(jax.tree.leaves(base), matched, flags) if m)


def opcm(*, alpha: float = 0.5, rank_rule: str = 'index',
         project: Exclude = DEFAULT_PROJECT, exclude: Exclude = None) -> ContinualMerge:
  """OPCM: orthogonal-projection continual merging with adaptive scaling.

  The state keeps the unscaled merged task vector A_t, the sum of task-vector norms and the count
  (constant memory). With tau_t = theta_t - theta_base over the merged leaves:

    A_1 = tau_1
    A_t = A_{t-1} + P_{A_{t-1}}(tau_t)                                          (t >= 2)

  where, for every projected leaf, P is `opcm_projection` against that leaf of A_{t-1} (the SVD
  directions of the merged task vector; its scale does not matter), and every other merged leaf
  is added unprojected. The projected leaves are the 2-D leaves whose '/'-joined path
  `re.fullmatch`-es a ``project`` pattern: by default Dense kernels (``'(.*/)?kernel'``), as the
  authors project only ``nn.Linear`` weights and add embeddings, norms, biases and convolutions
  unprojected. The merged model rescales A_t so that its norm equals the running mean of the
  task-vector norms:

    lambda_t = ||A_t|| / ((1/t) sum_{i<=t} ||tau_i||),    params_t = base + A_t / lambda_t,

  all norms global L2 norms over the merged leaves (FusionBench's ``get_task_vector_norm`` of the
  flattened model). This is FusionBench's bookkeeping: its ``previous_lambda_t * merged_tv``
  is A_{t-1}, and ``params(state)`` after the first update is exactly the first model.

  Args:
    alpha: share of singular-value mass whose leading block is protected, in (0, 1]
      (FusionBench's default 0.5).
    rank_rule: the protected block's size r from the merged leaf's singular values: 'index'
      (default, the authors' code: the index where the cumulative share first exceeds alpha,
      `split_index`) or 'count' (the smallest count of values reaching alpha, `mass_rank`: one
      more row and column).
    project: regex(es) over leaf paths selecting the leaves projected (2-D ones only); a
      pattern matching no leaf projects nothing. ``'.*'`` projects every 2-D leaf.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    A `ContinualMerge` over `OPCMState`.

  Raises:
    ValueError: alpha outside (0, 1], an unknown rank_rule, a ``project`` pattern that is not a
      valid regex.

  References:
    Tang et al., arXiv 2501.09522, Sec. 3 and Algorithm 1 (projection P_alpha, time-varying
    scaling lambda_t); FusionBench ``fusion_bench/method/opcm/opcm_general.py``.
  """
  alpha = validation.check_interval(alpha, name='alpha', low=0.0, high=1.0, low_open=True)
  validation.check_choice(rank_rule, name='rank_rule', choices=RANK_RULES)
  tree_lib.compile_patterns(project, name='opcm.project')  # An invalid regex fails here.

  def init(base: Params) -> OPCMState:
    base = _own_base(base, exclude)
    return OPCMState(base, _zeros_state_tree(base), jnp.zeros((), jnp.float32),
                     jnp.zeros((), jnp.int32))

  def update(state: OPCMState, finetuned: Params) -> OPCMState:
    flags = _check_update(state.base, finetuned, exclude)
    return _opcm_update_impl(state, finetuned, alpha=alpha, rank_rule=rank_rule, flags=flags,
                             projected=_project_flags(state.base, flags, project))

  return ContinualMerge(init, update, _opcm_params)


@functools.partial(jax.jit, static_argnames=('alpha', 'rank_rule', 'flags', 'projected'))
def _opcm_update_impl(state: OPCMState, finetuned: Params, *, alpha: float, rank_rule: str,
                      flags: tuple, projected: tuple) -> OPCMState:
  t_leaves = _task_vector_leaves(state.base, finetuned, flags)
  a_leaves = _included(state.projected_sum, flags)

  def first(a, t):
    del a
    return list(t)

  def later(a, t):
    return [x + (opcm_projection(y, x, alpha=alpha, rank_rule=rank_rule) if p else y)
            for x, y, p in zip(a, t, projected)]

  new = jax.lax.cond(state.count == 0, first, later, a_leaves, t_leaves)
  norm = optax.tree.norm(t_leaves).astype(jnp.float32)
  return OPCMState(state.base, _replace_included(state.projected_sum, flags, new),
                   state.norm_sum + norm, state.count + 1)


@jax.jit
def _opcm_params(state: OPCMState) -> Params:
  """base + A_t / lambda_t with lambda_t = ||A_t|| / mean_i ||tau_i|| (0 if A_t = 0)."""
  mean_norm = state.norm_sum / jnp.maximum(state.count, 1).astype(jnp.float32)
  merged_norm = optax.tree.norm(state.projected_sum).astype(jnp.float32)
  scale = jnp.where(merged_norm > 0, mean_norm / jnp.where(merged_norm > 0, merged_norm, 1.0), 0.0)
  return _base_plus(state.base, state.projected_sum, scale)
