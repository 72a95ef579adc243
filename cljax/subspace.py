"""SVD subspaces: energy-threshold bases, GPM basis growth, projections and sketches.

The shared linear algebra of the projection methods (GPM, OSFT, CoSO in `cljax.methods.projection`)
and of continual merging (OPCM in `cljax.merging.continual`: `truncated_svd`). Everything
here is a pure function of arrays and jittable.

Conventions:

  * **Layout.** Weights are in Flax layout, output axis last: a Dense kernel is (in, out), a conv
    kernel (kh, kw, cin, cout). The *input side* of a weight of shape (..., out) has dimension
    ``d = prod(shape[:-1])`` (``kh*kw*cin`` for a conv kernel, the im2col patch size, as in GPM); a
    1-D leaf of shape (d,) is a single vector. A representation matrix is (d, n): one column per
    example (Dense: the layer inputs transposed; conv: `conv_representation`).
  * **Bases.** A basis is a (d, w) array whose columns are orthonormal or exactly zero, the nonzero
    columns first. ``None`` is the empty basis. The protected subspace is the span of the columns,
    and the projector onto it is ``B Bᵀ`` (zero columns add nothing).
  * **Padded bases.** The number k of directions a threshold selects depends on the data, so
    the bases built here (`grow_basis_padded`) are fixed (d, w) arrays (w = d by default) whose
    columns beyond k are zero; `basis_rank` recovers k. They jit, keep the method state one
    shape across tasks (one compilation, checkpoints with a fixed structure), and a smaller
    static ``width`` caps memory and projection cost. Functions that take a basis accept a
    compact (d, k) one too.

References:
  Saha, Garg & Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021 (GPM).
  Liberty, "Simple and Deterministic Matrix Sketching", KDD 2013; Ghashami, Liberty, Phillips &
  Woodruff, "Frequent Directions: Simple and Deterministic Matrix Sketching", SIAM J. Comput. 2016.
  Nayak et al., "Sculpting Subspaces", arXiv 2504.07097 (OSFT); Cheng et al., "Continuous Subspace
  Optimization for Continual Learning", arXiv 2505.11816 (CoSO); Tang et al., arXiv 2501.09522
  (OPCM).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import tree as tree_lib

Array = jax.Array
PyTree = Any

_HIGHEST = jax.lax.Precision.HIGHEST
# Projections must remove the protected component to float32 accuracy; default matmul precision
# on some accelerators (TF32, bf16 passes) would leave ~1e-3 of it.
_matmul = functools.partial(jnp.matmul, precision=_HIGHEST)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _float_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _where(path: Any) -> str:
  """A pytree path as text for error messages; the empty path is a bare array."""
  text = jax.tree_util.keystr(tuple(path)) if path else ''
  return f'leaf {text}' if text else 'the array'


def check_threshold(threshold: Any, *, where: str = 'the array') -> Any:
  """Checks that an energy threshold lies in (0, 1].

  Args:
    threshold: a Python or NumPy scalar, or a scalar array. Traced values (inside `jax.jit`) cannot
      be checked and are returned unchanged.
    where: what to name in the error, e.g. the layer path.

  Returns:
    ``threshold`` unchanged.

  Raises:
    ValueError: ``threshold`` is not a scalar, or is outside (0, 1] (NaN included).
  """
  if not _is_concrete(threshold):
    return threshold
  value = np.asarray(threshold)
  if value.shape != () or not np.issubdtype(value.dtype, np.number):
    raise ValueError(f'threshold for {where} must be a real scalar in (0, 1]; got {threshold!r}')
  if not 0.0 < float(value) <= 1.0:
    raise ValueError(f'threshold for {where} must lie in (0, 1]; got {float(value)}')
  return threshold


def check_orthonormal(basis: Any, *, where: str = 'the array', atol: float = 1e-3) -> None:
  """Checks the basis convention: columns orthonormal or zero, nonzero columns first.

  Args:
    basis: (d, w) array, or None (the empty basis, always valid). Traced values are not checked.
    where: what to name in the error, e.g. the layer path.
    atol: tolerance on every entry of ``BᵀB`` (diagonal 0 or 1, off-diagonal 0).

  Raises:
    ValueError: ``basis`` is not 2-D, its Gram matrix is not a 0/1 diagonal to ``atol``, or a zero
      column precedes a nonzero one.
  """
  if basis is None or not _is_concrete(basis):
    return
  b = jnp.asarray(basis)
  if b.ndim != 2:
    raise ValueError(f'basis for {where} must be 2-D (d, k); got shape {b.shape}')
  b = b.astype(_float_dtype(b.dtype))
  gram = np.asarray(_matmul(b.T, b), np.float64)   # on the device: (w, w) comes back, not (d, w)
  diag = np.diag(gram)
  unit = diag > 0.5
  bad = np.flatnonzero(np.abs(diag - unit) > atol)
  if bad.size:
    raise ValueError(f'basis for {where} is not orthonormal: {bad.size} column(s) have squared '
                     f'norm neither 1 nor 0, e.g. column {bad[0]}: {diag[bad[0]]:.4g} '
                     f'(atol {atol})')
  off = gram - np.diag(diag)
  if off.size and np.abs(off).max() > atol:
    raise ValueError(f'basis for {where} is not orthonormal: max |BᵀB - I| off the diagonal is '
                     f'{np.abs(off).max():.3g} (atol {atol})')
  if unit.size and np.any(~unit[:-1] & unit[1:]):
    raise ValueError(f'basis for {where} has a zero column before a nonzero one; padded bases '
                     'keep their directions in the leading columns')


def input_dim(shape: Sequence[int], *, where: str = 'the array') -> int:
  """The input-side dimension of a weight of Flax layout: ``prod(shape[:-1])``, or d for (d,).

  Raises:
    ValueError: ``shape`` is a scalar's.
  """
  shape = tuple(shape)
  if not shape:
    raise ValueError(f'{where} is a scalar; there is no input side to project')
  if len(shape) == 1:
    return int(shape[0])
  return int(math.prod(shape[:-1]))


def as_matrix(x: Array) -> Array:
  """Views a weight of Flax layout as its (input_dim, out) matrix; (d,) becomes (d, 1).

  A Dense kernel (in, out) is unchanged; a conv kernel (kh, kw, cin, cout) becomes
  (kh*kw*cin, cout), with rows in the order of `conv_patches` features.
  """
  return jnp.reshape(x, (input_dim(x.shape), -1))


def _check_basis_dim(basis: Any, dim: int, *, where: str, side: str = 'input') -> None:
  if basis is None:
    return
  if getattr(basis, 'ndim', None) != 2:
    raise ValueError(f'{side} basis for {where} must be a 2-D (d, k) array; got '
                     f'{getattr(basis, "shape", type(basis))}')
  if basis.shape[0] != dim:
    raise ValueError(f'{side} basis for {where} has dimension {basis.shape[0]} but the layer\'s '
                     f'{side} dimension is {dim}')


# --------------------------------------------------------------------------------------------
# Basis bookkeeping
# --------------------------------------------------------------------------------------------


def basis_rank(basis: Optional[Array]) -> Array:
  """Number of nonzero columns of a basis (its k); int32 scalar, jittable. None has rank 0."""
  if basis is None:
    return jnp.zeros((), jnp.int32)
  return jnp.sum(jnp.sum(jnp.square(basis.astype(jnp.float32)), axis=0) > 0.5, dtype=jnp.int32)


def mask_columns(x: Array, k: Any) -> Array:
  """Zeroes the columns of ``x`` (..., m) from index ``k`` on; ``k`` may be traced."""
  keep = jnp.arange(x.shape[-1]) < k
  return jnp.where(keep, x, jnp.zeros((), x.dtype))


# --------------------------------------------------------------------------------------------
# Energy thresholds (GPM, Saha et al. 2021, Eq. 5 and Eq. 9)
# --------------------------------------------------------------------------------------------


def _count_short(captured: Array, sq_values: Array, target: Array) -> Array:
  """Smallest r with ``captured + sum(sq_values[:r]) >= target``, or len(sq_values) if none.

  Counts the prefixes (of length 0 .. m-1) that fall short of the target; the prefix sums are
  nondecreasing, so this is GPM's loop "add the next direction while accumulated < threshold".
  """
  before = jnp.concatenate([jnp.zeros((1,), sq_values.dtype), jnp.cumsum(sq_values)[:-1]])
  prefix = captured + before
  return jnp.sum(prefix < target, dtype=jnp.int32)


def _check_matrix(matrix: Any, *, where: str) -> None:
  if getattr(matrix, 'ndim', None) != 2 or 0 in matrix.shape:
    raise ValueError(f'representation for {where} must be a nonempty 2-D (d, n) matrix; got '
                     f'{getattr(matrix, "shape", type(matrix))}')


# --------------------------------------------------------------------------------------------
# Basis growth (GPM, Saha et al. 2021, Eq. 8-9)
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('width',))
def _grow_basis_padded(basis: Array, matrix: Array, threshold: Array, width: int) -> Array:
  dtype = _float_dtype(jnp.promote_types(matrix.dtype, basis.dtype))
  r = matrix.astype(dtype)
  d, n = r.shape
  b = basis.astype(dtype)
  if b.shape[1] < width:
    b = jnp.pad(b, ((0, 0), (0, width - b.shape[1])))
  k0 = basis_rank(b)
  coefficients = _matmul(b.T, r)                               # (w, n): Bᵀ R
  captured = jnp.sum(jnp.square(coefficients))                 # ||B Bᵀ R||_F²
  total = jnp.sum(jnp.square(r))                               # ||R||_F²
  residual = r - _matmul(b, coefficients)                      # Eq. 8: R̂ = R - B Bᵀ R
  u, s, _ = jnp.linalg.svd(residual, full_matrices=False)      # u: (d, m), m = min(d, n)
  m = u.shape[1]
  needed = _count_short(captured, jnp.square(s), threshold * total)       # Eq. 9
  tol = max(d, n) * jnp.finfo(dtype).eps * jnp.sqrt(total)
  added = jnp.minimum(needed, jnp.sum(s > tol, dtype=jnp.int32))
  added = jnp.minimum(added, width - k0)                      # the dimension cap
  # The residual's singular vectors are orthogonal to B up to rounding; one more Gram-Schmidt pass
  # and a QR keep the grown basis orthonormal to float accuracy over many tasks.
  new = mask_columns(u, added)
  new = new - _matmul(b, _matmul(b.T, new))
  q, _ = jnp.linalg.qr(new)                                    # (d, m); q[:, :j] spans new[:, :j]
  q = mask_columns(q, added)
  # Write q[:, :added] into columns k0 .. k0 + added - 1.
  columns = jnp.arange(width)
  source = jnp.clip(columns - k0, 0, m - 1)
  place = (columns >= k0) & (columns < k0 + added)
  return b + jnp.where(place, q[:, source], jnp.zeros((), dtype))


def _check_grow_args(basis: Any, matrix: Any, threshold: Any, *, where: str) -> None:
  _check_matrix(matrix, where=where)
  check_threshold(threshold, where=where)
  _check_basis_dim(basis, matrix.shape[0], where=where)
  check_orthonormal(basis, where=where)


def grow_basis_padded(basis: Optional[Array], matrix: Array, threshold: Any, *,
                      width: Optional[int] = None) -> Array:
  """GPM's memory update, fixed-shape and jittable: adds the residual directions needed.

  With B the current basis and R the new task's representation (Saha et al. 2021, Sec. 4):
    1. R̂ = R - B Bᵀ R, the part of R outside span(B) (Eq. 8);
    2. with R̂ = Û diag(ŝ) V̂ᵀ, the smallest r with
       ``||B Bᵀ R||_F² + sum_{i<r} ŝ_i² >= threshold * ||R||_F²`` (Eq. 9), capped at the
       residual's numerical rank; r = 0 when B already captures enough of R;
    3. Û[:, :r] is written into the zero columns after B's k0 nonzero ones, r capped at
       ``width - k0``.
  With ``basis=None`` this is GPM's first basis, the fewest leading left singular vectors of R
  reaching ``threshold`` of its energy (Eq. 5).

  Args:
    basis: (d, w0) basis (orthonormal-or-zero columns, nonzero first) or None.
    matrix: (d, n) float representation matrix of the new task.
    threshold: scalar in (0, 1]; may be traced.
    width: static number of columns of the result, default d; must be >= w0. The number of
      directions is capped at ``width``.

  Returns:
    (d, width) basis: the old columns unchanged, the added ones right after them, zeros beyond.

  Raises:
    ValueError: ``matrix`` not 2-D, ``basis`` of another dimension than ``matrix.shape[0]``, not
      orthonormal (when concrete), wider than ``width``, or threshold outside (0, 1].

  References:
    Saha et al., ICLR 2021, Eq. 5, Eq. 8 (projected representation) and Eq. 9 (criterion).
  """
  _check_grow_args(basis, matrix, threshold, where='the array')
  d = matrix.shape[0]
  width = d if width is None else int(width)
  if basis is None:
    basis = jnp.zeros((d, 0), _float_dtype(matrix.dtype))
  if basis.shape[1] > width:
    raise ValueError(f'basis has {basis.shape[1]} columns, more than width {width}')
  return _grow_basis_padded(basis, matrix, jnp.asarray(threshold, jnp.float32), width)


def _flatten_like(treedef: Any, tree: Any, name: str, count: int) -> list:
  """One entry of ``tree`` per leaf of ``treedef``; a None subtree stands for all-None below it."""
  if tree is None:
    return [None] * count
  skeleton = jax.tree_util.tree_unflatten(treedef, list(range(count)))
  out: list = [None] * count

  def assign(entry, indices):
    positions = jax.tree_util.tree_leaves(indices)
    if entry is not None and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(indices)):
      out[positions[0]] = entry
    elif entry is not None:
      raise ValueError(f'{name} has a leaf where the tree has the subtree {indices}')

  try:
    jax.tree_util.tree_map(assign, tree, skeleton, is_leaf=lambda v: v is None)
  except (ValueError, TypeError) as e:
    raise ValueError(f'{name} does not match the structure {treedef}: {e}') from None
  return out


# --------------------------------------------------------------------------------------------
# Truncated SVD of a weight (OSFT, OPCM)
# --------------------------------------------------------------------------------------------


class SVD(NamedTuple):
  """A (truncated) singular value decomposition ``matrix ≈ u @ diag(s) @ v.T``.

  Attributes:
    u: (d, r) left singular vectors (input side of a Flax (in, out) kernel).
    s: (r,) singular values, descending.
    v: (n, r) right singular vectors as columns (output side), ready as an ``output_basis``.
  """

  u: Array
  s: Array
  v: Array


def truncated_svd(matrix: Array, rank: int) -> SVD:
  """The top-``rank`` singular triplets of a matrix; jittable (``rank`` is static).

  Args:
    matrix: (d, n) float; a weight is first viewed with `as_matrix`.
    rank: Python int in [0, min(d, n)].

  Returns:
    `SVD` with u (d, rank), s (rank,), v (n, rank), float32 or wider.

  Raises:
    ValueError: ``matrix`` not 2-D or ``rank`` out of range.

  References:
    Eckart-Young: the best rank-``rank`` approximation in Frobenius and spectral norm. Used by
    OSFT (arXiv 2504.07097, the frozen top singular subspace) and OPCM (arXiv 2501.09522).
  """
  _check_matrix(matrix, where='the array')
  m = min(matrix.shape)
  if not isinstance(rank, (int, np.integer)) or not 0 <= rank <= m:
    raise ValueError(f'rank must be an int in [0, {m}] for a {matrix.shape} matrix; got {rank!r}')
  u, s, vt = jnp.linalg.svd(matrix.astype(_float_dtype(matrix.dtype)), full_matrices=False)
  return SVD(u[:, :rank], s[:rank], vt[:rank].T)


# --------------------------------------------------------------------------------------------
# Projections
# --------------------------------------------------------------------------------------------


def _project_off_leaf(x: Array, basis: Optional[Array], output_basis: Optional[Array],
                      where: str) -> Array:
  """(I - B Bᵀ) X (I - C Cᵀ) for X the (input_dim, out) view of x."""
  if basis is None and output_basis is None:
    return x
  dim = input_dim(x.shape, where=where)
  _check_basis_dim(basis, dim, where=where, side='input')
  if output_basis is not None:
    if x.ndim < 2:
      raise ValueError(f'{where} of shape {x.shape} has no output axis for an output basis')
    _check_basis_dim(output_basis, x.shape[-1], where=where, side='output')
  dtype = _float_dtype(x.dtype)
  y = jnp.reshape(x, (dim, -1)).astype(dtype)
  if basis is not None:
    b = basis.astype(dtype)
    y = y - _matmul(b, _matmul(b.T, y))
  if output_basis is not None:
    c = output_basis.astype(dtype)
    y = y - _matmul(_matmul(y, c), c.T)
  return jnp.reshape(y, x.shape).astype(x.dtype)


def _map_projection(tree: PyTree, bases: PyTree, output_bases: PyTree) -> PyTree:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  basis_leaves = _flatten_like(treedef, bases, 'bases', len(leaves))
  output_leaves = _flatten_like(treedef, output_bases, 'output_bases', len(leaves))
  out = []
  for (path, x), b, c in zip(leaves, basis_leaves, output_leaves):
    out.append(_project_off_leaf(x, b, c, _where(path)))
  return jax.tree_util.tree_unflatten(treedef, out)


def project_off(x: PyTree, bases: PyTree, output_bases: PyTree = None) -> PyTree:
  """Removes the component in the protected subspace: ``(I - B Bᵀ) X (I - C Cᵀ)``.

  For a Dense kernel (in, out) with input basis B (in, k) this is GPM's ``g - B Bᵀ g`` (the
  update no longer changes the layer's response to inputs in span(B)). A conv kernel is viewed as
  (kh*kw*cin, cout) (`as_matrix`), so B spans im2col patches (`conv_representation`). An output
  basis C (out, k') additionally removes the output-side directions (OSFT's two-sided
  constraint, OPCM's projection away from the merged vector's top singular subspace).
  Jittable; the bases are assumed orthonormal-or-zero (see `check_orthonormal`).

  Args:
    x: an array, or a pytree of arrays (e.g. gradients).
    bases: for an array, its (input_dim, k) basis or None; for a pytree, a pytree with the same
      structure whose leaves are bases or None (None = leaf passes through).
    output_bases: None, or bases of the output axis (x.shape[-1], k') in the same arrangement.

  Returns:
    Same structure, shapes and dtypes as ``x``.

  Raises:
    ValueError: mismatched structures, or a basis whose dimension does not match its leaf (the
      message names the leaf path).

  References:
    Saha et al., ICLR 2021, Eq. 10 (gradient projection).
  """
  return _map_projection(x, bases, output_bases)


# --------------------------------------------------------------------------------------------
# Gradient projection as an optax transform
# --------------------------------------------------------------------------------------------


class ProjectionState(NamedTuple):
  """State of `project_gradients`: the bases, so a jitted step receives them as arguments.

  Attributes:
    bases: pytree with the structure of the params; (input_dim, k) bases or None per leaf.
    output_bases: the same for output-side bases, or None.
  """

  bases: PyTree
  output_bases: PyTree


def _select_bases(params: PyTree, bases: PyTree, output_bases: PyTree,
                  include: Optional[str]) -> ProjectionState:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  flags = (None if include is None else
           jax.tree.leaves(tree_lib.select(params, include, name='include')))
  basis_leaves = _flatten_like(treedef, bases, 'bases', len(leaves))
  output_leaves = _flatten_like(treedef, output_bases, 'output_bases', len(leaves))
  kept, kept_out = [], []
  for i, ((path, p), b, c) in enumerate(zip(leaves, basis_leaves, output_leaves)):
    if flags is not None and not flags[i]:
      b = c = None
    where = _where(path)
    if b is not None:
      _check_basis_dim(b, input_dim(p.shape, where=where), where=where, side='input')
      check_orthonormal(b, where=where)
    if c is not None:
      if p.ndim < 2:
        raise ValueError(f'{where} of shape {p.shape} has no output axis for an output basis')
      _check_basis_dim(c, p.shape[-1], where=where, side='output')
      check_orthonormal(c, where=where)
    kept.append(b)
    kept_out.append(c)
  kept_output_bases = None
  if output_bases is not None:
    kept_output_bases = jax.tree_util.tree_unflatten(treedef, kept_out)
  return ProjectionState(bases=jax.tree_util.tree_unflatten(treedef, kept),
                         output_bases=kept_output_bases)


def project_gradients(bases: PyTree, *, output_bases: PyTree = None,
                      include: Optional[str] = None) -> optax.GradientTransformation:
  """Projects updates off stored bases (GPM's gradient projection), as an optax transform.

  Chain it before the optimizer: ``optax.chain(project_gradients(bases), optax.sgd(lr))``. The
  bases are validated against the params and stored in the transform's state by ``init``, so a
  jitted train step receives them as traced arguments (not compile-time constants) and a new
  task's bases need no recompilation when their shapes are unchanged (padded bases). To swap a
  new task's bases into a live optimizer state (keeping e.g. Adam's moments), use
  ``optax.tree.set(opt_state, bases=new_bases)``; that skips the validation ``init`` does.

  Cost per step: about 4 d k out flops per protected (d, out) kernel for a (d, k) basis, so compact
  or bucket-padded bases are cheaper than fully padded (d, d) ones.

  Args:
    bases: pytree with the structure of the params: per leaf an (input_dim, k) basis (see
      `project_off`; padded bases welcome) or None (the leaf passes through).
    output_bases: optional pytree of output-side bases (out, k'), same arrangement.
    include: optional regex; only leaves whose '/'-joined path (e.g. 'params/Dense_0/kernel')
      fully matches it are projected, the others pass through even if they have a basis
      (big_vision style, e.g. '.*/kernel' leaves biases alone).

  Returns:
    `optax.GradientTransformation` with state `ProjectionState`.

  Raises:
    ValueError: at construction, an invalid regex; at ``init``, bases not matching the params'
      structure, a basis whose dimension does not match its leaf or that is not orthonormal, or an
      ``include`` regex matching no parameter (messages name the leaf path or the regex).

  References:
    Saha et al., ICLR 2021, Eq. 10; Nayak et al., arXiv 2504.07097 (two-sided, with output_bases).
  """
  tree_lib.compile_patterns(include, name='include')  # An invalid regex fails here.

  def init_fn(params):
    return _select_bases(params, bases, output_bases, include)

  def update_fn(updates, state, params=None):
    del params
    return project_off(updates, state.bases, state.output_bases), state

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Representation matrices (GPM Sec. 4): Dense inputs, conv patches (im2col)
# --------------------------------------------------------------------------------------------


def dense_representation(inputs: Array) -> Array:
  """GPM's representation matrix of a Dense layer: its inputs as columns.

  Args:
    inputs: (..., d) inputs of the layer (a batch, or a batch of sequences).

  Returns:
    (d, prod(leading axes)) matrix; a basis of its column space lives on the input side of the
    (d, out) kernel.

  References:
    Saha et al., ICLR 2021, Sec. 4 (R = [x_1, ..., x_n]).
  """
  return jnp.reshape(inputs, (-1, inputs.shape[-1])).T


_SPATIAL = {1: 'W', 2: 'HW', 3: 'DHW'}


def _tuple(value: Union[int, Sequence[int]], n: int, name: str) -> tuple:
  if isinstance(value, (int, np.integer)):
    return (int(value),) * n
  value = tuple(int(v) for v in value)
  if len(value) != n:
    raise ValueError(f'{name} must have {n} entries; got {value}')
  return value


def conv_patches(x: Array, kernel_size: Sequence[int], *, strides: Union[int, Sequence[int]] = 1,
                 padding: Union[str, int, Sequence[tuple]] = 'SAME',
                 kernel_dilation: Union[int, Sequence[int]] = 1) -> Array:
  """im2col: the input patch each output position of a conv sees, in kernel-row order.

  Features are ordered as the rows of ``kernel.reshape(-1, cout)`` for a Flax kernel
  (*kernel_size, cin, cout), so ``conv(x, kernel) == conv_patches(x, ...) @ as_matrix(kernel)``.
  The arguments mirror `flax.linen.Conv`'s. Jittable.

  Args:
    x: (N, *spatial, cin) float, channels last; 1 to 3 spatial axes.
    kernel_size: the kernel's spatial shape, e.g. (3, 3).
    strides: int or one per spatial axis.
    padding: 'SAME', 'VALID', an int, or one (low, high) pair per spatial axis.
    kernel_dilation: int or one per spatial axis.

  Returns:
    (N, *out_spatial, prod(kernel_size) * cin), same dtype as ``x``.

  Raises:
    ValueError: ``x.ndim`` does not match ``kernel_size``, or malformed strides/padding.

  References:
    Saha et al., ICLR 2021, Sec. 4 (conv layers: representation of input patches).
  """
  kernel_size = tuple(int(k) for k in kernel_size)
  n = len(kernel_size)
  if n not in _SPATIAL or x.ndim != n + 2:
    raise ValueError(f'x of shape {x.shape} does not fit kernel_size {kernel_size}: expected '
                     f'(N, {n} spatial axes, C) with 1 to 3 spatial axes')
  if isinstance(padding, str):
    pad = padding.upper()
  elif isinstance(padding, (int, np.integer)):
    pad = [(int(padding), int(padding))] * n
  else:
    pad = [tuple(int(v) for v in p) for p in padding]
    if len(pad) != n or any(len(p) != 2 for p in pad):
      raise ValueError(f'padding must be a string, an int or {n} (low, high) pairs; got {padding}')
  spatial = _SPATIAL[n]
  lhs = 'N' + spatial + 'C'
  patches = jax.lax.conv_general_dilated_patches(
      x, kernel_size, _tuple(strides, n, 'strides'), pad,
      rhs_dilation=_tuple(kernel_dilation, n, 'kernel_dilation'),
      dimension_numbers=(lhs, spatial + 'IO', lhs), precision=_HIGHEST)
  # lax orders the features channel-major (cin, *kernel_size); Flax kernels are (*kernel_size, cin).
  cin = x.shape[-1]
  lead = patches.shape[:-1]
  patches = jnp.reshape(patches, lead + (cin, math.prod(kernel_size)))
  patches = jnp.swapaxes(patches, -1, -2)
  return jnp.reshape(patches, lead + (math.prod(kernel_size) * cin,)).astype(x.dtype)


def conv_representation(x: Array, kernel_size: Sequence[int], **conv_kwargs) -> Array:
  """GPM's representation matrix of a conv layer: every input patch as a column.

  Args:
    x: (N, *spatial, cin) inputs of the conv layer.
    kernel_size: the kernel's spatial shape.
    **conv_kwargs: strides, padding, kernel_dilation as in `conv_patches`.

  Returns:
    (prod(kernel_size) * cin, N * prod(out_spatial)) matrix; a basis of its column space lives
    on the input side of the (*kernel_size, cin, cout) kernel.

  References:
    Saha et al., ICLR 2021, Sec. 4 and Fig. 1(b).
  """
  patches = conv_patches(x, kernel_size, **conv_kwargs)
  return jnp.reshape(patches, (-1, patches.shape[-1])).T


# --------------------------------------------------------------------------------------------
# Frequent Directions sketch (Liberty 2013; used by CoSO)
# --------------------------------------------------------------------------------------------


class FrequentDirectionsState(NamedTuple):
  """A Frequent-Directions sketch of the rows seen so far.

  Attributes:
    sketch: (ell, d) float32 B with ``BᵀB ≈ AᵀA`` for A the stacked rows; its column space
      (``sketch.T`` as a representation matrix) approximates A's row space, e.g.
      ``grow_basis_padded(basis, state.sketch.T, threshold)`` (CoSO).
    shrinkage: () float32, the total shrinkage Σδ; ``0 ⪯ AᵀA - BᵀB ⪯ shrinkage · I`` and
      ``shrinkage <= ||A - A_k||_F² / (ell - k)`` for every k < ell.
  """

  sketch: Array
  shrinkage: Array


def frequent_directions_init(dim: int, *, ell: int, dtype: Any = jnp.float32
                             ) -> FrequentDirectionsState:
  """An empty (all-zero) sketch of ``ell`` rows of dimension ``dim``.

  Raises:
    ValueError: ``dim`` or ``ell`` is not a positive int.

  References:
    Liberty, KDD 2013, Algorithm 1.
  """
  for name, value in (('dim', dim), ('ell', ell)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be a positive int; got {value!r}')
  return FrequentDirectionsState(jnp.zeros((ell, dim), dtype), jnp.zeros((), jnp.float32))


@jax.jit
def _fd_update(sketch: Array, shrinkage: Array, rows: Array) -> FrequentDirectionsState:
  ell = sketch.shape[0]
  dtype = _float_dtype(sketch.dtype)
  stacked = jnp.concatenate([sketch.astype(dtype), rows.astype(dtype)], axis=0)
  _, s, vt = jnp.linalg.svd(stacked, full_matrices=False)       # s: (m,), m = min(ell + b, d)
  m = s.shape[0]
  sq = jnp.square(s)
  delta = sq[ell] if m > ell else jnp.zeros((), dtype)
  keep = min(m, ell)
  new = jnp.sqrt(jnp.maximum(sq[:keep] - delta, 0.0))[:, None] * vt[:keep]
  new = jnp.pad(new, ((0, ell - keep), (0, 0)))
  return FrequentDirectionsState(new.astype(sketch.dtype),
                                 shrinkage + delta.astype(shrinkage.dtype))


def frequent_directions_update(state: FrequentDirectionsState, rows: Array
                               ) -> FrequentDirectionsState:
  """Adds rows to the sketch: SVD of [B; rows], shrink every squared singular value by the
  (ell+1)-th, keep the top ell. Jittable, fixed shapes.

  This is the batched form of Frequent Directions with shrinkage by σ²_{ell+1} (Ghashami et al.
  2016, Sec. 3); each update removes δ from at most ell directions and discards the rest, so
  ``AᵀA - BᵀB`` stays PSD with spectral norm at most Σδ, and
  ``ell · Σδ <= ||A||_F² - ||B||_F²``.

  Args:
    state: from `frequent_directions_init` or a previous update.
    rows: (b, d) float rows to add (or one (d,) row).

  Returns:
    The updated `FrequentDirectionsState`.

  Raises:
    ValueError: ``rows`` do not have the sketch's dimension d.

  References:
    Liberty, KDD 2013, Algorithm 2 and Theorem 1.2; Ghashami et al., SIAM J. Comput. 2016,
    Theorem 1.1; CoSO, arXiv 2505.11816 (sketching a task's gradient directions).
  """
  rows = jnp.atleast_2d(rows)
  d = state.sketch.shape[1]
  if rows.ndim != 2 or rows.shape[1] != d:
    raise ValueError(f'rows must be (b, {d}) to match the sketch; got {rows.shape}')
  return _fd_update(state.sketch, state.shrinkage, rows)
