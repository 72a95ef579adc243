"""Static (all-at-once) merges: ``merge(base, finetuned: Sequence[Params], **hp) -> Params``.

Every merge works over arbitrary parameter pytrees and in task-vector space, with
``tau_i = theta_i - theta_base``:

  * `average` (model soup), `task_arithmetic`, `ties`, `dare` (+ task arithmetic or TIES),
    `fisher`, `magmax` and `frank_wolfe` (FW-Merging, hard variant).
  * ``exclude`` (regex over '/'-joined leaf paths, see `cljax.merging.task_vectors`) names leaves
    that are not merged: the result holds the base's value there, and those leaves take no part
    in any statistic (TIES's global top-k, norms, Frank-Wolfe scores).
  * Inputs are checked eagerly before anything is computed (`cljax.merging.validation`): the
    first mismatching path in structure, shape or dtype, NaN/Inf in any input model (its path),
    hyperparameters out of range, an empty list of models, an exclude pattern matching nothing.
    One exception saves a full read of every model: in `average`, `task_arithmetic` and `ties`
    a NaN or Inf in any merged input leaf makes the result non-finite there (linearity; TIES
    keeps non-finite entries through its trim and adds 0 x the summed mass); they check the
    excluded leaves of the inputs and the merged leaves of the *result*, and only when the result
    is not finite run the full input check, which names the model and path (or, with finite
    inputs, report the overflow). Nothing non-finite is ever returned.
  * The arithmetic runs in at least float32 (bf16 params are upcast) inside jitted functions;
    the result has the base's dtypes. Hyperparameters that change shapes (density, trim, number
    of steps) are static; scaling coefficients are traced, so sweeping lambda does not recompile.
  * Merging is memory-bound. Average, task arithmetic, MagMax and TIES's elect-and-merge step are
    written leaf by leaf as chains over the models, which XLA fuses into one pass over the n + 1
    inputs with no (n, *shape) stacked copy; TIES's per-model thresholds are one jitted call per
    model (compiled once, as the models share shapes). See benchmarks/merge_throughput.py.

The building blocks over lists of task-vector pytrees are public and jittable:
`trim_task_vector`, `ties_task_vectors`, `dare_task_vectors`, `kth_largest_magnitude`.

References:
  Wortsman et al., "Model soups", ICML 2022 (uniform soup).
  Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, Sec. 2.
  Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023, Sec. 3
  and Algorithm 1 (trim, elect sign, disjoint merge).
  Yu et al., "Language Models are Super Mario" (DARE), ICML 2024, Sec. 3.
  Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022, Sec. 2.
  Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024.
  Chen et al., "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization", arXiv
  2503.12649, Algorithm 1 (hard variant).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.merging import task_vectors as tvlib
from cljax.merging import validation

Params = Any
Exclude = tvlib.Exclude
TRIM_MODES = ('global', 'per_tensor')
THRESHOLD_MODES = ('exact', 'sampled')
DARE_MERGES = ('task_arithmetic', 'ties')
FW_CRITERIA = ('cosine', 'inner')

_BINS = 1 << 16   # radix-select digit: 16 bits of a float32 magnitude per pass
_SORT_MAX = 1 << 16   # up to this many entries per task vector, a sort selects the threshold


# --------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------
#
# Inside the jitted implementations the n task vectors are held leaf by leaf as *stacked*
# arrays of shape (n, *leaf_shape): every per-entry statistic is then one vectorized op per
# leaf, so the compiled program grows with the number of leaves, not leaves x models (a model
# with hundreds of leaves merged from 8 models otherwise takes minutes to compile).


class _Prepared(NamedTuple):
  mask: Any          # merge_mask(base, exclude): pytree of Python bools
  base: list         # merged leaves of base, flattening order
  models: list       # per finetuned model, its merged leaves


def _prepare(base: Params, finetuned: Sequence[Params], exclude: Exclude, *,
             check_values: bool = True) -> _Prepared:
  """Checks the inputs and splits off the merged leaves.

  With ``check_values=False`` (linear merges, see the module docstring) only the excluded leaves'
  values are checked here; the caller checks the result with `_check_result`.
  """
  models = validation.check_models(base, finetuned, check_values=check_values)
  mask = tvlib.merge_mask(base, exclude)
  validation.check_floating(base, mask)
  if not check_values:
    excluded = lambda tree: jax.tree.map(lambda x, m: None if m else x, tree, mask)
    validation.check_finite(excluded(base), name='base')
    for i, model in enumerate(models):
      validation.check_finite(excluded(model), name=f'finetuned[{i}]')
  return _Prepared(mask, tvlib.included_leaves(base, mask),
                   [tvlib.included_leaves(m, mask) for m in models])


def _finite_flags(leaves: list) -> list:
  """Per leaf, whether every entry is finite (jittable; as `validation.check_finite`)."""
  return [jnp.isfinite(jnp.sum(x * jnp.zeros((), x.dtype))) for x in leaves]


def _check_result(flags: list, merged: list, base: Params, finetuned: Sequence[Params],
                  mask: Any) -> None:
  """Raises if the result of a linear merge is not finite, naming the input that caused it.

  Args:
    flags: `_finite_flags` of the merged leaves (host-readable unless traced).
    merged: the merged leaves, flattening order.
    base, finetuned, mask: the merge's inputs and `merge_mask`.

  Raises:
    ValueError: NaN/Inf in an input (its model and path, from `validation.check_models`), or
      an overflow of finite inputs (the result's path).
  """
  if validation.is_traced(flags):
    return
  flags = jax.device_get(flags)
  if all(bool(f) for f in flags):
    return
  validation.check_models(base, finetuned)  # Names the first non-finite input.
  paths = [p for (p, _), m in zip(jax.tree_util.tree_flatten_with_path(base)[0],
                                  jax.tree.leaves(mask)) if m]
  bad = next(p for p, f in zip(paths, flags) if not bool(f))
  raise ValueError(f'the merged model is not finite at {jax.tree_util.keystr(tuple(bad))} although '
                   f'every input is: the merge overflowed {merged[0].dtype}')


def _stack(trees: Sequence[Sequence[jax.Array]]) -> list:
  """n lists of leaves -> one (n, *shape) array per leaf, upcast to the compute dtype."""
  return [jnp.stack(group) for group in zip(*[tvlib.upcast(t) for t in trees])]


def _stacked_task_vectors(base_leaves: list, model_leaves: list) -> list:
  base_up = tvlib.upcast(base_leaves)
  return [s - b[None] for s, b in zip(_stack(model_leaves), base_up)]


def _chain_sum(base_leaves: list, model_leaves: list) -> list:
  """sum_i (theta_i - theta_base) per merged leaf, upcast: a chain of elementwise ops per leaf,
  which XLA fuses into one pass over the n + 1 inputs (no stacked copy)."""
  sums = []
  for j, b in enumerate(tvlib.upcast(base_leaves)):
    sums.append(functools.reduce(jnp.add, [m[j].astype(b.dtype) - b for m in model_leaves]))
  return sums


def _unstack(stacked: list, treedef: Any) -> list:
  n = stacked[0].shape[0]
  return [jax.tree.unflatten(treedef, [x[i] for x in stacked]) for i in range(n)]


def _add_to_base(base_leaves: list, merged_tv: list, scaling: Any) -> list:
  """base + scaling * merged_tv, computed upcast, returned in the base leaves' dtypes."""
  out = optax.tree.add_scale(tvlib.upcast(base_leaves), scaling, merged_tv)
  return [x.astype(b.dtype) for x, b in zip(out, base_leaves)]


def _scalar(value: Any, name: str) -> jax.Array:
  if not validation.is_traced(value):
    validation.check_finite_scalar(value, name=name)
  return jnp.asarray(value, jnp.float32)


def _per_model(values: jax.Array, like: jax.Array) -> jax.Array:
  """(n,) -> (n, 1, ..., 1) broadcasting against a stacked leaf."""
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


# --------------------------------------------------------------------------------------------
# Average and task arithmetic
# --------------------------------------------------------------------------------------------


@jax.jit
def _average_impl(base_leaves, model_leaves):
  n = len(model_leaves)
  merged = _add_to_base(base_leaves, _chain_sum(base_leaves, model_leaves), 1.0 / n)
  return merged, _finite_flags(merged)


def average(base: Params, finetuned: Sequence[Params], *, exclude: Exclude = None) -> Params:
  """Uniform average of the finetuned models (a model soup): ``base + mean_i tau_i``.

  Args:
    base: base params (pytree of float arrays), the origin of the task vectors; excluded
      leaves keep its value.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    exclude: regex(es) over '/'-joined leaf paths that are not merged (base's value is kept).

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: empty ``finetuned``, structure/shape/dtype mismatch, NaN/Inf (with its path),
      or an exclude pattern matching no leaf.

  References:
    Wortsman et al., ICML 2022 (uniform soup: theta = 1/n sum_i theta_i).
  """
  p = _prepare(base, finetuned, exclude, check_values=False)
  merged, flags = _average_impl(p.base, p.models)
  _check_result(flags, merged, base, finetuned, p.mask)
  return tvlib.combine(base, p.mask, merged)


@jax.jit
def _task_arithmetic_impl(base_leaves, model_leaves, scaling):
  merged = _add_to_base(base_leaves, _chain_sum(base_leaves, model_leaves), scaling)
  return merged, _finite_flags(merged)


def task_arithmetic(base: Params, finetuned: Sequence[Params], *, scaling: float,
                    exclude: Exclude = None) -> Params:
  """Task arithmetic: ``base + scaling * sum_i tau_i``.

  Args:
    base: base params.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    scaling: lambda, a finite scalar (Ilharco et al. choose it on held-out data; there is no
      universal default). Traced under jit, so sweeping it does not recompile.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: as `average`, or a non-finite ``scaling``.

  References:
    Ilharco et al., ICLR 2023, Sec. 2 (theta = theta_pre + lambda * sum_t tau_t).
  """
  p = _prepare(base, finetuned, exclude, check_values=False)
  merged, flags = _task_arithmetic_impl(p.base, p.models, _scalar(scaling, 'scaling'))
  _check_result(flags, merged, base, finetuned, p.mask)
  return tvlib.combine(base, p.mask, merged)


# --------------------------------------------------------------------------------------------
# TIES: trim, elect sign, disjoint merge
# --------------------------------------------------------------------------------------------


def _top_digit(counts: jax.Array, k: Any) -> tuple:
  """Largest digit d with #{digit >= d} >= k, and the number of items with a larger digit."""
  at_or_above = jnp.cumsum(counts[::-1])[::-1]
  digit = jnp.sum(at_or_above >= k, dtype=jnp.int32) - 1
  above = jnp.concatenate([at_or_above, jnp.zeros((1,), at_or_above.dtype)])[digit + 1]
  return digit, above


def _row_bincount(x: jax.Array, length: int) -> jax.Array:
  """Per-row histogram of an (n, m) int array with values in [0, length): (n, length)."""
  return jax.vmap(lambda row: jnp.bincount(row, length=length))(x)


def _kth_largest_rows(stacked: Sequence[jax.Array], k: Any) -> jax.Array:
  """Row-wise `kth_largest_magnitude`: for each i, over the entries ``x[i]`` of every leaf."""
  n = stacked[0].shape[0]
  if sum(x[0].size for x in stacked) <= _SORT_MAX:
    return _kth_largest_rows_sort(stacked, k)
  bits = [jax.lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32), jnp.int32).reshape(n, -1)
          for x in stacked]   # nonnegative floats order like their bit patterns
  high = functools.reduce(jnp.add, [_row_bincount(b >> 16, _BINS) for b in bits])
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (n,))
  d1, above = jax.vmap(_top_digit)(high, k)
  low = functools.reduce(jnp.add, [
      _row_bincount(jnp.where((b >> 16) == d1[:, None], b & (_BINS - 1), _BINS),
                    _BINS + 1)[:, :_BINS] for b in bits])
  d2, _ = jax.vmap(_top_digit)(low, k - above)
  return jax.lax.bitcast_convert_type((d1 << 16) | d2, jnp.float32)


