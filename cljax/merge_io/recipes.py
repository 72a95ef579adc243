"""What each `cljax-merge` method computes on one block of one tensor, through `cljax.merging`.

`make_recipe` resolves a `MergeConfig` (mergekit semantics) into calls of the library's merges on
single-tensor pytrees ``{name: block}``, a block being a range of rows of one tensor of every
model. Where mergekit's formula is one of the library's merges it is called as is, so the
out-of-core result equals the in-memory merge of the whole pytrees exactly; otherwise the
library's building blocks are composed (with per-model weights, which the library's merges do
not take). With tau_i = theta_i - theta_base, w_i the models' weights, lambda the scaling and
c_i = w_i / sum_j w_j under ``normalize`` (else w_i):

  ==================  =======================================================================
  linear              equal weights, normalize: `static.average` (reference = base_model or
                      the first model); else sum_i c_i theta_i.
  task_arithmetic     equal c_i = c: `static.task_arithmetic` (scaling = lambda c); else
                      base + lambda sum_i c_i tau_i.
  ties                trim each tau_i to its top-``density_i`` magnitudes (threshold t_i, see
                      below), then `static.ties_task_vectors` (density 1: elect the sign of the
                      summed mass, disjoint mean under normalize, else the disjoint sum of
                      w_i-weighted entries), then base + lambda * merged. With equal densities
                      and weights, normalize, the same trim mode and ``selection: threshold``,
                      this is `static.ties` exactly (tested). Unequal weights under normalize: mergekit's weighted
                      disjoint mean (below), composed here (not a library merge).
  dare_linear         drop: model i keeps each entry of tau_i with probability d_i (its
                      density) and divides the kept ones by d_i (``rescale``, default; else
                      keeps them as they are). One density and rescale: `static.dare`
                      (task arithmetic, scaling lambda c) for equal c_i, else
                      `static.dare_task_vectors` then base + lambda sum_i c_i dare(tau_i).
                      Per-model densities or no rescale: the same with `_dare_drop`.
  dare_ties           the drop as dare_linear, then sign election over w_i dare(tau_i):
                      normalize with equal weights and one density (rescaled): `static.dare`
                      (merge='ties', density 1); else the disjoint sum of
                      `static.ties_task_vectors` (no normalize), its disjoint mean (normalize,
                      equal weights) or the weighted disjoint mean (normalize, unequal
                      weights); then base + lambda * merged.
  magmax              `static.magmax` (scaling lambda).
  continual_*, opcm   the `cljax.merging.continual` merge's init / update (one model at a time)
                      / params on each block; OPCM's final rescaling uses the norms of the
                      whole model (computed in a first pass), continual_ties trims per tensor.
  other data-free     the registered merge on each tensor, ``fn({name: base}, [{name: model_i}],
  static merges       **hyperparameters)``: row blocks when the registry marks it
                      ``blockwise``, else the whole tensor (slerp, nuslerp, multislerp,
                      model_stock, breadcrumbs, della, tsv, iso_c, iso_cts, consensus, wudi:
                      norms, ranks, SVDs or optimisations per tensor). Merges taking
                      ``kernel_layout`` get it per tensor (`kernel_layout`): 'in_out' for Flax
                      kernels ('.../kernel', Orbax inputs), 'out_in' for every other tensor
                      (Hugging Face / PyTorch weights, (out, in)).
  ==================  =======================================================================

Merges that need data (fisher, frank_wolfe, regmean, adamerging, soft_frank_wolfe) and per-task
merges (emr: one model per task, not one checkpoint) are refused.

Weighted disjoint mean (mergekit's ``normalize`` for TIES and DARE-TIES): with x_i = w_i tau_i
(trimmed or dropped), gamma = sign(sum_i x_i) and A = {i : sign(x_i) = gamma, x_i != 0} per
entry, merged = sum_{i in A} x_i / sum_{i in A} w_i (0 where A is empty; a zero denominator is
taken as 1, as mergekit does). With equal weights it is the disjoint mean.

TIES selection. ``trim: per_tensor`` (default) with ``selection: exact`` (its default) keeps
exactly k = int(density_i * count) entries of each tensor, as mergekit's ``sparsify.magnitude``:
every |tau_i| > t_i, t_i the k-th largest magnitude, and of the entries with |tau_i| = t_i the
first in row-major order (flattened index; mergekit's unstable torch argsort leaves the tie
order unspecified, cljax fixes it so). ``selection: threshold`` (the paper's rule, and
`static.trim_task_vector`'s) keeps every |tau_i| >= t_i with k = round(density_i * count), ties
included; ``trim: global`` ranks over every merged tensor with this rule. The driver computes t_i
exactly by a streaming radix selection (`cljax.merge_io.magnitude_select`), and for exact
selection how many tied entries each row block keeps, and passes them in. Magnitudes are those
of the float32 task vectors (mergekit ranks tau computed in the checkpoint's dtype).

DARE keys: block j of tensor ``name`` (rows [j R, (j + 1) R)) draws its masks with
``fold_in(fold_in(key(seed), h), j)``, h the first 4 bytes (little-endian) of SHA-256(name);
model i then uses ``split(block_key, n)[i]`` (the library's draw; `_dare_drop` draws the same
masks for per-model densities: ``bernoulli(split(block_key, n)[i], d_i, (size,))`` reshaped to
the block, so equal densities give the library's masks bit for bit). See `dare_key`.

Everything is computed in float32: blocks arrive upcast, results are float32 blocks.

References:
  Wortsman et al., ICML 2022 (uniform soup); Ilharco et al., ICLR 2023, Sec. 2 (task
  arithmetic); Yadav et al., NeurIPS 2023, Sec. 3 (TIES); Yu et al., ICML 2024, Sec. 3 (DARE);
  Marczak et al., ECCV 2024 (MagMax); Tang et al., arXiv 2501.09522 (OPCM).
  Goddard et al., "Arcee's MergeKit", 2024 (the weight / normalize / lambda conventions).
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.merge_io import mergekit_config
from cljax.merging import continual
from cljax.merging import registry
from cljax.merging import static
from cljax.merging import validation


class Block(NamedTuple):
  """One block of one tensor across the models, as a static recipe receives it.

  Attributes:
    name: the tensor's name (the single key of the pytrees passed to the library).
    base: float32 array, the base's rows.
    models: float32 arrays, the models' rows (same shape).
    thresholds: TIES trim thresholds, one per model (None for other methods).
    key: DARE's PRNG key of this block (None for other methods).
    tie_quota: TIES's exact selection: per model, how many entries of this block with
      |tau_i| equal to its threshold are kept (the first in row-major order); None keeps all.
    scales: DARE's ``rescale: l1``: per model, the factor ||tau_i||_1 / ||drop(tau_i)||_1 of
      the whole tensor (1 where either norm is below 1e-7, as mergekit); None for 1.
  """

  name: str
  base: np.ndarray
  models: Sequence[np.ndarray]
  thresholds: Optional[Sequence[float]] = None
  key: Optional[jax.Array] = None
  tie_quota: Optional[Sequence[int]] = None
  scales: Optional[Sequence[float]] = None


class Recipe(NamedTuple):
  """A resolved merge method.

  Attributes:
    description: what runs, e.g. ``'static.task_arithmetic(scaling=0.5)'``.
    merge: ``merge(Block) -> float32 array`` for static methods, None for continual ones.
    continual: the library's `ContinualMerge` for continual methods, else None.
    densities: per-model TIES densities when thresholds are needed, else None.
    trim: 'per_tensor' or 'global' (TIES thresholds' scope).
    selection: TIES's kept count: 'exact' (mergekit: int(density * n), ties at the threshold
      kept in row-major order) or 'threshold' (the paper: round(density * n), all ties kept).
    uses_key: the merge needs ``Block.key`` (DARE).
    blockwise: a tensor may be merged in row blocks (the registry's `MergeMethod.blockwise`:
      elementwise merges); False for merges with per-tensor steps (continual_ties and OPCM's
      trim and SVD; norms, ranks and SVDs of the baselines), which get whole tensors.
    global_rescale: OPCM: the final ``base + A / lambda`` uses whole-model norms (two passes).
    l1_sums: DARE with ``rescale: l1``: ``l1_sums(Block) -> (n, 2)`` float64, per model the
      block's sum |tau_i| and sum |drop(tau_i)| (the driver's first pass), else None.
  """

  description: str
  merge: Optional[Callable[[Block], np.ndarray]] = None
  continual: Optional[continual.ContinualMerge] = None
  densities: Optional[tuple] = None
  trim: str = 'per_tensor'
  selection: str = 'threshold'
  uses_key: bool = False
  blockwise: bool = True
  global_rescale: bool = False
  l1_sums: Optional[Callable[[Block], np.ndarray]] = None


def name_hash(name: str) -> int:
  """A stable 32-bit hash of a tensor name: the first 4 bytes of its SHA-256, little-endian."""
  return int.from_bytes(hashlib.sha256(name.encode('utf-8')).digest()[:4], 'little')


def dare_key(seed: int, name: str, block: int) -> jax.Array:
  """DARE's PRNG key for block ``block`` of tensor ``name``: see the module docstring."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), name_hash(name)), block)


