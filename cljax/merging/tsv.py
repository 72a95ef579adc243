"""TSV-M (Task Singular Vectors merging, Gargiulo et al. 2025): per layer, a low-rank SVD of each
task matrix, the singular vectors of all tasks concatenated and decorrelated, reconstructed.

For T task matrices Delta_t = U_t S_t V_t^T of one 2-D leaf with r = min(shape) singular values,
keep k = int(r * sv_fraction) (default sv_fraction 1 / T) leading triplets of each task, stack
U = [U_1[:, :k] ... U_T[:, :k]], S = [S_1[:k] ... S_T[:k]], V = [V_1[:, :k] ... V_T[:, :k]],
replace U and V by their orthogonal polar factors (U_u V_u^T of U = U_u S_u V_u^T: the nearest
orthonormal bases, which remove the interference between the tasks' subspaces), and merge
Delta = U_perp diag(S) V_perp^T. Leaves that are not 2-D (biases, norms) get the mean task
vector, as the authors' code. The merged model is ``base + scaling * Delta``.

The construction is invariant to transposing the matrices, so Flax (in, out) and PyTorch
(out, in) kernels give the same merge.

References:
  Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR
  2025 (TSV-Merge: low-rank task matrices, their stacked singular vectors orthogonalized by
  Procrustes, Delta_M = U_perp S V_perp^T) and the authors' ``compute_and_sum_svd_mem_reduction``
  (sv_reduction = 1 / T; non-matrix parameters averaged).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from cljax.merging import leafwise
from cljax.merging import task_vectors as tvlib
from cljax.merging import validation

Params = Any


@functools.partial(jax.jit, static_argnames=('k',))
def tsv_matrix(tvs: Sequence[jax.Array], *, k: int) -> jax.Array:
  """TSV-M's merged task matrix of T same-shape 2-D task matrices (k triplets per task).

  Args:
    tvs: T float arrays (m, n).
    k: leading singular triplets kept per task, 1 <= k and T k <= min(m, n) (static).

  Returns:
    (m, n) float array U_perp diag(S) V_perp^T.

  References:
    Gargiulo et al., CVPR 2025 (TSV-M); authors' ``compute_and_sum_svd_mem_reduction``.
  """
  us, ss, vts = [], [], []
  for tv in tvs:
    u, s, vt = jnp.linalg.svd(tv, full_matrices=False)
    us.append(u[:, :k])
    ss.append(s[:k])
    vts.append(vt[:k])
  u = leafwise.polar(jnp.concatenate(us, axis=1))
  vt = leafwise.polar(jnp.concatenate(vts, axis=0))
  return (u * jnp.concatenate(ss)[None]) @ vt


def tsv(base: Params, finetuned: Sequence[Params], *, scaling: float = 1.0,
        sv_fraction: Optional[float] = None, average_only: tvlib.Exclude = None,
        exclude: tvlib.Exclude = None) -> Params:
  """TSV-M: merge each 2-D leaf's decorrelated low-rank task subspaces; average the rest.

  Args:
    base: base params, a pytree of float arrays.
    finetuned: T >= 1 params pytrees with base's structure, shapes and dtypes.
    scaling: alpha, a finite scalar (the authors' default 1.0; may be traced).
    sv_fraction: fraction of each task's r = min(shape) singular triplets kept, in (0, 1],
      with T * int(r * sv_fraction) <= r; default 1 / T (the authors' ``sv_reduction``).
    average_only: regex(es) of 2-D leaves that are averaged instead (e.g. a projection the
      authors leave out of the SVD).
    exclude: regex(es) of leaves that are not merged (base's value is kept).

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: mismatching or non-finite inputs (the model and path); a 2-D leaf where
      int(r * sv_fraction) is 0 or T of them exceed r (its path and shape: exclude it, list it
      in ``average_only`` or change sv_fraction); a bad sv_fraction or scaling; a pattern
      matching nothing.

  References:
    Gargiulo et al., CVPR 2025 (TSV-M); authors' ``compute_and_sum_svd_mem_reduction``.
  """
  scaling = leafwise.check_scaling(scaling)
  p = leafwise.prepare(base, finetuned, exclude, method='tsv')
  n = len(p.models)
  fraction = 1.0 / n if sv_fraction is None else validation.check_interval(
      sv_fraction, name='sv_fraction', low=0.0, high=1.0, low_open=True)
  flags = leafwise.matrix_flags(base, p, average_only)
  merged = []
  for j, (name, b, is_matrix) in enumerate(zip(p.names, p.base, flags)):
    if not is_matrix:
      merged.append(b + scaling * leafwise.mean_task_vector(p, j))
      continue
    r = min(b.shape)
    k = int(r * fraction)
    if k == 0 or n * k > r:
      raise ValueError(f'tsv: {name!r} of shape {b.shape} has {r} singular values, too few for '
                       f'{n} tasks at sv_fraction {fraction:g} (k = {k} per task); exclude it, '
                       f'list it in average_only or change sv_fraction')
    delta = tsv_matrix([m[j] - b for m in p.models], k=k)
    merged.append(b + scaling * delta)
  return leafwise.finish(base, p, merged, method='tsv')