def _kth_largest_rows_sort(stacked: Sequence[jax.Array], k: Any) -> jax.Array:
  """Small inputs: sort the magnitudes (one cheap op to compile) and index."""
  n = stacked[0].shape[0]
  mags = jnp.concatenate([jnp.abs(x).astype(jnp.float32).reshape(n, -1) for x in stacked], axis=1)
  position = mags.shape[1] - jnp.broadcast_to(jnp.asarray(k, jnp.int32), (n,))
  return jnp.take_along_axis(jnp.sort(mags, axis=1), position[:, None], axis=1)[:, 0]


@jax.jit
def kth_largest_magnitude(leaves: Sequence[jax.Array], k: Any) -> jax.Array:
  """The k-th largest ``|x|`` over all entries of all ``leaves``, exactly; jittable.

  Radix selection on the float32 bit patterns of the magnitudes (nonnegative floats order like
  their bits): one 2^16-bin histogram of the high 16 bits over every leaf, then one of the low 16
  bits inside the selected bucket. Two streaming passes over the data, no sort and no
  concatenated copy of the model, so it works leaf by leaf (and over sharded leaves). Inputs of
  at most 2^16 entries in all are sorted instead (cheaper to compile; the same result).

  Args:
    leaves: float arrays of any shapes (magnitudes are compared in float32).
    k: int scalar (may be traced), 1 <= k <= total number of entries (counts are int32: fewer
      than 2^31 entries in all).

  Returns:
    float32 scalar t with ``#{|x| >= t} >= k > #{|x| > t}``.
  """
  return _kth_largest_rows([x[None] for x in leaves], k)[0]