# ------------------------------------------------------------------------------------------
# Library calls on single-tensor pytrees
# ------------------------------------------------------------------------------------------


def _on_device(b: Block) -> Block:
  """The block's arrays as jax Arrays, so the library's checks and merge share one copy."""
  return b._replace(base=jnp.asarray(b.base), models=[jnp.asarray(m) for m in b.models])


def _trees(b: Block) -> tuple:
  return {b.name: b.base}, [{b.name: m} for m in b.models]


def _out(tree: Any, name: str) -> np.ndarray:
  return np.asarray(tree[name])


# Flax kernels, as Orbax inputs name them: (in, out) (or (..., in, out) for convs).
FLAX_KERNEL = r'(.*/)?kernel'


def kernel_layout(name: str) -> str:
  """The ``kernel_layout`` of tensor ``name`` for merges that take one: 'in_out' for a Flax
  kernel (`FLAX_KERNEL`), else 'out_in' (Hugging Face / PyTorch weights: Linear (out, in),
  conv (out, in, ...))."""
  return 'in_out' if re.fullmatch(FLAX_KERNEL, name) else 'out_in'


def _library(fn: Callable, *, with_key: bool = False, with_layout: bool = False,
             **hp) -> Callable[[Block], np.ndarray]:
  """A block merge that is exactly ``fn(base, finetuned, [key=block key,]
  [kernel_layout=kernel_layout(name),] **hp)``."""
  def merge(b: Block) -> np.ndarray:
    base, models = _trees(_on_device(b))
    extra = {'key': b.key} if with_key else {}
    if with_layout:
      extra['kernel_layout'] = kernel_layout(b.name)
    return _out(fn(base, models, **hp, **extra), b.name)
  return merge


