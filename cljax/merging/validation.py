"""Eager input checks shared by the merges: structure, shapes, dtypes, finiteness, hyperparameters.

Every public merge runs these checks before it computes anything, so that a bad input fails with
a message naming the offending pytree path (`jax.tree_util.keystr`) or argument instead of
producing a silently wrong model:

  * structure, shape and dtype of every model against the base (the first mismatching path);
  * NaN / Inf anywhere in an input model (the first non-finite path, with counts);
  * hyperparameters in range (density and drop rate in [0, 1], alpha in (0, 1], ...).

Structure, shape and dtype are static, so those checks also run while a merge is being traced by
`jax.jit`. Values are not: under an outer `jax.jit` the NaN/Inf check cannot see the numbers and
is skipped. Call `check_finite` on the host before handing a model to a jitted merge (for example
a jitted continual ``update``).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = Any


def is_traced(tree: Any) -> bool:
  """True if any leaf of ``tree`` is a tracer (the caller runs under `jax.jit` or a transform)."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _dtype(x: Any) -> np.dtype:
  dtype = getattr(x, 'dtype', None)
  return np.dtype(dtype) if dtype is not None else np.dtype(jnp.result_type(x))


def _where(path: Any) -> str:
  text = jax.tree_util.keystr(tuple(path))
  return text if text else '<root>'


def check_same_structure(reference: Any, other: Any, *, reference_name: str = 'base',
                         other_name: str = 'finetuned', check_dtype: bool = True) -> None:
  """Checks that ``other`` has the tree structure, shapes and (optionally) dtypes of ``reference``.

  Args:
    reference: a pytree of arrays (e.g. the base model's params).
    other: a pytree of arrays to compare (e.g. a finetuned model).
    reference_name: how to call ``reference`` in the error.
    other_name: how to call ``other`` in the error, e.g. ``'finetuned[2]'``.
    check_dtype: also require equal dtypes (False for Fisher weights, whose float type may differ).

  Raises:
    ValueError: naming the first leaf path (in flattening order) where the trees differ: a leaf
      present in one tree only, a different shape, or a different dtype; or the container types
      when every leaf path matches but the tree definitions do not (e.g. a list against a tuple).
  """
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
  oth_leaves, oth_def = jax.tree_util.tree_flatten_with_path(other)
  for (ref_path, ref_x), (oth_path, oth_x) in zip(ref_leaves, oth_leaves):
    if ref_path != oth_path:
      raise ValueError(
          f'{other_name} does not have the structure of {reference_name}: the first mismatching '
          f'leaf is {_where(oth_path)} in {other_name} where {reference_name} has '
          f'{_where(ref_path)}')
    if np.shape(ref_x) != np.shape(oth_x):
      raise ValueError(
          f'{other_name} differs from {reference_name} at {_where(ref_path)}: shape '
          f'{np.shape(oth_x)} != {np.shape(ref_x)}')
    if check_dtype and _dtype(ref_x) != _dtype(oth_x):
      raise ValueError(
          f'{other_name} differs from {reference_name} at {_where(ref_path)}: dtype '
          f'{_dtype(oth_x)} != {_dtype(ref_x)}')
  if len(ref_leaves) != len(oth_leaves):
    if len(ref_leaves) > len(oth_leaves):
      path = ref_leaves[len(oth_leaves)][0]
      raise ValueError(f'{other_name} does not have the structure of {reference_name}: it lacks '
                       f'the leaf {_where(path)}')
    path = oth_leaves[len(ref_leaves)][0]
    raise ValueError(f'{other_name} does not have the structure of {reference_name}: it has an '
                     f'extra leaf {_where(path)}')
  if ref_def != oth_def:
    raise ValueError(f'{other_name} has the leaf paths of {reference_name} but different container '
                     f'types: {oth_def} != {ref_def}')


@jax.jit
def _finite_flags(leaves: list) -> list:
  """Per leaf, whether it is all finite. ``x * 0`` is 0 where x is finite and NaN where it is
  NaN or Inf (XLA keeps the product: dropping it would be wrong for those), so one float sum per
  leaf answers; XLA vectorizes it about 3x faster than ``all(isfinite(x))``'s boolean reduction."""
  return [jnp.isfinite(jnp.sum(x * jnp.zeros((), x.dtype))) for x in leaves]


def check_finite(tree: Any, *, name: str = 'params') -> None:
  """Raises if any floating leaf of ``tree`` holds NaN or Inf; a no-op on traced values.

  Args:
    tree: a pytree of arrays.
    name: how to call ``tree`` in the error, e.g. ``'finetuned[1]'``.

  Raises:
    ValueError: naming the first non-finite leaf path with its NaN and Inf counts.
  """
  if is_traced(tree):
    return
  flat = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(_dtype(x), jnp.inexact)]
  if not flat:
    return
  flags = jax.device_get(_finite_flags([x for _, x in flat]))
  for (path, x), ok in zip(flat, flags):
    if not ok:
      n_nan = int(jnp.sum(jnp.isnan(x)))
      n_inf = int(jnp.sum(jnp.isinf(x)))
      raise ValueError(f'{name} has non-finite values at {_where(path)} ({n_nan} NaN, {n_inf} '
                       f'Inf); refusing to merge it')