def _keep_count(density: float, size: int) -> int:
  return int(round(density * size))


def _trim_stacked(stacked: list, density: float, trim: str) -> list:
  """Per row (task vector): zero all but the round(density * size) largest magnitudes."""
  def trim_group(group):
    size = sum(x[0].size for x in group)
    k = _keep_count(density, size)
    if k >= size:
      return list(group)
    if k == 0:
      return [jnp.zeros_like(x) for x in group]
    t = _kth_largest_rows(group, k)
    return [jnp.where(jnp.abs(x).astype(jnp.float32) >= _per_model(t, x), x, jnp.zeros_like(x))
            for x in group]

  if trim == 'global':
    return trim_group(stacked)
  return [trim_group([x])[0] for x in stacked]


def trim_task_vector(tv: Params, *, density: float, trim: str = 'global') -> Params:
  """TIES step 1: keep the top-``density`` fraction of a task vector's entries by magnitude.

  Keeps the entries with ``|x| >= t``, t the k-th largest magnitude, k = round(density * d); all
  entries tied at t are kept (as the authors' ``kthvalue`` mask). ``trim='global'`` ranks over
  every leaf of ``tv`` together (d = all entries, as the paper, which flattens the model);
  ``'per_tensor'`` ranks each leaf alone (d = its size, as mergekit). Zero every leaf you do not
  want ranked beforehand, or leave it out of ``tv``: zeros count toward d. Jittable with
  ``density`` and ``trim`` static.

  Args:
    tv: a task-vector pytree of float arrays.
    density: fraction kept, in [0, 1]; 0 keeps nothing, 1 everything.
    trim: 'global' or 'per_tensor'.

  Returns:
    A pytree like ``tv``.

  Raises:
    ValueError: density outside [0, 1] or an unknown trim mode.

  References:
    Yadav et al., NeurIPS 2023, Sec. 3, "Trim".
  """
  density = validation.check_fraction(density, name='density')
  validation.check_choice(trim, name='trim', choices=TRIM_MODES)
  return _trim_impl(tv, density=density, trim=trim)


@functools.partial(jax.jit, static_argnames=('density', 'trim'))
def _trim_impl(tv, *, density, trim):
  leaves, treedef = jax.tree.flatten(tv)
  trimmed = _trim_stacked([x[None] for x in leaves], density, trim)
  return jax.tree.unflatten(treedef, [x[0] for x in trimmed])


def _elect_and_merge(x: jax.Array, reduce: str) -> jax.Array:
  """TIES steps 2-3 for one stacked leaf (n, ...): elect the sign of the summed mass, then the
  disjoint mean (or sum) of the entries that agree with it."""
  sign = jnp.sign(x.sum(0))
  agree = (jnp.sign(x) == sign) & (x != 0)
  selected = jnp.where(agree, x, jnp.zeros_like(x)).sum(0)
  if reduce == 'sum':
    return selected
  return selected / jnp.maximum(agree.sum(0), 1).astype(selected.dtype)


def ties_stacked(stacked: list, density: float, trim: str, reduce: str) -> list:
  """TIES over task vectors held leaf by leaf as stacked (n, *shape) arrays (jittable; the
  hyperparameters are Python values, unchecked); returns one merged array per leaf."""
  return [_elect_and_merge(x, reduce) for x in _trim_stacked(stacked, density, trim)]


def ties_task_vectors(tvs: Sequence[Params], *, density: float = 0.2, trim: str = 'global',
                      reduce: str = 'mean') -> Params:
  """The TIES-merged task vector of n task vectors (without the final scaling).

  Per task vector: trim to the top-``density`` magnitudes (`trim_task_vector`). Per entry:
  elected sign ``gamma = sign(sum_i trimmed_i)`` (the sign of the larger total mass); the merged
  entry is the mean (``reduce='mean'``, the paper) or sum (``'sum'``) of the trimmed entries
  whose sign equals gamma, and 0 where none does (also where the summed mass is exactly 0; the
  authors' code then falls back to the majority sign of the whole vector). Jittable with the
  keyword arguments static.

  Args:
    tvs: n >= 1 task-vector pytrees with one structure.
    density: fraction kept by the trim, in [0, 1].
    trim: 'global' (over all leaves of each task vector) or 'per_tensor'.
    reduce: 'mean' (disjoint mean) or 'sum' (disjoint sum).

  Returns:
    A pytree like ``tvs[0]`` (float32 or wider).

  Raises:
    ValueError: empty ``tvs``, density outside [0, 1], unknown trim or reduce.

  References:
    Yadav et al., NeurIPS 2023, Sec. 3 and Algorithm 1: trim (top-k%), elect
    (gamma_m = sgn(sum_t tau_hat_t)), disjoint merge (mean over A^p = {t : sgn(tau_hat_t^p) =
    gamma_m^p}).
  """
  if not tvs:
    raise ValueError('ties_task_vectors needs at least one task vector; got an empty sequence')
  density = validation.check_fraction(density, name='density')
  validation.check_choice(trim, name='trim', choices=TRIM_MODES)
  validation.check_choice(reduce, name='reduce', choices=('mean', 'sum'))
  return _ties_tv_impl(list(tvs), density=density, trim=trim, reduce=reduce)