@jax.jit
def _weighted_sum(models, coefficients):
  return functools.reduce(jnp.add, [coefficients[i] * m for i, m in enumerate(models)])


@jax.jit
def _weighted_task_arithmetic(base, models, coefficients, scaling):
  tv = functools.reduce(jnp.add, [coefficients[i] * (m - base) for i, m in enumerate(models)])
  return optax.tree.add_scale(base, scaling, tv)


def _weighted_disjoint_mean(xs: Sequence[jax.Array], weights: jax.Array) -> jax.Array:
  """mergekit's normalized sign-consensus merge of n weighted blocks (module docstring).

  Args:
    xs: n float32 arrays of one shape, x_i = w_i * (trimmed or dropped) tau_i.
    weights: float32 (n,), the w_i.

  Returns:
    float32 array of that shape: sum_{i in A} x_i / sum_{i in A} w_i per entry.
  """
  sign = jnp.sign(functools.reduce(jnp.add, xs))
  agree = [(jnp.sign(x) == sign) & (x != 0) for x in xs]
  zero = jnp.zeros_like(xs[0])
  total = functools.reduce(jnp.add, [jnp.where(a, x, zero) for a, x in zip(agree, xs)])
  mass = functools.reduce(jnp.add, [jnp.where(a, weights[i], zero) for i, a in enumerate(agree)])
  return total / jnp.where(mass == 0, jnp.ones_like(mass), mass)


