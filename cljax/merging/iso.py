"""Isotropic merging (Marczak et al. 2025): flatten the singular-value spectrum of the merged
task matrix (Iso-C), optionally over a common plus task-specific subspace (Iso-CTS).

Per 2-D leaf, with Delta_t the task matrices and r = min(shape):

  * Iso-C: Delta = sum_t Delta_t = U S V^T; the merge is sigma_bar U V^T with sigma_bar the
    mean of the r singular values (every direction of the summed update scaled alike).
  * Iso-CTS: the common subspace is the top c singular vectors of sum_t Delta_t (c from
    ``common_space_fraction``, adjusted so that T divides r - c); each task contributes the top
    s = (r - c) / T singular vectors of its matrix with the common (output-side) subspace
    projected out, Delta_t - U_c U_c^T Delta_t; the r left and r right vectors (tasks first,
    then common) are orthogonalized by their polar factors and the spectrum flattened to the
    mean of the collected singular values: sigma_bar U_perp V_perp^T.

Leaves that are not 2-D get the mean task vector (the authors' code). The merged model is
``base + scaling * Delta``. Iso-CTS projects the *output* side of the PyTorch (out, in) matrix,
so it depends on the layout: ``kernel_layout='in_out'`` (Flax / Haiku Dense, ``y = x @ K``)
transposes the kernel into the authors' layout and back.

References:
  Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025 (Iso-C: the merged matrix with its spectrum replaced by
  its mean; Iso-CTS: common and task-specific subspaces), and the authors' ``iso_c`` /
  ``iso_cts`` (FusionBench ``method/isotropic_merging``: common_space_fraction 0.8, the
  task-specific space divisible by T).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from cljax.merging import leafwise
from cljax.merging import task_vectors as tvlib
from cljax.merging import validation

Params = Any


@jax.jit
def iso_c_matrix(tvs: Sequence[jax.Array]) -> jax.Array:
  """Iso-C of T same-shape task matrices: ``mean(S) U V^T`` of their sum ``U S V^T``.

  References:
    Marczak et al., ICML 2025 (Iso-C); authors' ``iso_c``.
  """
  u, s, vt = jnp.linalg.svd(sum(tvs), full_matrices=False)
  return jnp.mean(s) * (u @ vt)


def iso_cts_sizes(shape: tuple, num_tasks: int, common_space_fraction: float) -> tuple:
  """(c, s): the common-subspace size and the per-task size, as the authors' code.

  c0 = int(r * fraction), r = min(shape); the task-specific total is
  round((r - c0) / T) * T (Python's round, half to even); c = r - that total; s = (r - c) / T.

  Args:
    shape: the 2-D matrix's shape.
    num_tasks: T >= 1.
    common_space_fraction: in [0, 1].

  Returns:
    ``(c, s)`` ints with T s + c = r.

  Raises:
    ValueError: c < 0 (the rounding asks for more task dimensions than r).

  References:
    Marczak et al., ICML 2025; authors' ``iso_cts`` (sizes).
  """
  r = min(shape)
  common = int(r * common_space_fraction)
  specific = round((r - common) / num_tasks) * num_tasks
  common = r - specific
  if common < 0:
    raise ValueError(f'iso_cts: a {shape} matrix has {r} singular values, fewer than the '
                     f'{specific} task-specific dimensions the rounding asks for {num_tasks} tasks')
  return common, specific // num_tasks


@functools.partial(jax.jit, static_argnames=('common', 'per_task'))
def iso_cts_matrix(tvs: Sequence[jax.Array], *, common: int, per_task: int) -> jax.Array:
  """Iso-CTS of T same-shape task matrices in (out, in) layout (`iso_cts_sizes` gives the sizes).

  Args:
    tvs: T float arrays (m, n).
    common: c, common singular vectors of the sum (static).
    per_task: s, task-specific singular vectors of each task (static), T s + c = min(m, n).

  Returns:
    (m, n) float array.

  References:
    Marczak et al., ICML 2025 (Iso-CTS); authors' ``iso_cts``.
  """
  u, s, vt = jnp.linalg.svd(sum(tvs), full_matrices=False)
  uc, sc, vtc = u[:, :common], s[:common], vt[:common]
  us, ss, vts = [], [], []
  for tv in tvs:
    ut, st, vtt = jnp.linalg.svd(tv - uc @ (uc.T @ tv), full_matrices=False)
    us.append(ut[:, :per_task])
    ss.append(st[:per_task])
    vts.append(vtt[:per_task])
  u_all = leafwise.polar(jnp.concatenate(us + [uc], axis=1))
  vt_all = leafwise.polar(jnp.concatenate(vts + [vtc], axis=0))
  return jnp.mean(jnp.concatenate(ss + [sc])) * (u_all @ vt_all)


def _merge(base, finetuned, scaling, average_only, exclude, method, matrix_fn):
  scaling = leafwise.check_scaling(scaling)
  p = leafwise.prepare(base, finetuned, exclude, method=method)
  flags = leafwise.matrix_flags(base, p, average_only)
  merged = []
  for j, (name, b, is_matrix) in enumerate(zip(p.names, p.base, flags)):
    if is_matrix:
      delta = matrix_fn(name, b, [m[j] - b for m in p.models])
    else:
      delta = leafwise.mean_task_vector(p, j)
    merged.append(b + scaling * delta)
  return leafwise.finish(base, p, merged, method=method)


def iso_c(base: Params, finetuned: Sequence[Params], *, scaling: float = 1.0,
          average_only: tvlib.Exclude = None, exclude: tvlib.Exclude = None) -> Params:
  """Iso-C: per 2-D leaf, the summed task matrix with its singular values set to their mean.

  Args:
    base: base params, a pytree of float arrays.
    finetuned: T >= 1 params pytrees with base's structure, shapes and dtypes.
    scaling: alpha, a finite scalar (chosen on held-out data in the paper; FusionBench's
      default 1.0; may be traced).
    average_only: regex(es) of 2-D leaves averaged instead.
    exclude: regex(es) of leaves that are not merged (base's value is kept).

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: mismatching or non-finite inputs (the model and path), a non-finite scaling, a
      pattern matching nothing.

  References:
    Marczak et al., ICML 2025 (Iso-C); authors' ``iso_c``.
  """
  return _merge(base, finetuned, scaling, average_only, exclude, 'iso_c',
                lambda name, b, tvs: iso_c_matrix(tvs))


def iso_cts(base: Params, finetuned: Sequence[Params], *, scaling: float = 1.0,
            common_space_fraction: float = 0.8, kernel_layout: str = 'in_out',
            average_only: tvlib.Exclude = None, exclude: tvlib.Exclude = None) -> Params:
  """Iso-CTS: isotropic merge over the common subspace plus each task's own subspace.

  Args:
    base: base params, a pytree of float arrays.
    finetuned: T >= 1 params pytrees with base's structure, shapes and dtypes.
    scaling: alpha, a finite scalar (FusionBench's default 1.0; may be traced).
    common_space_fraction: share of the r singular directions kept from the summed matrix,
      in [0, 1] (the authors' default 0.8).
    kernel_layout: 'in_out' (Flax / Haiku kernels, transposed into the authors' layout) or
      'out_in' (PyTorch Linear weights).
    average_only: regex(es) of 2-D leaves averaged instead.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: mismatching or non-finite inputs (the model and path); a leaf too small for the
      task-specific dimensions (its path); bad common_space_fraction, kernel_layout or scaling;
      a pattern matching nothing.

  References:
    Marczak et al., ICML 2025 (Iso-CTS); authors' ``iso_cts``.
  """
  fraction = validation.check_fraction(common_space_fraction, name='common_space_fraction')
  layout = leafwise.check_layout(kernel_layout)
  n = len(finetuned) if isinstance(finetuned, Sequence) else 0

  def matrix(name, b, tvs):
    tvs = [leafwise.as_out_in(t, layout) for t in tvs]
    try:
      common, per_task = iso_cts_sizes(tvs[0].shape, n, fraction)
    except ValueError as e:
      raise ValueError(f'{e} (leaf {name!r}); exclude it or list it in average_only') from None
    return leafwise.as_out_in(iso_cts_matrix(tvs, common=common, per_task=per_task), layout)

  return _merge(base, finetuned, scaling, average_only, exclude, 'iso_cts', matrix)