def check_nonnegative(tree: Any, *, name: str) -> None:
  """Raises if any leaf of ``tree`` has a negative entry (e.g. a Fisher); no-op when traced.

  Raises:
    ValueError: naming the first leaf path with a negative entry.
  """
  if is_traced(tree):
    return
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if bool(jnp.any(jnp.asarray(x) < 0)):
      raise ValueError(f'{name} has negative entries at {_where(path)}; a diagonal Fisher is '
                       f'nonnegative')


def check_floating(tree: Any, mask: Any, *, name: str = 'base') -> None:
  """Raises if a merged leaf (``mask`` True) is not a floating-point array.

  Args:
    tree: a pytree of arrays.
    mask: pytree of Python bools with the structure of ``tree``; True where the leaf is merged.
    name: how to call ``tree`` in the error.

  Raises:
    ValueError: naming the first merged non-floating leaf.
  """
  for (path, x), merged in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                               jax.tree.leaves(mask)):
    if merged and not jnp.issubdtype(_dtype(x), jnp.inexact):
      raise ValueError(f'{name} has a non-floating leaf {_where(path)} (dtype {_dtype(x)}); task '
                       f'vectors need floating-point params. Exclude it from merging (exclude=...)')


def check_models(base: Params, finetuned: Any, *, allow_empty: bool = False,
                 check_values: bool = True) -> list:
  """Checks a base model and a sequence of finetuned models; returns the models as a list.

  Args:
    base: the base (pretrained) params.
    finetuned: a sequence of params pytrees, each with base's structure, shapes and dtypes.
    allow_empty: accept an empty sequence.
    check_values: also refuse NaN/Inf (reads every model); False checks structure only, for a
      caller that checks the values another way.

  Returns:
    ``list(finetuned)``.

  Raises:
    ValueError: an empty sequence (unless allowed), a structure/shape/dtype mismatch (the first
      mismatching path), or NaN/Inf in ``base`` or any finetuned model (its path).
    TypeError: ``finetuned`` is a single pytree rather than a sequence of them (a dict).
  """
  if isinstance(finetuned, dict) or not isinstance(finetuned, Sequence):
    raise TypeError(f'finetuned must be a sequence (list or tuple) of params pytrees; got '
                    f'{type(finetuned).__name__}')
  models = list(finetuned)
  if not models and not allow_empty:
    raise ValueError('finetuned is empty: a merge needs at least one finetuned model')
  for i, model in enumerate(models):
    check_same_structure(base, model, other_name=f'finetuned[{i}]')
  if not check_values:
    return models
  check_finite(base, name='base')
  for i, model in enumerate(models):
    check_finite(model, name=f'finetuned[{i}]')
  return models


def _real(value: Any, name: str) -> float:
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f'{name} must be a concrete Python number, not a traced value; pass it as a '
                     f'static (closed-over) argument')
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)) or \
      np.ndim(value) != 0:
    raise ValueError(f'{name} must be a real scalar; got {value!r}')
  return float(value)


def check_interval(value: Any, *, name: str, low: float, high: float, low_open: bool = False,
                   high_open: bool = False) -> float:
  """Returns ``float(value)`` after checking it lies in the given interval (NaN never does).

  Args:
    value: a real scalar (Python, NumPy or a concrete 0-d array).
    name: the argument's name, for the error.
    low, high: the interval's ends.
    low_open, high_open: exclude the corresponding end.

  Raises:
    ValueError: ``value`` is not a concrete real scalar or lies outside the interval.
  """
  v = _real(value, name)
  above = v > low if low_open else v >= low
  below = v < high if high_open else v <= high
  if not (above and below):
    interval = f'{"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
    raise ValueError(f'{name} must lie in {interval}; got {v}')
  return v


check_fraction = functools.partial(check_interval, low=0.0, high=1.0)


def check_finite_scalar(value: Any, *, name: str) -> float:
  """Returns ``float(value)`` after checking it is a finite real scalar.

  Raises:
    ValueError: not a concrete real scalar, or NaN/Inf.
  """
  v = _real(value, name)
  if not math.isfinite(v):
    raise ValueError(f'{name} must be finite; got {v}')
  return v


def check_choice(value: Any, *, name: str, choices: Sequence[str]) -> str:
  """Returns ``value`` after checking it is one of ``choices``.

  Raises:
    ValueError: naming the argument and the allowed values.
  """
  if value not in choices:
    raise ValueError(f'{name} must be one of {tuple(choices)}; got {value!r}')
  return value