def _sign_consensus(xs: Sequence[jax.Array], weights: jax.Array, reduce: Optional[str]):
  """Merges n task-vector blocks: plain sum (None), TIES's disjoint 'sum' / 'mean'
  (`static.ties_task_vectors` with density 1), or mergekit's 'weighted_mean'."""
  if reduce is None:
    return functools.reduce(jnp.add, xs)
  if reduce == 'weighted_mean':
    return _weighted_disjoint_mean(xs, weights)
  return static.ties_task_vectors([{'x': x} for x in xs], density=1.0, reduce=reduce)['x']


def _keep(tv: jax.Array, threshold: jax.Array, quota: jax.Array) -> jax.Array:
  """|tv| > threshold, and the first ``quota`` entries (row-major) with |tv| == threshold."""
  magnitude = jnp.abs(tv)
  tied = (magnitude == threshold).reshape(-1)
  rank = (jnp.cumsum(tied, dtype=jnp.int32) - 1).reshape(tv.shape)
  return (magnitude > threshold) | ((magnitude == threshold) & (rank < quota))


@functools.partial(jax.jit, static_argnames=('reduce', 'weighted'))
def _ties_block(base, models, thresholds, quotas, coefficients, scaling, *, reduce, weighted):
  trimmed = []
  for i, m in enumerate(models):
    tv = m - base
    tv = jnp.where(_keep(tv, thresholds[i], quotas[i]), tv, jnp.zeros_like(tv))
    trimmed.append(coefficients[i] * tv if weighted else tv)
  return optax.tree.add_scale(base, scaling, _sign_consensus(trimmed, coefficients, reduce))


def _dare_drop(key: jax.Array, tvs: Sequence[jax.Array], densities: tuple,
               rescale: bool) -> list:
  """DARE's random drop with one density per model, optionally without the rescale.

  Model i keeps each entry with probability d_i = ``densities[i]`` (mask
  ``bernoulli(split(key, n)[i], d_i, (size,))`` reshaped to the block) and divides the kept
  entries by d_i if ``rescale``. d_i = 1 keeps everything, d_i = 0 nothing. With one density
  and ``rescale``, this is `static.dare_task_vectors` with drop rate 1 - d (which is called).

  Args:
    key: the block's PRNG key.
    tvs: n float32 task-vector blocks of one shape.
    densities: n Python floats in [0, 1].
    rescale: divide kept entries by their density.

  Returns:
    n float32 arrays like ``tvs``.

  References:
    Yu et al., ICML 2024, Sec. 3 (drop with p = 1 - d_i, rescale by 1 / (1 - p)); mergekit's
    per-model ``density`` and ``rescale``.
  """
  if _all_equal(densities) and rescale:
    dropped = static.dare_task_vectors(key, [{'x': tv} for tv in tvs],
                                       drop_rate=1.0 - densities[0])
    return [d['x'] for d in dropped]
  keys = jax.random.split(key, len(tvs))
  out = []
  for k, tv, d in zip(keys, tvs, densities):
    if d >= 1.0:
      out.append(tv)
    elif d <= 0.0:
      out.append(jnp.zeros_like(tv))
    else:
      keep = 1.0 - (1.0 - d)   # the library's keep probability for drop rate 1 - d, bit for bit
      mask = jax.random.bernoulli(k, keep, (tv.size,)).reshape(tv.shape)
      out.append(jnp.where(mask, tv / keep if rescale else tv, jnp.zeros_like(tv)))
  return out


@functools.partial(jax.jit, static_argnames=('densities', 'rescale', 'reduce', 'weighted'))
def _dare_block(key, base, models, coefficients, scaling, scales, *, densities, rescale, reduce,
                weighted):
  dropped = _dare_drop(key, [m - base for m in models], densities, rescale)
  dropped = [scales[i] * x for i, x in enumerate(dropped)]   # 1 unless rescale: l1
  xs = [coefficients[i] * x if weighted else x for i, x in enumerate(dropped)]
  return optax.tree.add_scale(base, scaling, _sign_consensus(xs, coefficients, reduce))