@functools.partial(jax.jit, static_argnames=('density', 'trim', 'reduce'))
def _ties_tv_impl(tvs, *, density, trim, reduce):
  treedef = jax.tree.structure(tvs[0])
  stacked = _stack([jax.tree.leaves(tv) for tv in tvs])
  return jax.tree.unflatten(treedef, ties_stacked(stacked, density, trim, reduce))


def _elect_and_merge_list(xs: list, reduce: str) -> jax.Array:
  """`_elect_and_merge` over n trimmed arrays given one by one (fused by XLA, no stack)."""
  sign = jnp.sign(functools.reduce(jnp.add, xs))
  agree = [(jnp.sign(x) == sign) & (x != 0) for x in xs]
  selected = functools.reduce(jnp.add, [jnp.where(a, x, jnp.zeros_like(x))
                                        for a, x in zip(agree, xs)])
  if reduce == 'sum':
    return selected
  count = functools.reduce(jnp.add, [a.astype(jnp.int32) for a in agree])
  return selected / jnp.maximum(count, 1).astype(selected.dtype)


@functools.partial(jax.jit, static_argnames=('density', 'trim'))
def _ties_thresholds(base_leaves, leaves, *, density, trim):
  """One model's trim thresholds, one float32 per merged leaf: keep ``|tau| >= t``.

  The same entries as `_trim_stacked` keeps: t = 0 keeps everything (k >= size), t = +inf
  nothing (k = 0), otherwise the k-th largest magnitude. One jitted call per model: its program
  does not grow with the number of models, and every model reuses the compiled one.
  """
  tvs = [m.astype(b.dtype) - b for b, m in zip(tvlib.upcast(base_leaves), leaves)]

  def threshold(group):
    size = sum(x.size for x in group)
    k = _keep_count(density, size)
    if k >= size:
      return jnp.zeros((), jnp.float32)
    if k == 0:
      return jnp.full((), jnp.inf, jnp.float32)
    return _kth_largest_rows([x[None] for x in group], k)[0]

  if trim == 'global':
    return [threshold(tvs)] * len(tvs)
  return [threshold([x]) for x in tvs]


