"""Plumbing shared by the leaf-by-leaf merges (SLERP, Model Stock, TSV-M, Iso, RegMean, ...).

Those merges compute each merged leaf from the same leaf of every input (and, for the SVD-based
ones, treat 2-D leaves as matrices). `prepare` runs the eager checks every cljax merge runs
(`cljax.merging.validation`: structure, shapes, dtypes and NaN/Inf of every model, naming the
model and path; floating merged leaves; ``exclude`` patterns that match) and splits off the merged
leaves with their '/'-joined names; `finish` refuses a non-finite result (naming the leaf) and
reassembles the full tree with the base's value at excluded leaves, in the base's dtypes.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from cljax.merging import task_vectors as tvlib
from cljax.merging import validation

Params = Any
KERNEL_LAYOUTS = ('in_out', 'out_in')


class Prepared(NamedTuple):
  """The merged part of a merge's inputs, leaf by leaf in flattening order.

  Attributes:
    mask: `task_vectors.merge_mask` of the base (pytree of Python bools).
    names: '/'-joined paths of the merged leaves.
    base: the base's merged leaves, upcast to at least float32.
    models: per finetuned model, its merged leaves, upcast.
  """

  mask: Any
  names: list
  base: list
  models: list

  def task_vectors(self) -> list:
    """Per model, per merged leaf, ``theta_i - theta_base`` (upcast)."""
    return [[m - b for m, b in zip(model, self.base)] for model in self.models]


def prepare(base: Params, finetuned: Sequence[Params], exclude: tvlib.Exclude, *,
            min_models: int = 1, max_models: int | None = None, method: str = 'merge') -> Prepared:
  """Checks a merge's inputs and returns its merged leaves (upcast) with their names.

  Args:
    base: base params, a pytree of float arrays.
    finetuned: a sequence of params pytrees with base's structure, shapes and dtypes.
    exclude: regex(es) over '/'-joined leaf paths that are not merged.
    min_models, max_models: how many finetuned models the method accepts.
    method: the method's name, for the error.

  Returns:
    A `Prepared`.

  Raises:
    ValueError: too few or too many models, a structure/shape/dtype mismatch or NaN/Inf (the
      model and path), a non-floating merged leaf, an exclude pattern matching nothing.
    TypeError: ``finetuned`` is a single pytree.
  """
  models = validation.check_models(base, finetuned)
  if len(models) < min_models or (max_models is not None and len(models) > max_models):
    wanted = (f'exactly {min_models}' if max_models == min_models else
              f'at least {min_models}' if max_models is None else
              f'{min_models} to {max_models}')
    raise ValueError(f'{method} merges {wanted} finetuned model(s); got {len(models)}')
  mask = tvlib.merge_mask(base, exclude)
  validation.check_floating(base, mask)
  names = [n for n, m in zip(tvlib.leaf_names(base), jax.tree.leaves(mask)) if m]
  return Prepared(mask, names, tvlib.upcast(tvlib.included_leaves(base, mask)),
                  [tvlib.upcast(tvlib.included_leaves(m, mask)) for m in models])


def finish(base: Params, prepared: Prepared, merged: Sequence[jax.Array], *,
           method: str = 'merge') -> Params:
  """Checks the merged leaves are finite and reassembles the full params tree.

  Args:
    base: the base params (excluded leaves and dtypes come from it).
    prepared: the `Prepared` the merge started from.
    merged: one array per merged leaf, flattening order.
    method: the method's name, for the error.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: a merged leaf is not finite (its path; the inputs were finite, so the merge
      overflowed or divided by zero there).
  """
  if not validation.is_traced(merged):
    flags = jax.device_get([jnp.isfinite(jnp.sum(x * jnp.zeros((), x.dtype))) for x in merged])
    for name, ok in zip(prepared.names, flags):
      if not bool(ok):
        raise ValueError(f'{method}: the merged model is not finite at {name!r} although every '
                         f'input is')
  return tvlib.combine(base, prepared.mask, merged)


def is_matrix(x: Any) -> bool:
  """Whether a leaf is merged as a matrix by the SVD-based methods (2-D, as the authors)."""
  return getattr(x, 'ndim', 0) == 2


def as_out_in(x: jax.Array, layout: str) -> jax.Array:
  """A 2-D kernel in PyTorch's (out, in) layout, the one the authors' code works in.

  Flax / Haiku Dense kernels are (in, out) (``y = x @ K``): ``layout='in_out'`` transposes.
  """
  return x.T if layout == 'in_out' else x


def check_layout(layout: str) -> str:
  return validation.check_choice(layout, name='kernel_layout', choices=KERNEL_LAYOUTS)


def check_scaling(value: Any, name: str = 'scaling') -> jax.Array:
  """A finite scalar coefficient (traced values pass unchecked), as float32."""
  if not validation.is_traced(value):
    validation.check_finite_scalar(value, name=name)
  return jnp.asarray(value, jnp.float32)


def matrix_flags(base: Params, prepared: Prepared, average_only: tvlib.Exclude) -> list:
  """Per merged leaf, whether an SVD-based merge treats it as a matrix.

  A merged leaf is a matrix when it is 2-D and its path matches none of the ``average_only``
  regexes (`re.fullmatch` on '/'-joined paths, as ``exclude``; the authors of TSV-M and Iso
  keep CLIP's ``text_projection`` out this way). Other leaves are averaged.

  Args:
    base: the base params (paths).
    prepared: `prepare`'s result for it.
    average_only: None, a regex or a sequence of regexes.

  Returns:
    One Python bool per merged leaf, flattening order.

  Raises:
    ValueError: an ``average_only`` pattern that matches no leaf (the error lists paths).
  """
  svd_ok = [m for m, keep in zip(jax.tree.leaves(tvlib.merge_mask(base, average_only)),
                                 jax.tree.leaves(prepared.mask)) if keep]
  return [is_matrix(b) and ok for b, ok in zip(prepared.base, svd_ok)]


def mean_task_vector(prepared: Prepared, j: int) -> jax.Array:
  """The mean over models of leaf j's task vectors."""
  b = prepared.base[j]
  return sum(m[j] - b for m in prepared.models) / len(prepared.models)


def polar(x: jax.Array) -> jax.Array:
  """The orthogonal polar factor U V^T of x = U S V^T (thin SVD): the nearest matrix with
  orthonormal columns (rows, if wider than tall) in Frobenius norm."""
  u, _, vt = jnp.linalg.svd(x, full_matrices=False)
  return u @ vt