@functools.partial(jax.jit, static_argnames=('densities',))
def _dare_l1_block(key, base, models, *, densities):
  """(n, 2): per model sum |tau_i| and sum |drop(tau_i)| (unscaled) over the block."""
  tvs = [m - base for m in models]
  dropped = _dare_drop(key, tvs, densities, False)
  return jnp.stack([jnp.stack([jnp.sum(jnp.abs(t)), jnp.sum(jnp.abs(d))])
                    for t, d in zip(tvs, dropped)])


L1_EPS = 1e-7   # mergekit's rescaled_masked_tensor: no rescale where either norm is below it


def l1_scales(sums: np.ndarray) -> tuple:
  """DARE's L1 rescale factors from a tensor's summed (n, 2) `Recipe.l1_sums`: per model
  ||tau||_1 / ||drop(tau)||_1, or 1 where either is below `L1_EPS` (mergekit's
  ``sparsify.rescaled_masked_tensor`` with ``RescaleNorm.l1``)."""
  return tuple(float(before / after) if before >= L1_EPS and after >= L1_EPS else 1.0
               for before, after in np.asarray(sums, np.float64))


def _checked(fn: Callable) -> Callable[[Block], np.ndarray]:
  """Runs the library's input checks (shapes, NaN/Inf naming the tensor) before ``fn``."""
  def merge(b: Block) -> np.ndarray:
    b = _on_device(b)
    validation.check_models(*_trees(b))
    return np.asarray(fn(b))
  return merge


# ------------------------------------------------------------------------------------------
# Resolution of mergekit's parameters
# ------------------------------------------------------------------------------------------


def _all_equal(values: Sequence[float]) -> bool:
  return all(v == values[0] for v in values)


def _coefficients(config: mergekit_config.MergeConfig) -> tuple:
  weights = [m.weight for m in config.models]
  if config.normalize:
    total = sum(weights)
    return tuple(w / total for w in weights)
  return tuple(weights)


def _first_different(config: mergekit_config.MergeConfig, field: str) -> str:
  values = [getattr(m, field) for m in config.models]
  i = next(i for i, v in enumerate(values) if v != values[0])
  return (f'{config.models[i].key}.parameters.{field} = {values[i]} differs from {values[0]} '
          f'({config.models[i].path})')


def _linear(config) -> Recipe:
  weights = [m.weight for m in config.models]
  if config.normalize and _all_equal(weights):
    return Recipe('static.average', _library(static.average))
  c = jnp.asarray(_coefficients(config), jnp.float32)
  return Recipe(f'sum_i c_i theta_i, c = {np.asarray(c).tolist()}',
                _checked(lambda b: _weighted_sum(list(b.models), c)))


def _task_arithmetic(config) -> Recipe:
  c = _coefficients(config)
  if _all_equal(c):
    scaling = config.scaling * c[0]
    return Recipe(f'static.task_arithmetic(scaling={scaling:g})',
                  _library(static.task_arithmetic, scaling=scaling))
  cs, scaling = jnp.asarray(c, jnp.float32), jnp.float32(config.scaling)
  return Recipe(f'base + {config.scaling:g} * sum_i c_i tau_i, c = {list(c)}',
                _checked(lambda b: _weighted_task_arithmetic(b.base, list(b.models), cs, scaling)))


_REDUCE_NAMES = {None: 'sum', 'sum': 'disjoint sum', 'mean': 'disjoint mean',
                 'weighted_mean': 'weighted disjoint mean'}