def _sample_counts(sizes: Sequence[int], sample_size: int, trim: str) -> tuple:
  """Entries sampled per leaf: a leaf with at most its share of the sample is taken whole.

  'global': leaf j gets ceil(size_j * S / total) entries (stratified: every leaf represented at
  the same rate); 'per_tensor': min(size_j, S).
  """
  total = sum(sizes)
  if total == 0:
    return tuple(0 for _ in sizes)
  if trim == 'global':
    return tuple(min(size, -(-size * sample_size // total)) for size in sizes)
  return tuple(min(size, sample_size) for size in sizes)


@functools.partial(jax.jit, static_argnames=('counts',))
def _tau_samples(key, base_leaves, model_leaves, *, counts):
  """|tau_i| at ``counts[j]`` entries of leaf j, the same entries for every model: per leaf an
  (n, counts[j]) float32 array. A leaf whose count is its size is taken whole, in order; other
  leaves are sampled uniformly with replacement (a key per leaf from ``key``)."""
  out = []
  for j, (b, count) in enumerate(zip(tvlib.upcast(base_leaves), counts)):
    if count == b.size:
      take = lambda x: x.reshape(-1)
    else:
      idx = jax.random.randint(jax.random.fold_in(key, j), (count,), 0, b.size)
      take = lambda x, idx=idx: x.reshape(-1)[idx]
    base_sample = take(b)
    out.append(jnp.stack([jnp.abs(take(m[j]).astype(b.dtype) - base_sample)
                          for m in model_leaves]).astype(jnp.float32))
  return out


def _weighted_kth_largest(values: np.ndarray, weights: np.ndarray, k: int) -> np.float32:
  """The largest t with sum(weights[values >= t]) >= k (weights: entries each value stands for).

  With unit weights this is the exact k-th largest value.
  """
  if np.all(weights == weights[0]):   # Equal weights: a selection, no sort.
    rank = min(values.size, max(1, int(np.ceil(k / weights[0]))))
    return np.partition(values, values.size - rank)[values.size - rank]
  order = np.argsort(values)[::-1]
  cumulative = np.cumsum(weights[order], dtype=np.float64)
  position = min(int(np.searchsorted(cumulative, k)), values.size - 1)
  return values[order[position]]


def _sampled_ties_thresholds(key, base_leaves, model_leaves, *, density, trim, sample_size):
  """Per model, per merged leaf, the trim threshold estimated from a sample of |tau| entries.

  Each sampled entry stands for size_j / count_j entries of its leaf; the threshold is the
  weighted (1 - density) quantile of the sample (`_weighted_kth_largest`, on the host: a
  selection over ~sample_size values, far cheaper than XLA's sort on CPU). Leaves small enough
  to be taken whole give exact thresholds, and so does a task vector of at most ``sample_size``
  entries.
  """
  sizes = [b.size for b in base_leaves]
  counts = _sample_counts(sizes, sample_size, trim)
  samples = jax.device_get(_tau_samples(key, base_leaves, model_leaves, counts=counts))
  groups = [list(range(len(sizes)))] if trim == 'global' else [[j] for j in range(len(sizes))]
  thresholds = [[None] * len(sizes) for _ in model_leaves]
  for group in groups:
    size = sum(sizes[j] for j in group)
    k = _keep_count(density, size)
    weights = np.concatenate([np.full(counts[j], sizes[j] / max(counts[j], 1)) for j in group])
    for i in range(len(model_leaves)):
      if k >= size:
        t = np.float32(0.0)
      elif k == 0:
        t = np.float32(np.inf)
      else:
        t = _weighted_kth_largest(np.concatenate([samples[j][i] for j in group]), weights, k)
      for j in group:
        thresholds[i][j] = jnp.asarray(t, jnp.float32)
  return thresholds


@jax.jit
def _ties_merge(base_leaves, model_leaves, thresholds, scaling):
  """TIES steps 1-3 given the thresholds, leaf by leaf as one fused pass over the inputs.

  Also returns `_finite_flags` of the result, False wherever an input holds NaN or Inf (see
  the comments), so `ties` checks the inputs' values only when a flag is False (as `average`).
  """
  merged = []
  for j, b in enumerate(tvlib.upcast(base_leaves)):
    trimmed = []
    for m, t in zip(model_leaves, thresholds):
      x = m[j].astype(b.dtype) - b
      # Not (|x| < t) rather than |x| >= t: keeps NaN and Inf ...
      trimmed.append(jnp.where(jnp.abs(x).astype(jnp.float32) < t[j], jnp.zeros_like(x), x))
    # ... and this adds 0 where the summed mass is finite, NaN where it is not, so a non-finite
    # input reaches the result (the elected mean alone would drop NaN) and `_finite_flags` of
    # the result sees it: no separate pass over the inputs.
    poison = functools.reduce(jnp.add, trimmed) * jnp.zeros((), b.dtype)
    merged.append(_elect_and_merge_list(trimmed, 'mean') + poison)
  merged = _add_to_base(base_leaves, merged, scaling)
  return merged, _finite_flags(merged)


def ties(base: Params, finetuned: Sequence[Params], *, density: float = 0.2,
         scaling: float = 1.0, trim: str = 'global', exclude: Exclude = None,
         threshold: str = 'exact', key: Optional[jax.Array] = None,
         sample_size: int = 1 << 16) -> Params:
  """TIES-Merging: ``base + scaling * ties_task_vectors(tau_1..tau_n)``.

  The trim threshold of each task vector (its k-th largest magnitude, k = round(density * d))
  is found exactly by default (`kth_largest_magnitude`: two radix-histogram passes over the
  model per task vector, which dominate the merge's time on CPU). ``threshold='sampled'``
  estimates it instead as the weighted (1 - density) quantile of ``sample_size`` entries of
  |tau| drawn uniformly with replacement (stratified over leaves, one key per call): the fused
  merge pass then dominates (benchmarks/merge_throughput.py). The kept fraction of a
  task vector is then density +- sqrt(density (1 - density) / sample_size) (one standard
  deviation: 0.2 +- 0.0016 at the defaults), and leaves or task vectors of at most their share
  of the sample are ranked exactly.

  Args:
    base: base params.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    density: fraction of each task vector kept by the trim, in [0, 1] (the paper's k = 20%
      default is 0.2).
    scaling: lambda applied to the merged task vector (the paper's default 1).
    trim: 'global' ranks magnitudes over all merged leaves of a task vector, as the paper;
      'per_tensor' ranks within each leaf, as mergekit. Excluded leaves are not ranked.
    exclude: regex(es) of leaves that are not merged.
    threshold: 'exact' or 'sampled' (see above).
    key: PRNG key of the sample; required with ``threshold='sampled'``, unused otherwise.
    sample_size: entries of |tau| sampled per task vector ('global') or per leaf
      ('per_tensor'), >= 1.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: as `average` (NaN/Inf in an input names the model and path), density outside
      [0, 1], unknown trim or threshold, non-finite scaling, a sampled threshold without key,
      sample_size < 1.

  References:
    Yadav et al., NeurIPS 2023, Sec. 3 and Algorithm 1; theta = theta_init + lambda * tau_m.
  """
  density = validation.check_fraction(density, name='density')
  validation.check_choice(trim, name='trim', choices=TRIM_MODES)
  validation.check_choice(threshold, name='threshold', choices=THRESHOLD_MODES)
  if threshold == 'sampled':
    if key is None:
      raise ValueError("ties(threshold='sampled') needs key= (a jax PRNG key for the sample)")
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
      raise ValueError(f'sample_size must be an int >= 1; got {sample_size!r}')
  p = _prepare(base, finetuned, exclude, check_values=False)
  if threshold == 'sampled':
    thresholds = _sampled_ties_thresholds(key, p.base, p.models, density=density, trim=trim,
                                          sample_size=sample_size)
  else:
    thresholds = [_ties_thresholds(p.base, m, density=density, trim=trim) for m in p.models]
  merged, flags = _ties_merge(p.base, p.models, thresholds, _scalar(scaling, 'scaling'))
  _check_result(flags, merged, base, finetuned, p.mask)
  return tvlib.combine(base, p.mask, merged)


# --------------------------------------------------------------------------------------------
# DARE: drop and rescale
# --------------------------------------------------------------------------------------------


def _dare_stacked(key: jax.Array, stacked: list, drop_rate: float) -> list:
  """DARE of n stacked task vectors; row i draws one Bernoulli mask over all its entries."""
  if drop_rate == 0.0:
    return list(stacked)
  if drop_rate == 1.0:
    return [jnp.zeros_like(x) for x in stacked]
  n = stacked[0].shape[0]
  total = sum(x[0].size for x in stacked)
  # One (vmapped) draw over all entries rather than one per leaf: the threefry kernel is
  # compiled once instead of once per leaf and model. Row i is bernoulli(split(key, n)[i]).
  keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - drop_rate, (total,)))(
      jax.random.split(key, n))
  out, offset = [], 0
  for x in stacked:
    size = x[0].size
    mask = keep[:, offset:offset + size].reshape(x.shape)
    out.append(jnp.where(mask, x / (1.0 - drop_rate), jnp.zeros_like(x)))
    offset += size
  return out


def dare_task_vectors(key: jax.Array, tvs: Sequence[Params], *, drop_rate: float) -> list:
  """DARE: drop each task-vector entry with probability p, rescale the rest by 1 / (1 - p).

  ``E[dare(tau)] = tau`` entry by entry. Task vector i uses ``jax.random.split(key, n)[i]`` for
  one Bernoulli draw over all its entries (leaves in flattening order). p = 1 drops everything
  (zeros). Jittable with ``drop_rate`` static.

  Args:
    key: a PRNG key.
    tvs: n >= 1 task-vector pytrees.
    drop_rate: p in [0, 1].

  Returns:
    A list of n pytrees like ``tvs`` (float32 or wider).

  Raises:
    ValueError: empty ``tvs`` or drop rate outside [0, 1].

  References:
    Yu et al., ICML 2024, Sec. 3: m ~ Bernoulli(p), tau_tilde = (1 - m) * tau,
    tau_hat = tau_tilde / (1 - p).
  """
  if not tvs:
    raise ValueError('dare_task_vectors needs at least one task vector; got an empty sequence')
  p = validation.check_fraction(drop_rate, name='drop_rate')
  return _dare_tv_impl(key, list(tvs), drop_rate=p)


@functools.partial(jax.jit, static_argnames=('drop_rate',))
def _dare_tv_impl(key, tvs, *, drop_rate):
  stacked = _stack([jax.tree.leaves(tv) for tv in tvs])
  return _unstack(_dare_stacked(key, stacked, drop_rate), jax.tree.structure(tvs[0]))


@functools.partial(jax.jit, static_argnames=('drop_rate', 'merge', 'density', 'trim'))
def _dare_impl(key, base_leaves, model_leaves, scaling, *, drop_rate, merge, density, trim):
  tvs = _dare_stacked(key, _stacked_task_vectors(base_leaves, model_leaves), drop_rate)
  if merge == 'ties':
    merged = ties_stacked(tvs, density, trim, 'mean')
  else:
    merged = [x.sum(0) for x in tvs]
  return _add_to_base(base_leaves, merged, scaling)


def dare(base: Params, finetuned: Sequence[Params], *, key: jax.Array, drop_rate: float,
         scaling: float, merge: str = 'task_arithmetic', density: float = 1.0,
         trim: str = 'global', exclude: Exclude = None) -> Params:
  """DARE sparsification of every task vector, then task arithmetic or TIES.

  ``merge='task_arithmetic'``: ``base + scaling * sum_i dare(tau_i)``.
  ``merge='ties'``: ``base + scaling * ties_task_vectors(dare(tau_i), density=density)``; with the
  default density 1 the random drop replaces TIES's magnitude trim and only sign election and the
  disjoint mean remain (mergekit's ``dare_ties``); density < 1 trims the rescaled vectors too.
  The drop masks are those of `dare_task_vectors` (key, task vectors of the merged leaves).

  Args:
    base: base params.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    key: PRNG key of the drop masks (explicit: same key, same merge).
    drop_rate: p in [0, 1].
    scaling: lambda of the final merge.
    merge: 'task_arithmetic' or 'ties'.
    density: TIES trim after the drop, in [0, 1]; must stay 1 for task arithmetic.
    trim: TIES trim mode, 'global' or 'per_tensor'.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: as `average`, drop rate or density outside [0, 1], unknown merge/trim, density
      != 1 with task arithmetic, non-finite scaling.

  References:
    Yu et al., ICML 2024, Sec. 3 (DARE, Eq. of tau_hat) and its use before TA and TIES.
  """
  drop_rate = validation.check_fraction(drop_rate, name='drop_rate')
  density = validation.check_fraction(density, name='density')
  validation.check_choice(merge, name='merge', choices=DARE_MERGES)
  validation.check_choice(trim, name='trim', choices=TRIM_MODES)
  if merge == 'task_arithmetic' and density != 1.0:
    raise ValueError(f"density applies to merge='ties' only; got density={density} with "
                     f"merge='task_arithmetic'")
  p = _prepare(base, finetuned, exclude)
  merged = _dare_impl(key, p.base, p.models, _scalar(scaling, 'scaling'), drop_rate=drop_rate,
                      merge=merge, density=density, trim=trim)
  return tvlib.combine(base, p.mask, merged)


def dare_task_arithmetic(base: Params, finetuned: Sequence[Params], *, key: jax.Array,
                         drop_rate: float, scaling: float, exclude: Exclude = None) -> Params:
  """DARE then task arithmetic: ``base + scaling * sum_i dare(tau_i)``; `dare` with
  ``merge='task_arithmetic'`` (its registered form, whose signature holds only what applies).

  Args:
    base: base params.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    key: PRNG key of the drop masks.
    drop_rate: p in [0, 1].
    scaling: lambda of the final merge.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: as `dare`.

  References:
    Yu et al., ICML 2024, Sec. 3.
  """
  return dare(base, finetuned, key=key, drop_rate=drop_rate, scaling=scaling,
              merge='task_arithmetic', exclude=exclude)


def dare_ties(base: Params, finetuned: Sequence[Params], *, key: jax.Array, drop_rate: float,
              scaling: float, density: float = 1.0, trim: str = 'global',
              exclude: Exclude = None) -> Params:
  """DARE then TIES's sign election and disjoint mean; `dare` with ``merge='ties'``.

  Args:
    base: base params.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    key: PRNG key of the drop masks.
    drop_rate: p in [0, 1].
    scaling: lambda of the final merge.
    density: TIES trim of the rescaled vectors, in [0, 1] (1: no trim, mergekit's dare_ties).
    trim: TIES trim mode, 'global' or 'per_tensor'.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: as `dare`.

  References:
    Yu et al., ICML 2024, Sec. 3; Yadav et al., NeurIPS 2023, Sec. 3.
  """
  return dare(base, finetuned, key=key, drop_rate=drop_rate, scaling=scaling, merge='ties',
              density=density, trim=trim, exclude=exclude)


# --------------------------------------------------------------------------------------------
# Fisher merging
# --------------------------------------------------------------------------------------------


@jax.jit
def _fisher_impl(base_leaves, model_leaves, fisher_leaves, weights, epsilon):
  tvs = _stacked_task_vectors(base_leaves, model_leaves)
  merged = []
  for tv, f in zip(tvs, _stack(fisher_leaves)):
    coeff = _per_model(weights, tv) * jnp.maximum(f.astype(tv.dtype), epsilon)
    merged.append((coeff * tv).sum(0) / coeff.sum(0))
  return _add_to_base(base_leaves, merged, 1.0)


def _model_weights(model_weights: Optional[Sequence[float]], n: int) -> jax.Array:
  if model_weights is None:
    return jnp.ones((n,), jnp.float32)
  weights = [validation.check_finite_scalar(w, name=f'model_weights[{i}]')
             for i, w in enumerate(model_weights)]
  if len(weights) != n:
    raise ValueError(f'model_weights has {len(weights)} entries for {n} finetuned models')
  if any(w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f'model_weights must be nonnegative with a positive sum; got {weights}')
  return jnp.asarray(weights, jnp.float32)


def fisher(base: Params, finetuned: Sequence[Params], *, fishers: Sequence[Params],
           model_weights: Optional[Sequence[float]] = None, epsilon: float = 1e-6,
           exclude: Exclude = None) -> Params:
  """Fisher merging: per entry, the Fisher-weighted average of the finetuned models.

  ``theta^j = sum_i w_i F_i^j theta_i^j / sum_i w_i F_i^j`` with ``F_i^j <- max(F_i^j, epsilon)``
  (the floor keeps entries where every Fisher vanishes well defined: they fall back to the
  w-weighted average). Computed in task-vector space (``theta_i = base + tau_i``), which is the
  same quantity with less rounding.

  Args:
    base: base params.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    fishers: n diagonal Fisher pytrees (e.g. `cljax.fisher.diagonal_fisher` of each finetuned
      model on its task), base's structure and shapes, any float dtype, nonnegative.
    model_weights: optional n nonnegative scalars w_i with a positive sum (default all 1).
    epsilon: the Fisher floor, > 0.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: as `average`; fishers of another length, structure or shape (first path),
      non-finite or negative Fisher entries (path); bad model weights or epsilon.

  References:
    Matena & Raffel, NeurIPS 2022, Sec. 2 (closed form of the diagonal-Fisher merge with
    per-model weights lambda_i); the floor is the ``fisher_floor`` of the authors' and
    WiSE-FT's code.
  """
  p = _prepare(base, finetuned, exclude)
  fishers = list(fishers)
  if len(fishers) != len(p.models):
    raise ValueError(f'fishers has {len(fishers)} entries for {len(p.models)} finetuned models')
  for i, f in enumerate(fishers):
    validation.check_same_structure(base, f, other_name=f'fishers[{i}]', check_dtype=False)
    validation.check_floating(f, p.mask, name=f'fishers[{i}]')
    merged_part = jax.tree.map(lambda x, m: x if m else None, f, p.mask)
    validation.check_finite(merged_part, name=f'fishers[{i}]')
    validation.check_nonnegative(merged_part, name=f'fishers[{i}]')
  fisher_leaves = [tvlib.included_leaves(f, p.mask) for f in fishers]
  weights = _model_weights(model_weights, len(p.models))
  eps = validation.check_interval(epsilon, name='epsilon', low=0.0, high=float('inf'),
                                  low_open=True, high_open=True)
  merged = _fisher_impl(p.base, p.models, fisher_leaves, weights, jnp.float32(eps))
  return tvlib.combine(base, p.mask, merged)


# --------------------------------------------------------------------------------------------
# MagMax
# --------------------------------------------------------------------------------------------


@jax.jit
def _magmax_impl(base_leaves, model_leaves, scaling):
  merged = []
  for j, b in enumerate(tvlib.upcast(base_leaves)):
    best = None
    for m in model_leaves:  # Strictly larger replaces: the first model wins exact ties.
      x = m[j].astype(b.dtype) - b
      best = x if best is None else jnp.where(jnp.abs(x) > jnp.abs(best), x, best)
    merged.append(best)
  return _add_to_base(base_leaves, merged, scaling)


def magmax(base: Params, finetuned: Sequence[Params], *, scaling: float = 1.0,
           exclude: Exclude = None) -> Params:
  """MagMax: per entry, the task-vector value of largest magnitude.

  ``tau^j = tau_{i*}^j`` with ``i* = argmax_i |tau_i^j|`` (the first model wins exact ties),
  then ``base + scaling * tau``.

  Args:
    base: base params.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    scaling: lambda applied to the selected task vector (1 selects it unscaled).
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: as `average`, or a non-finite scaling.

  References:
    Marczak et al., ECCV 2024, Sec. 3 (maximum-magnitude selection of task-vector parameters).
  """
  p = _prepare(base, finetuned, exclude)
  return tvlib.combine(base, p.mask, _magmax_impl(p.base, p.models, _scalar(scaling, 'scaling')))


# --------------------------------------------------------------------------------------------
# Frank-Wolfe merging (hard variant)
# --------------------------------------------------------------------------------------------


class FrankWolfeInfo(NamedTuple):
  """Per-iteration record of `frank_wolfe_with_info`; every field has shape (num_steps,).

  Attributes:
    selected: int32, the index of the finetuned model the oracle picked at step t.
    step_size: float32, gamma_t actually applied (0 where the step was skipped).
    gap: float32, the Frank-Wolfe gap <g_t, theta_t - theta_{s_t}> of the picked model.
    loss: float32, the proxy loss at theta_t (before step t).
  """

  selected: jax.Array
  step_size: jax.Array
  gap: jax.Array
  loss: jax.Array


def _fw_scores(grads: list, tvs: list, criterion: str) -> jax.Array:
  """(n,) oracle scores of the stacked task vectors against the gradient."""
  scores = []
  for g, tv in zip(grads, tvs):
    axes = tuple(range(1, tv.ndim))
    inner = jnp.sum(tv * g[None], axis=axes)                     # (n,)
    if criterion == 'cosine':
      denom = jnp.sqrt(jnp.sum(tv * tv, axis=axes) * jnp.sum(g * g))
      inner = jnp.where(denom > 0, inner / jnp.where(denom > 0, denom, 1.0), 0.0)
    scores.append(inner)
  return functools.reduce(jnp.add, scores)


@functools.partial(jax.jit, static_argnames=('loss_fn', 'num_steps', 'criterion', 'flags'))
def _fw_impl(base, model_leaves, theta, step_scale, *, loss_fn, num_steps, criterion, flags):
  treedef = jax.tree.structure(base)
  base_all = jax.tree.leaves(base)
  base_leaves = [b for b, m in zip(base_all, flags) if m]
  tvs = _stacked_task_vectors(base_leaves, model_leaves)
  candidates = _stack(model_leaves)

  def full(th):
    it = iter(th)
    return jax.tree.unflatten(treedef, [next(it).astype(b.dtype) if m else b
                                        for b, m in zip(base_all, flags)])

  def step(t, carry):
    th, info = carry
    loss, grads = jax.value_and_grad(lambda x: loss_fn(full(x)))(th)
    choice = jnp.argmin(_fw_scores(grads, tvs, criterion)).astype(jnp.int32)
    target = [c[choice] for c in candidates]
    gap = optax.tree.vdot(grads, optax.tree.sub(th, target))
    gamma = jnp.where(gap > 0, step_scale * 2.0 / (t + 2.0), 0.0)
    th = optax.tree.add_scale(th, gamma, optax.tree.sub(target, th))
    info = FrankWolfeInfo(info.selected.at[t].set(choice), info.step_size.at[t].set(gamma),
                          info.gap.at[t].set(gap), info.loss.at[t].set(loss))
    return th, info

  zeros = jnp.zeros((num_steps,), jnp.float32)
  info = FrankWolfeInfo(jnp.zeros((num_steps,), jnp.int32), zeros, zeros, zeros)
  th, info = jax.lax.fori_loop(0, num_steps, step, (tvlib.upcast(theta), info))
  return full(th), info


def frank_wolfe_with_info(base: Params, finetuned: Sequence[Params], *,
                          loss_fn: Callable[[Params], jax.Array], num_steps: int = 10,
                          criterion: str = 'cosine', step_scale: float = 1.0,
                          init_params: Optional[Params] = None,
                          exclude: Exclude = None) -> tuple:
  """FW-Merging (hard): Frank-Wolfe over the convex hull of the finetuned models.

  Minimizes a proxy loss f (``loss_fn``) over M = conv{theta_1, ..., theta_n}. Starting from
  theta_0 (``init_params``, default the base), for t = 0 .. num_steps - 1:

    1. g_t = grad f(theta_t) (over the merged leaves).
    2. Linear-minimization oracle, hard: pick one model s_t = argmin_i score_i with
         ``criterion='cosine'``: score_i = sum over leaves l of cos(g_t^l, tau_i^l), the
           layer-wise alignment summed over layers as the authors' code does ('task'
           granularity), but of the task vectors tau_i = theta_i - theta_base rather than of the
           raw checkpoints (which share the base and so all look alike);
         ``criterion='inner'``: score_i = <g_t, tau_i>, the exact LMO of the linearized loss over
           M (equal to argmin_i <g_t, theta_i>).
    3. Step: theta_{t+1} = theta_t + gamma_t (theta_{s_t} - theta_t) with
       gamma_t = step_scale * 2 / (t + 2); gamma_0 = 1 jumps to the first pick.
       If the FW gap <g_t, theta_t - theta_{s_t}> is <= 0, theta_{s_t} is no descent direction
       (at a constrained optimum the gap is 0; Jaggi 2013's stopping criterion) and the step is
       skipped. The authors' code instead keeps the initial model as an extra candidate; with
       the base as theta_0 this skip plays that role.

  With ``criterion='inner'`` and step_scale 1 this is textbook Frank-Wolfe, and
  f(theta_t) - f* <= 2 L diam(M)^2 / (t + 2) for an L-smooth convex f (Jaggi 2013, Thm. 1).
  Excluded leaves stay at the base's value throughout (the loss sees them as such).

  Args:
    base: base params.
    finetuned: n >= 1 candidate models with base's structure, shapes and dtypes.
    loss_fn: ``loss_fn(params) -> scalar``, differentiable, traced under jit (data it needs is
      closed over); a proxy loss such as the entropy or cross-entropy on a few examples per task.
    num_steps: number of FW iterations, >= 1 (static).
    criterion: 'cosine' or 'inner'.
    step_scale: in (0, 1], multiplies 2 / (t + 2) (the authors' ``step_size``).
    init_params: theta_0, base's structure (e.g. a task-arithmetic merge); default the base.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    ``(params, info)``: params with base's structure and dtypes, and a `FrankWolfeInfo`.

  Raises:
    ValueError: as `average`; bad num_steps, criterion, step_scale; init_params mismatching or
      non-finite.

  References:
    Chen et al., arXiv 2503.12649, Algorithm 1 (FW-Merging, hard LMO, step 2 / (t + 2)).
    Jaggi, "Revisiting Frank-Wolfe", ICML 2013, Algorithm 1 and Theorem 1.
  """
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f'num_steps must be an int >= 1; got {num_steps!r}')
  validation.check_choice(criterion, name='criterion', choices=FW_CRITERIA)
  step_scale = validation.check_interval(step_scale, name='step_scale', low=0.0, high=1.0,
                                         low_open=True)
  if not callable(loss_fn):
    raise ValueError(f'loss_fn must be callable; got {loss_fn!r}')
  p = _prepare(base, finetuned, exclude)
  if init_params is None:
    theta = p.base
  else:
    validation.check_same_structure(base, init_params, other_name='init_params')
    validation.check_finite(init_params, name='init_params')
    theta = tvlib.included_leaves(init_params, p.mask)
  flags = tuple(jax.tree.leaves(p.mask))
  return _fw_impl(base, p.models, theta, jnp.float32(step_scale), loss_fn=loss_fn,
                  num_steps=num_steps, criterion=criterion, flags=flags)


def frank_wolfe(base: Params, finetuned: Sequence[Params], *,
                loss_fn: Callable[[Params], jax.Array], num_steps: int = 10,
                criterion: str = 'cosine', step_scale: float = 1.0,
                init_params: Optional[Params] = None, exclude: Exclude = None) -> Params:
  """FW-Merging (hard variant); `frank_wolfe_with_info` without the per-step record.

  See `frank_wolfe_with_info` for the algorithm, arguments and errors.

  References:
    Chen et al., arXiv 2503.12649, Algorithm 1.
  """
  params, _ = frank_wolfe_with_info(base, finetuned, loss_fn=loss_fn, num_steps=num_steps,
                                    criterion=criterion, step_scale=step_scale,
                                    init_params=init_params, exclude=exclude)
  return params