def _ties(config) -> Recipe:
  weights = [m.weight for m in config.models]
  if config.normalize and not _all_equal(weights):
    weighted, reduce, scaling = True, 'weighted_mean', config.scaling
  elif config.normalize:
    weighted, reduce, scaling = False, 'mean', config.scaling
  elif _all_equal(weights):
    weighted, reduce, scaling = False, 'sum', config.scaling * weights[0]
  else:
    weighted, reduce, scaling = True, 'sum', config.scaling
  cs, s = jnp.asarray(weights, jnp.float32), jnp.float32(scaling)

  def merge(b: Block) -> np.ndarray:
    t = jnp.asarray(b.thresholds, jnp.float32)
    # No quota: every entry tied at the threshold is kept (at most the block's size).
    q = jnp.asarray(b.tie_quota if b.tie_quota is not None else [b.base.size] * len(b.models),
                    jnp.int32)
    return _ties_block(b.base, list(b.models), t, q, cs, s, reduce=reduce, weighted=weighted)

  densities = tuple(m.density for m in config.models)
  if reduce == 'weighted_mean':
    merged = f'weighted disjoint mean (sum_i w_i tau_i / sum_i w_i over agreeing entries, ' \
             f'w = {weights})'
  else:
    merged = f'static.ties_task_vectors(reduce={reduce!r}){", weighted" if weighted else ""}'
  selection = config.selection or ('exact' if config.trim == 'per_tensor' else 'threshold')
  if config.trim == 'global':
    selection = 'threshold'   # the paper's global ranking (mergekit_config refuses exact)
  kept = ('exactly int(density n) kept' if selection == 'exact' else
          'round(density n)-th magnitude and its ties kept')
  return Recipe(f'TIES: {config.trim} trim (densities {list(densities)}, {kept}), {merged}, '
                f'scaling {scaling:g}', _checked(merge), densities=densities, trim=config.trim,
                selection=selection)


def _dare_reduce(config, ties_merge: bool) -> tuple:
  """(coefficients, reduce, weighted, scaling) of the merge after DARE's drop."""
  weights = [m.weight for m in config.models]
  if ties_merge and config.normalize:
    if _all_equal(weights):
      return weights, 'mean', False, config.scaling
    return weights, 'weighted_mean', True, config.scaling
  c = weights if ties_merge else list(_coefficients(config))
  reduce = 'sum' if ties_merge else None
  if _all_equal(c):   # fold the common coefficient into the scaling
    return c, reduce, False, config.scaling * c[0]
  return c, reduce, True, config.scaling


def _dare(config) -> Recipe:
  densities = tuple(m.density for m in config.models)
  ties_merge = config.method == 'dare_ties'
  l1 = config.rescale == 'l1'
  rescale = config.rescale is True   # divide the kept entries by d_i
  one_drop = _all_equal(densities) and rescale
  c, reduce, weighted, scaling = _dare_reduce(config, ties_merge)
  if one_drop:
    drop_rate = 1.0 - densities[0]
    if reduce == 'mean' or (reduce is None and not weighted):
      merge = 'ties' if ties_merge else 'task_arithmetic'
      fn = _library(static.dare, with_key=True, drop_rate=drop_rate, scaling=scaling, merge=merge)
      return Recipe(f"static.dare(drop_rate={drop_rate:g}, merge={merge!r}, "
                    f'scaling={scaling:g})', fn, uses_key=True)
    drop = f'static.dare_task_vectors(drop_rate={drop_rate:g})'
  else:
    how = ('rescaled to the L1 norm of tau_i per tensor' if l1 else
           'rescaled by 1 / density' if rescale else 'not rescaled')
    drop = f'DARE drop per model (densities {list(densities)}, {how})'
  cs, s = jnp.asarray(c, jnp.float32), jnp.float32(scaling)

  def merge(b: Block) -> np.ndarray:
    scales = jnp.asarray(b.scales if b.scales is not None else [1.0] * len(b.models),
                         jnp.float32)
    return _dare_block(b.key, b.base, list(b.models), cs, s, scales, densities=densities,
                       rescale=rescale, reduce=reduce, weighted=weighted)

  def l1_sums(b: Block) -> np.ndarray:
    b = _on_device(b)
    return np.asarray(_dare_l1_block(b.key, b.base, list(b.models), densities=densities),
                      np.float64)

  weights_note = ', weighted' if weighted and reduce != 'weighted_mean' else ''
  return Recipe(f'{drop}, {_REDUCE_NAMES[reduce]}{weights_note}, '
                f'scaling {scaling:g}', _checked(merge), uses_key=True,
                l1_sums=l1_sums if l1 else None)


# mergekit's names for the registry's merges (the YAML's merge_method); every other method is
# called by its registry name.
MERGEKIT_NAMES = {'linear': 'average', 'dare_linear': 'dare_task_arithmetic'}
# Merges whose formula takes mergekit's per-model weights (and per-model densities): composed
# from the registered merge and its building blocks (module docstring). Every other registered,
# data-free merge runs as ``entry.fn(**hyperparameters from the config)``.
_WEIGHTED = {'average': _linear, 'task_arithmetic': _task_arithmetic, 'ties': _ties,
             'dare_task_arithmetic': _dare, 'dare_ties': _dare}
# OPCM's final rescaling uses whole-model norms (`checkpoint_merge` runs a first pass for it).
# Which merges need whole tensors is the registry's `MergeMethod.blockwise`.
_GLOBAL_RESCALE = ('opcm',)
# OPCM's projected tensors, as the authors project nn.Linear weights only: Flax Dense kernels
# ('.../kernel', Orbax inputs) and Hugging Face '*.weight' tensors but embeddings (2-D tensors
# only; norms and biases are 1-D). Embeddings, norms and biases are added unprojected.
OPCM_PROJECT = (r'(.*/)?kernel', r'(?!.*(embed|wte|wpe)).*\.weight')


def _config_hparams(config: mergekit_config.MergeConfig, entry: registry.MergeMethod) -> dict:
  """The registered merge's hyperparameters from the config: ``scaling`` = lambda, one
  ``density`` for all models, ``trim``, ``reduce``, ``alpha``, and OPCM's projected tensors
  `OPCM_PROJECT`; those the merge takes (other hyperparameters keep their defaults)."""
  values = dict(scaling=config.scaling, trim=config.trim, reduce=config.reduce,
                alpha=config.alpha, project=OPCM_PROJECT)
  if 'density' in entry.hparams:
    densities = {m.density for m in config.models}
    if len(densities) > 1:
      raise ValueError(f'{config.method} uses one density for all models: '
                       f'{_first_different(config, "density")}')
    values['density'] = densities.pop()
  return {k: values[k] for k in entry.hparams if k in values}


def _call(entry: registry.MergeMethod, hp: dict) -> str:
  """``module.fn(k=v, ...)`` as the recipe's description (floats as %g)."""
  args = ', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v!r}' for k, v in hp.items())
  return f'{entry.fn.__module__.rsplit(".", 1)[-1]}.{entry.fn.__name__}({args})'


def make_recipe(config: mergekit_config.MergeConfig) -> Recipe:
  """Resolves a merge config into library calls (see the module docstring's table).

  The method is looked up in `cljax.merging.REGISTRY` (under its registry name, `MERGEKIT_NAMES`
  for mergekit's linear and dare_linear).

  Args:
    config: a checked `MergeConfig`.

  Returns:
    A `Recipe`.

  Raises:
    ValueError: unequal densities for continual_ties (one density per merge), naming the
      ``models[i].parameters`` key; an unknown method, one that needs data (not a checkpoint)
      or a per-task merge (one model per task, not one output).
  """
  name = MERGEKIT_NAMES.get(config.method, config.method)
  try:
    entry = registry.get(name)
  except ValueError:
    raise ValueError(f'unknown merge_method {config.method!r}') from None
  if not entry.data_free:
    raise ValueError(f'merge_method {config.method!r} needs data '
                     f'({", ".join(entry.required_inputs)}), which cljax-merge does not have')
  if entry.kind == 'per_task':
    raise ValueError(f'merge_method {config.method!r} gives one model per task, not one '
                     f'checkpoint; cljax-merge writes one merged model')
  if name in _WEIGHTED:
    return _WEIGHTED[name](config)
  hp = _config_hparams(config, entry)
  description = _call(entry, hp)
  if entry.kind == 'static':
    with_layout = 'kernel_layout' in entry.hparams
    if with_layout:
      description += ', kernel_layout per tensor (in_out for Flax kernels, else out_in)'
    if not entry.blockwise:
      description += ', whole tensors'
    return Recipe(description, _library(entry.fn, with_key='key' in entry.inputs,
                                        with_layout=with_layout, **hp),
                  uses_key='key' in entry.inputs, blockwise=entry.blockwise)
  if name in _GLOBAL_RESCALE:
    description += ', rescaled by whole-model norms'
  return Recipe(description, continual=entry.fn(**hp), blockwise=entry.blockwise,
                global_rescale=name in _GLOBAL_RESCALE)
