"""Gradient-projection continual training: gpm, osft and coso.

Each constructor takes keyword-only hyperparameters, validates them (a bad value raises a
ValueError naming it as ``<method>.<key>``, its config key) and returns a
`cljax.methods.base.Method` whose ``gradient_transform`` projects the gradients of the protected
weights before the optimizer (GPM, by default, projects its Dense kernels' gradients earlier,
inside their backward pass; see below). The SVD machinery is `cljax.subspace`.

**Protected weights.** A regex over the '/'-joined parameter paths (``layers``, default
``'.*kernel'``: every Dense and conv kernel, biases left alone) selects the weights; each is viewed
as its (input_dim, out) matrix (`cljax.subspace.as_matrix`: a Dense kernel (in, out) as is, a conv
kernel (kh, kw, cin, cout) as (kh*kw*cin, cout), the im2col layout). A regex that matches nothing,
or that selects a leaf without an input and an output axis, raises a ValueError naming it.

**Fixed-shape state.** The method state must keep one structure across tasks (see
`cljax.methods.base`), so each protected weight keeps its basis padded with zero columns to a fixed
width (the input dimension d, or ``max_rank``) next to its rank k (int32). The projection inside
the jitted step must then not pay for the zero columns: `project_off_input` slices the basis to the
smallest of a few static widths (about sqrt(2) apart) that holds the k directions, chosen with
`jax.lax.switch` from the traced rank. The result is exact (the dropped columns are zero), one
compiled program serves every task, and the cost is O(d * k_bucket * out) instead of
O(d * d * out).

**Layer inputs of a Flax model.** GPM needs each protected layer's inputs on a sample of the
task's data. The Method contract only passes ``apply_fn(params, x)``; for Flax Linen models (the
bundled ones included) `layer_representations` runs ``apply_fn`` inside
`flax.linen.intercept_methods` (the mechanism behind ``capture_intermediates``) and records the
input of every ``nn.Dense`` and ``nn.Conv`` call, so no model is rewritten. Other frameworks pass
``representation_fn``.

**Projection inside the backward pass (GPM).** A Dense kernel's projected gradient
(I - M Mᵀ) Xᵀ dY needs O(d * k * out) multiply-adds when the (d, out) gradient is projected,
O(batch * d * k) when the batch's inputs X are: GPM's ``intercept`` hook intercepts the
``nn.Dense`` calls of the training forward pass and computes that gradient in the layer's own
backward pass (`input_projected_dot`), on the cheaper side. A layer that reads the model's input
gets it projected once per example before the task (`preprojected_dot`). Same gradients, fewer
operations: 1.2x a plain step at batch 10 on the PMNIST MLP instead of 6x.

**Optimizers.** The projection is a linear map of the gradient, so SGD, with or without momentum
(the optimizer state is fresh at every task), keeps every update in the allowed subspace. An
adaptive optimizer chained after it (Adam) rescales coordinates and does not: its updates leave
the subspace, and the protection of old tasks is then approximate. The papers' protocols use SGD
(GPM) or run Adam inside the subspace's own coordinates (CoSO; see `coso`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import checks
from cljax import core
from cljax import subspace
from cljax import tree as tree_lib
from cljax.methods import base

Params = Any
PROJECTED_INPUTS = 'projected_inputs'  # `Batch.aux` key of GPM's once-per-task projected inputs.
RepresentationFn = Callable[[Params, Any], Mapping[str, jax.Array]]

_HIGHEST = jax.lax.Precision.HIGHEST
_matmul = functools.partial(jnp.matmul, precision=_HIGHEST)


# ------------------------------------------------------------------------ protected layers


class Layer(NamedTuple):
  """A protected weight: its index among the flattened leaves, path and matrix shape.

  Attributes:
    index: position in ``jax.tree_util.tree_flatten(params)``.
    path: '/'-joined path, e.g. ``'dense0/kernel'``.
    dim: input-side dimension d = prod(shape[:-1]).
    out: output dimension shape[-1].
  """

  index: int
  path: str
  dim: int
  out: int


def protected_layers(params: Params, pattern: str, *, name: str) -> tuple[Layer, ...]:
  """The weights whose '/'-joined path fully matches ``pattern``, in flattening order.

  Works on traced or abstract params too (only paths and shapes are read).

  Args:
    params: parameter pytree (or gradients, or shape structs of the same structure).
    pattern: regex over path names, e.g. ``'.*kernel'``.
    name: the hyperparameter to name in errors, e.g. ``'gpm.layers'``.

  Returns:
    One `Layer` per selected leaf.

  Raises:
    ValueError: ``pattern`` is not a regex, matches no parameter, or selects a leaf with fewer
      than 2 axes (a bias has no input side to project); the message names the leaf path.
  """
  regex = tree_lib.compile_patterns(pattern, name=name)[0]
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  layers = []
  for index, (path, leaf) in enumerate(leaves):
    path_name = tree_lib.path_str(path)
    if regex.fullmatch(path_name) is None:
      continue
    shape = tuple(np.shape(leaf))
    if len(shape) < 2:
      raise ValueError(f'{name}={pattern!r} selects {path_name} of shape {shape}: only weights '
                       'with an input and an output axis (Dense or conv kernels) can be '
                       "protected; narrow the regex, e.g. '.*kernel'")
    layers.append(Layer(index, path_name, math.prod(shape[:-1]), shape[-1]))
  if not layers:
    paths = [tree_lib.path_str(p) for p, _ in leaves]
    raise ValueError(f'{name}={pattern!r} matches no parameter; the parameters are {paths}')
  return tuple(layers)


def _as_matrix(x: jax.Array, layer: Layer) -> jax.Array:
  return jnp.reshape(x, (layer.dim, layer.out)).astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_width(basis: Any, dim: int, layer: Layer, what: str) -> None:
  if basis.ndim != 2 or basis.shape[0] != dim:
    raise ValueError(f'{what} basis for {layer.path} has shape {basis.shape}, but the layer\'s '
                     f'{what} dimension is {dim}; the method state does not belong to these params')


def _map_layers(updates: Params, layers: Sequence[Layer], fn: Callable[[int, jax.Array], jax.Array],
                others: Optional[Callable[[jax.Array], jax.Array]] = None) -> Params:
  """Applies ``fn(i, g)`` to the i-th protected leaf's (d, out) matrix, ``others`` to the rest."""
  leaves, treedef = jax.tree_util.tree_flatten(updates)
  out = list(leaves) if others is None else [others(g) for g in leaves]
  for i, layer in enumerate(layers):
    g = leaves[layer.index]
    out[layer.index] = jnp.reshape(fn(i, _as_matrix(g, layer)), g.shape).astype(g.dtype)
  return jax.tree_util.tree_unflatten(treedef, out)


# ------------------------------------------------------------------ rank-bucketed projection


def bucket_widths(width: int) -> tuple[int, ...]:
  """Static widths at which `project_off_input` evaluates a basis of ``width`` columns.

  Multiples of 16 about sqrt(2) apart (16, 32, 48, 64, 96, 128, 192, 256, 368, 512, ...), below
  ``width``, then ``width``: a rank k is projected at most ~1.5x wider than k (or 16).
  """
  widths = set()
  i = 0
  while True:
    w = 16 * math.ceil(2 ** (i / 2))
    if w >= width:
      break
    widths.add(w)
    i += 1
  return tuple(sorted(widths)) + (int(width),)


def project_off_input(g: jax.Array, basis: jax.Array, rank: Any) -> jax.Array:
  """``g - B Bᵀ g`` for a padded basis whose first ``rank`` columns are its directions.

  Only the leading columns are multiplied: `jax.lax.switch` picks the smallest static width of
  `bucket_widths` that is >= rank (rank 0 returns g unchanged). Exact when the columns from
  ``rank`` on are zero (the padded-basis convention of `cljax.subspace`). Jittable; ``rank`` may
  be traced.

  Args:
    g: (d, n) float matrix, e.g. a kernel's gradient viewed as (input_dim, out).
    basis: (d, w) float, orthonormal leading columns, zero beyond ``rank``.
    rank: int scalar in [0, w].

  Returns:
    (d, n), the dtype of ``g``.

  References:
    Saha et al., ICLR 2021, Eq. 10 (the gradient projection).
  """
  widths = bucket_widths(basis.shape[1])

  def narrow(w):
    def off(operands):
      x, b = operands
      b = b[:, :w].astype(x.dtype)
      return x - _matmul(b, _matmul(b.T, x))
    return off

  branches = [lambda operands: operands[0]] + [narrow(w) for w in widths]
  rank = jnp.asarray(rank, jnp.int32)
  index = 1 + jnp.searchsorted(jnp.asarray(widths, jnp.int32), rank, side='left')
  index = jnp.where(rank <= 0, 0, jnp.minimum(index, len(widths)))
  return jax.lax.switch(index, branches, (g, basis))


def project_off_output(g: jax.Array, basis: jax.Array, rank: Any) -> jax.Array:
  """``g - g C Cᵀ`` for an output-side padded basis C (n, w) of rank ``rank``; see
  `project_off_input`."""
  return project_off_input(g.T, basis, rank).T


# ------------------------------------------- projection inside a Dense layer's backward pass


def _dense_dot(x: jax.Array, kernel: jax.Array, precision: Any) -> jax.Array:
  """``x @ kernel`` over x's last axis, computed in x's dtype (flax's promoted dtype)."""
  return jax.lax.dot_general(x, kernel.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())),
                             precision=precision)


def _dot(a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
  return jax.lax.dot_general(a, b.astype(a.dtype), (((1,), (0,)), ((), ())), precision=precision)


def _input_grad(dy: jax.Array, kernel: jax.Array, precision: Any, dtype: Any) -> jax.Array:
  """dL/dX = dY Wᵀ, as the unprojected layer's."""
  dx = jax.lax.dot_general(dy, kernel.astype(dy.dtype), (((dy.ndim - 1,), (1,)), ((), ())),
                           precision=precision)
  return dx.astype(dtype)


def _projected_kernel_grad(x2: jax.Array, dy2: jax.Array, basis: jax.Array, rank: Any,
                           precision: Any) -> jax.Array:
  """(I - M Mᵀ) X2ᵀ dY2 in float32 (or wider), on the cheaper side of the product.

  With n = rows of X2 no more than out, from the projected inputs: O(n * d * k); otherwise by
  projecting the (d, out) gradient, O(d * k * out), as `project_gradients` does. The projection
  and the product after it are taken at full float32 precision: a bf16 or TF32 rounding of the
  projected inputs would put part of the update back inside span(M).
  """
  dtype = jnp.promote_types(x2.dtype, jnp.float32)
  xt, dy2 = x2.T.astype(dtype), dy2.astype(dtype)
  if x2.shape[0] <= dy2.shape[1]:  # Static shapes: the cheaper side is known at trace time.
    return _dot(project_off_input(xt, basis, rank), dy2, _HIGHEST)
  return project_off_input(_dot(xt, dy2, precision), basis, rank)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def input_projected_dot(x: jax.Array, kernel: jax.Array, basis: jax.Array, rank: Any,
                        precision: Any = None) -> jax.Array:
  """``x @ kernel`` whose kernel gradient is projected off a basis of its input space.

  Forward: y = X W, as `flax.linen.Dense`. Backward: dL/dX = dY Wᵀ as usual, and
  dL/dW = (I - M Mᵀ) Xᵀ dY, exactly GPM's projected gradient (Saha et al. 2021, Eq. 10) of this
  call, evaluated on the cheaper side: with n = rows of X (the batch) no more than ``out``, as
  (X - X M Mᵀ)ᵀ dY from the projected (n, d) inputs, O(n * d * k) multiply-adds; otherwise by
  projecting the (d, out) gradient, O(d * k * out) (k the rank, bucketed as in
  `project_off_input`). For GPM's MLP at batch 10 the first is 10x fewer. A layer called several
  times gets the projection of each call's contribution, whose sum is the projection of the sum.

  Args:
    x: (..., d) float inputs, in the layer's compute dtype.
    kernel: (d, out) float parameter, in its own dtype: it is cast to x's dtype for the product,
      and its gradient is the float32 projection cast to the parameter's dtype (a float32
      kernel of a bf16 layer gets an exactly projected gradient, as with 'gradients').
    basis: (d, w) float32, orthonormal leading columns, zero beyond ``rank``.
    rank: int scalar in [0, w] (may be traced).
    precision: `jax.lax.dot_general` precision of the layer (static).

  Returns:
    (..., out), the dtype of ``x @ kernel``.
  """
  del basis, rank
  return _dense_dot(x, kernel, precision)


def _input_projected_fwd(x, kernel, basis, rank, precision):
  return _dense_dot(x, kernel, precision), (x, kernel, basis, rank)


def _input_projected_bwd(precision, residuals, dy):
  x, kernel, basis, rank = residuals
  dkernel = _projected_kernel_grad(jnp.reshape(x, (-1, x.shape[-1])),
                                   jnp.reshape(dy, (-1, dy.shape[-1])), basis, rank, precision)
  return (_input_grad(dy, kernel, precision, x.dtype), dkernel.astype(kernel.dtype), None, None)


input_projected_dot.defvjp(_input_projected_fwd, _input_projected_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def preprojected_dot(x: jax.Array, kernel: jax.Array, projected_x: jax.Array, valid: jax.Array,
                     basis: jax.Array, rank: Any, precision: Any = None) -> jax.Array:
  """`input_projected_dot` with the inputs' projection computed beforehand.

  For a layer that reads the model's input, fixed during a task, GPM's projected gradient
  (X - X M Mᵀ)ᵀ dY can use inputs projected once per example before the task (`project_rows`);
  the step then costs what an unprojected one does. ``valid`` guards the pairing: where it is
  False (``x`` is not the input ``projected_x`` was computed from), the backward pass computes
  the projection itself, as `input_projected_dot` does, so the gradient is right either way.

  Args:
    x: (..., d) float inputs.
    kernel: (d, out) float.
    projected_x: ``x - x M Mᵀ`` computed beforehand, float32, reshapeable to (n, d).
    valid: bool scalar, True when ``projected_x`` belongs to these ``x``.
    basis, rank, precision: as in `input_projected_dot`.

  Returns:
    (..., out).
  """
  del projected_x, valid, basis, rank
  return _dense_dot(x, kernel, precision)


def _preprojected_fwd(x, kernel, projected_x, valid, basis, rank, precision):
  return _dense_dot(x, kernel, precision), (x, kernel, projected_x, valid, basis, rank)


def _preprojected_bwd(precision, residuals, dy):
  x, kernel, projected_x, valid, basis, rank = residuals
  x2, dy2 = jnp.reshape(x, (-1, x.shape[-1])), jnp.reshape(dy, (-1, dy.shape[-1]))
  stored = lambda: _dot(jnp.reshape(projected_x, x2.shape).T.astype(jnp.float32),
                        dy2.astype(jnp.float32), _HIGHEST)
  computed = lambda: _projected_kernel_grad(x2, dy2, basis, rank, precision).astype(jnp.float32)
  dkernel = jax.lax.cond(valid, stored, computed)
  return (_input_grad(dy, kernel, precision, x.dtype), dkernel.astype(kernel.dtype), None, None,
          None, None)


preprojected_dot.defvjp(_preprojected_fwd, _preprojected_bwd)


@jax.jit
def _project_rows_chunk(x: jax.Array, basis: jax.Array, rank: jax.Array) -> jax.Array:
  return project_off_input(x.T, basis, rank).T


def project_rows(x: np.ndarray, basis: jax.Array, rank: Any, *, chunk: int = 4096) -> np.ndarray:
  """Rows projected off a basis, ``x - x M Mᵀ``, computed on the device in chunks.

  Args:
    x: (N, d) host rows (cast to float32).
    basis: (d, w) padded basis, orthonormal leading columns, zero beyond ``rank``.
    rank: int, its number of directions.
    chunk: rows per device call (bounds device memory).

  Returns:
    (N, d) float32 host array.
  """
  x = np.asarray(x, np.float32)
  parts = [np.asarray(_project_rows_chunk(jnp.asarray(x[i:i + chunk]), basis, jnp.int32(rank)))
           for i in range(0, len(x), chunk)]
  return np.concatenate(parts) if parts else np.zeros_like(x)


def _is_plain_dense(module: nn.Module) -> bool:
  """An `nn.Dense` (or a subclass keeping its ``__call__``) with the default dot_general."""
  return (isinstance(module, nn.Dense) and type(module).__call__ is nn.Dense.__call__
          and getattr(module, 'dot_general', None) is None
          and getattr(module, 'dot_general_cls', None) is None)


def _projected_dense_call(module: nn.Dense, inputs: jax.Array, basis: jax.Array, rank: Any,
                          projected: Optional[jax.Array], model_input: jax.Array,
                          path: str) -> jax.Array:
  """`nn.Dense.__call__` (flax 0.12) with `input_projected_dot` for its matmul, or
  `preprojected_dot` when ``projected`` (the model input, projected) is given."""
  kernel = module.get_variable('params', 'kernel')
  bias = module.get_variable('params', 'bias') if module.use_bias else None
  promote = getattr(module, 'promote_dtype', nn.dtypes.promote_dtype)
  # The kernel enters the custom matmul as the parameter (cast inside), so that its gradient is
  # projected in float32 and not rounded to a bf16 compute dtype after the projection.
  inputs, _, bias = promote(inputs, kernel, bias, dtype=module.dtype)
  if projected is None or math.prod(model_input.shape) != math.prod(inputs.shape):
    y = input_projected_dot(inputs, kernel, basis, rank, module.precision)
  elif math.prod(projected.shape) != math.prod(inputs.shape):
    raise ValueError(f"Batch.aux['projected_inputs'][{path!r}] has shape"
                     f' {projected.shape} but the '
                     f'layer\'s inputs are {inputs.shape}')
  else:
    # Checked at run time, cheaply: the layer's inputs are the model input itself.
    raw = jnp.reshape(model_input, inputs.shape).astype(inputs.dtype)
    valid = jnp.array_equal(inputs, raw)
    y = preprojected_dot(inputs, kernel, projected, valid, basis, rank, module.precision)
  if bias is not None:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


def input_projected_apply(apply_fn: core.ApplyFn, bases: Sequence[jax.Array], ranks: jax.Array,
                          layers: Sequence['Layer'], *, name: str,
                          projected_inputs: Optional[Mapping[str, jax.Array]] = None
                          ) -> core.ApplyFn:
  """``apply_fn`` whose protected Dense kernels get GPM-projected gradients.

  Runs ``apply_fn`` inside `flax.linen.intercept_methods`; each ``nn.Dense`` call whose kernel's
  path (its module path + '/kernel') is that of the i-th layer computes its matmul with
  `input_projected_dot` against ``bases[i]`` / ``ranks[i]``. The outputs are unchanged; the
  gradient of any loss of them with respect to those kernels is GPM's projected gradient, and
  other parameters' gradients are unchanged. A kernel must be used only by its Dense layer: a
  use outside it (weight tying) would add an unprojected gradient.

  Args:
    apply_fn: applies a Flax Linen model, ``(params, x, **kwargs) -> outputs``, with ``params``
      the 'params' collection (paths as `protected_layers` names them).
    bases: per layer, its (d, w) padded basis.
    ranks: (L,) int32.
    layers: the protected layers to project this way (2-D kernels), in ``bases`` order.
    name: the method, for errors (e.g. ``'gpm'``).
    projected_inputs: ``{layer path: the model input x projected off its basis}`` for layers
      that read x itself, for the calls on that x (`preprojected_dot`; see
      ``Batch.aux['projected_inputs']``). Whether a layer's inputs equal x is checked at run time.

  Returns:
    ``apply(params, x, **kwargs)``; it raises ValueError while tracing if one of ``layers`` was
    not called as a plain ``nn.Dense`` (named by path).
  """
  index = {layer.path: i for i, layer in enumerate(layers)}

  def apply(params, x, **kwargs):
    called = set()

    def interceptor(next_fun, args, kwargs_, context):
      module = context.module
      i = index.get('/'.join(module.path) + '/kernel')
      if (i is None or context.method_name != '__call__' or not _is_plain_dense(module)
          or len(args) != 1 or kwargs_):
        return next_fun(*args, **kwargs_)
      called.add(i)
      projected = (projected_inputs or {}).get(layers[i].path)
      return _projected_dense_call(module, args[0], bases[i], ranks[i], projected, x,
                                   layers[i].path)

    with nn.intercept_methods(interceptor):
      out = apply_fn(params, x, **kwargs)
    missing = [layer.path for i, layer in enumerate(layers) if i not in called]
    if missing:
      raise ValueError(f"{name}.projection='backward' projects the kernels of flax.linen.Dense "
                       f'layers in their backward pass, but {missing} were not called as a '
                       f"plain nn.Dense (default dot_general) by the model; set "
                       f"{name}.projection='gradients'")
    return out

  return apply


# ------------------------------------------------------------ layer inputs of a Linen model


def _conv_padding(module: nn.Conv, spatial: int, path: str) -> Any:
  padding = module.padding
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f'conv layer {path}: padding {padding!r} is not supported for GPM '
                       "representations (only 'SAME', 'VALID' and explicit pads); pass "
                       'representation_fn')
    return padding.upper()
  if isinstance(padding, (int, np.integer)):
    return int(padding)
  pads = [(int(p), int(p)) if isinstance(p, (int, np.integer)) else tuple(int(v) for v in p)
          for p in padding]
  if len(pads) != spatial:
    raise ValueError(f'conv layer {path}: padding {padding!r} does not have {spatial} entries')
  return pads


def _conv_matrix(module: nn.Conv, x: jax.Array, path: str) -> jax.Array:
  kernel_size = ((module.kernel_size,) if isinstance(module.kernel_size, int)
                 else tuple(module.kernel_size))
  n = len(kernel_size)
  if module.feature_group_count != 1 or (module.input_dilation not in (None, 1) and
                                         set(np.atleast_1d(module.input_dilation)) != {1}):
    raise ValueError(f'conv layer {path}: grouped or input-dilated convolutions are not supported '
                     'for GPM representations; pass representation_fn')
  x = jnp.reshape(x, (-1, *x.shape[-(n + 1):]))
  return subspace.conv_representation(
      x, kernel_size, strides=module.strides or 1, padding=_conv_padding(module, n, path),
      kernel_dilation=module.kernel_dilation or 1)


def layer_representations(apply_fn: core.ApplyFn, params: Params, x: Any) -> dict[str, jax.Array]:
  """GPM's representation matrix of every Dense and conv layer of a Flax Linen model.

  Runs ``apply_fn(params, x, train=False)`` inside `flax.linen.intercept_methods` and records the
  input of each ``nn.Dense`` / ``nn.Conv`` ``__call__``: a Dense layer's inputs (..., d) become the
  (d, n) matrix of `cljax.subspace.dense_representation`, a conv layer's inputs its im2col patches
  (`cljax.subspace.conv_representation`, with the module's kernel size, strides, padding and
  dilation). A module called several times contributes all its calls' columns. Runs eagerly, and
  ``apply_fn`` must trace the module when called (a ``jax.jit``-wrapped ``apply_fn`` whose cache is
  hit runs no Python and records nothing).

  Args:
    apply_fn: a function that applies a Linen module, e.g. `cljax.models.linen_apply_fn`.
    params: its parameters.
    x: a batch of inputs (N, ...).

  Returns:
    ``{'<module path>/kernel': (d, n) float32}``, e.g. ``{'dense0/kernel': (784, N), ...}``; the
    keys are the kernels' parameter paths when ``params`` is the module's 'params' collection.
    Empty when ``apply_fn`` does not run Linen Dense or Conv modules.

  Raises:
    ValueError: a conv layer with circular/causal padding, groups or input dilation.

  References:
    Saha et al., ICLR 2021, Sec. 4 (representation matrices of fully connected and conv layers).
  """
  calls: list[tuple[str, nn.Module, jax.Array]] = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (nn.Dense, nn.Conv)) and args:
      calls.append(('/'.join(module.path) + '/kernel', module, args[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    apply_fn(params, jnp.asarray(x), train=False)
  columns: dict[str, list[jax.Array]] = {}
  for path, module, inputs in calls:
    if isinstance(module, nn.Conv):
      matrix = _conv_matrix(module, inputs, path)
    else:
      matrix = subspace.dense_representation(inputs)
    columns.setdefault(path, []).append(matrix.astype(jnp.float32))
  return {path: jnp.concatenate(parts, axis=1) for path, parts in columns.items()}


def sample_inputs(task_data: core.Batch, num_samples: int, *, seed: int, task: int) -> np.ndarray:
  """``num_samples`` inputs of ``task_data`` drawn without replacement (all if fewer), seeded by
  (seed, task), in their original order."""
  x = np.asarray(task_data.x)
  rng = np.random.default_rng([seed, task])
  idx = rng.choice(len(x), size=min(num_samples, len(x)), replace=False)
  return x[np.sort(idx)]


def _lookup(representations: Mapping[str, jax.Array], layer: Layer, name: str) -> jax.Array:
  """The representation of ``layer`` (by exact path, else by path suffix); checks its shape."""
  matrix = representations.get(layer.path)
  if matrix is None:
    matches = [k for k in representations if layer.path.endswith('/' + k)]
    if len(matches) == 1:
      matrix = representations[matches[0]]
  if matrix is None:
    raise ValueError(f'no representation for protected layer {layer.path}: its inputs were not '
                     f'captured (captured: {sorted(representations)}). It is not a flax.linen '
                     f'Dense or Conv kernel; narrow {name}.layers or pass {name}.representation_fn')
  if getattr(matrix, 'ndim', None) != 2 or matrix.shape[0] != layer.dim:
    raise ValueError(f'representation for {layer.path} has shape {np.shape(matrix)}, but the '
                     f'layer\'s input dimension is {layer.dim}: expected ({layer.dim}, n)')
  return matrix


# ------------------------------------------------------------------------- validation


def _validate_threshold(name: str, value: Any) -> None:
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
      or not 0.0 < float(value) <= 1.0):
    raise ValueError(f'{name} must be a number in (0, 1], got {value!r}')


def _thresholds(name: str, threshold: Any) -> tuple[float, ...]:
  """A scalar threshold as a 1-tuple, or the per-layer sequence; each checked in (0, 1]."""
  values = tuple(threshold) if isinstance(threshold, (list, tuple)) else (threshold,)
  if not values:
    raise ValueError(f'{name} is empty: give one threshold, or one per protected layer')
  for v in values:
    _validate_threshold(name, v)
  return tuple(float(v) for v in values)


def _per_layer(name: str, values: tuple[float, ...], layers: Sequence[Layer]) -> tuple[float, ...]:
  if len(values) == 1:
    return values * len(layers)
  if len(values) != len(layers):
    raise ValueError(f'{name} has {len(values)} values but {len(layers)} layers are protected: '
                     f'{[l.path for l in layers]}; give one value or one per layer, in this order')
  return values


def _widths(layers: Sequence[Layer], max_rank: int) -> tuple[int, ...]:
  return tuple(l.dim if max_rank == 0 else min(l.dim, max_rank) for l in layers)


# ---------------------------------------------------------------------------------- gpm


class GPMState(NamedTuple):
  """Gradient Projection Memory, one basis per protected weight, in fixed shapes.

  Attributes:
    bases: tuple, per protected layer (in `protected_layers` order), its (d, w) float32 basis of
      the input space of earlier tasks, zero-padded (w = d, or ``max_rank``).
    ranks: (L,) int32, the number of directions of each basis.
    num_tasks: int32 scalar, tasks consolidated.
  """

  bases: tuple
  ranks: jax.Array
  num_tasks: jax.Array


_PROJECTIONS = ('backward', 'gradients')


def _dense_kernels(params: Params, layers: Sequence[Layer]) -> list[int]:
  """Indices of the protected layers with 2-D (Dense) kernels: those 'backward' mode projects
  inside their backward pass."""
  leaves = jax.tree_util.tree_leaves(params)
  return [i for i, l in enumerate(layers) if np.ndim(leaves[l.index]) == 2]


def _gpm_layers(params: Params, state: GPMState, layers_pattern: str) -> tuple[Layer, ...]:
  """The protected layers, checked against the number of bases in the state."""
  layers = protected_layers(params, layers_pattern, name='gpm.layers')
  if len(layers) != len(state.bases):
    raise ValueError(f'gpm.layers selects {len(layers)} layers {[l.path for l in layers]} but '
                     f'the state holds {len(state.bases)} bases; the method state does not '
                     'belong to these params')
  return layers


def _gpm_transform(state: GPMState, layers_pattern: str, freeze_others: bool, projection: str
                   ) -> optax.GradientTransformation:
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, opt_state, params=None):
    del params
    layers = _gpm_layers(updates, state, layers_pattern)
    for layer, b in zip(layers, state.bases):
      _check_width(b, layer.dim, layer, 'input')
    others = None
    if freeze_others:
      first = (state.num_tasks == 0)
      others = lambda g: g * first.astype(g.dtype)
    # Dense kernels in 'backward' mode were projected inside the backward pass (`_gpm_apply`).
    done = set(_dense_kernels(updates, layers)) if projection == 'backward' else set()
    fn = lambda i, g: g if i in done else project_off_input(g, state.bases[i], state.ranks[i])
    return _map_layers(updates, layers, fn, others), opt_state

  return optax.GradientTransformation(init_fn, update_fn)


def _gpm_apply(apply_fn: core.ApplyFn, state: GPMState, batch: core.Batch,
               layers_pattern: str) -> core.ApplyFn:
  """The training forward pass of GPM in 'backward' mode (see `input_projected_apply`)."""
  def apply(params, x, **kwargs):
    layers = _gpm_layers(params, state, layers_pattern)
    dense = _dense_kernels(params, layers)
    for i in dense:
      _check_width(state.bases[i], layers[i].dim, layers[i], 'input')
    projected = input_projected_apply(
        apply_fn, [state.bases[i] for i in dense], state.ranks[np.asarray(dense, np.int32)],
        [layers[i] for i in dense], name='gpm',
        # Only for the batch's own inputs (not, e.g., a replay term's other examples).
        projected_inputs=batch.aux.get(PROJECTED_INPUTS) if x is batch.x else None)
    return projected(params, x, **kwargs)
  return apply


def _gpm_intercept(params: Params, state: GPMState, batch: core.Batch, *, apply_fn: core.ApplyFn,
                   key: jax.Array, layers_pattern: str) -> tuple:
  """GPM's ``intercept``: the step differentiates the projected forward pass at ``params``."""
  del key
  return params, _gpm_apply(apply_fn, state, batch, layers_pattern)


def _input_layers(apply_fn: core.ApplyFn, params: Params, layers: Sequence[Layer],
                  x: np.ndarray) -> list[int]:
  """The layers (indices into ``layers``) whose recorded inputs are the model's inputs,
  flattened: exactly equal on the examples ``x``, from a single call. Only decides what to
  precompute: the training step checks, per batch, that a layer's inputs are the model input
  before it uses the precomputed projection (`preprojected_dot`)."""
  flat = np.asarray(x, np.float32).reshape(len(x), -1).T
  representations = layer_representations(apply_fn, params, x)
  found = []
  for i, layer in enumerate(layers):
    r = representations.get(layer.path)
    if r is not None and r.shape == flat.shape and np.array_equal(np.asarray(r), flat):
      found.append(i)
  return found


def _gpm_prepare_task(params: Params, state: GPMState, data: core.Batch, *, seen: Any,
                      apply_fn: core.ApplyFn, key: jax.Array, layers_pattern: str) -> core.Batch:
  """Projects, once for the task, the inputs of protected Dense layers that read the model's
  input (GPM's first layer): ``aux['projected_inputs']``. Other layers are left to the step."""
  del seen, key
  layers = protected_layers(params, layers_pattern, name='gpm.layers')
  dense = _dense_kernels(params, layers)
  x = np.asarray(data.x)
  if not dense or len(x) == 0:
    return data
  found = _input_layers(apply_fn, params, [layers[i] for i in dense], x[:2])
  projected = {}
  for j in found:
    i = dense[j]
    projected[layers[i].path] = project_rows(x.reshape(len(x), -1), state.bases[i], state.ranks[i])
  return data.with_aux(**{PROJECTED_INPUTS: projected}) if projected else data


def gpm(
    *,
    threshold: Union[float, Sequence[float]] = 0.97,
    threshold_increment: float = 0.0,
    layers: str = '.*kernel',
    num_samples: int = 125,
    max_rank: int = 0,
    freeze_others: bool = True,
    representation_fn: Optional[RepresentationFn] = None,
    projection: Optional[str] = None,
    seed: int = 0,
) -> base.Method:
  """Gradient Projection Memory: gradients projected off the input subspaces of earlier tasks.

  At the end of task t, for each protected weight, the representation matrix R (its layer's
  inputs on ``num_samples`` random training examples, (d, n)) grows the layer's basis M by GPM's
  rule (`cljax.subspace.grow_basis_padded`): the part of R outside span(M), R̂ = R - M Mᵀ R
  (Eq. 8), contributes its fewest leading left singular vectors with
  ``||M Mᵀ R||² + sum_{i<r} ŝ_i² >= threshold_t ||R||²`` (Eq. 9; Eq. 5 for the first task).
  While training a later task, each protected kernel's gradient G (viewed as (d, out)) becomes
  ``G - M Mᵀ G`` before the optimizer (Eq. 10; computed inside the layer's backward pass by
  default, see ``projection``), so the layer's response to inputs in span(M) does not change;
  with SGD the whole network's outputs on those inputs are then kept.

  Args:
    threshold: the energy threshold in (0, 1]: one for every layer, or one per protected layer in
      `protected_layers` order (GPM: 0.95, 0.99, 0.99 for the PMNIST MLP; 0.97 for the CIFAR
      AlexNet).
    threshold_increment: added per finished task, capped at 1: ``threshold_t = min(1, threshold +
      t * threshold_increment)`` (GPM CIFAR: 0.003).
    layers: regex over '/'-joined parameter paths selecting the protected weights (default every
      kernel; biases are not projected, and the GPM networks have none).
    num_samples: examples per task for the representation matrices (GPM: 300 for PMNIST, 125 for
      CIFAR).
    max_rank: 0 keeps each basis padded to its full input dimension d; a positive value caps the
      stored width (and the number of protected directions) at min(d, max_rank) per layer, to
      bound memory for very wide inputs.
    freeze_others: if True (default), the gradients of parameters outside ``layers`` (with the
      default regex: biases and norm scales) are zeroed after the first task, as GPM's reference
      code does for every 1-D parameter: they are not projected, so an update of them would move
      the old tasks' outputs (on the digits default stream, BWT -37.8 with False, -10.4 with
      True). False lets them train. With a narrower ``layers`` regex it freezes the unselected
      kernels too.
    representation_fn: ``(params, x) -> {param path: (d, n) matrix}`` giving each protected
      layer's representation; default `layer_representations` over the method's ``apply_fn``
      (Flax Linen models).
    projection: where the projection is computed; both give the same gradients (to float
      rounding). None (default): 'backward' for Flax Linen models, 'gradients' when
      ``representation_fn`` is given. 'backward': a protected Dense kernel's gradient is
      projected inside the backward pass (`input_projected_dot`), from its projected inputs
      (X - X M Mᵀ)ᵀ dY when the batch is no larger than the layer's outputs, O(batch * d * k)
      instead of O(d * k * out); conv kernels are projected as gradients. A Dense layer that
      reads the model's input itself (GPM's first layer) gets its inputs projected once per
      example before each task instead (``prepare_task`` -> ``Batch.aux['projected_inputs']``,
      `preprojected_dot`), at the cost of a second copy of the task's inputs in memory. Needs a
      Flax Linen model whose protected 2-D kernels belong to plain ``nn.Dense`` layers
      (otherwise the first step raises, naming them), and each kernel used by its Dense layer
      only (a tied use of it elsewhere would add an unprojected gradient). 'gradients': every
      protected gradient is projected by the optax transform before the optimizer, for any
      model.
    seed: seeds the example subsets.

  Returns:
    A `Method` with state `GPMState`.

  Raises:
    ValueError: a threshold outside (0, 1] (``gpm.threshold``), a negative increment,
      num_samples < 1, max_rank < 0, an invalid regex, an unknown projection; from ``init``, a
      regex matching nothing or
      a bias, or a per-layer threshold list of the wrong length; from ``end_task``, a layer whose
      representation is missing or of the wrong dimension (each names the layer path).

  References:
    Saha, Garg & Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021, Eq. 5, 8-10
    and Algorithm 1; the thresholds and sample sizes from its reference code.
  """
  thresholds = _thresholds('gpm.threshold', threshold)
  checks.non_negative('gpm.threshold_increment', threshold_increment)
  tree_lib.compile_patterns(layers, name='gpm.layers')
  checks.integer('gpm.num_samples', num_samples, minimum=1)
  checks.integer('gpm.max_rank', max_rank, minimum=0)
  if representation_fn is not None and not callable(representation_fn):
    raise ValueError(f'gpm.representation_fn must be callable, got {representation_fn!r}')
  if projection is None:
    projection = 'backward' if representation_fn is None else 'gradients'
  if projection not in _PROJECTIONS:
    raise ValueError(f'gpm.projection must be one of {_PROJECTIONS}, got {projection!r}')

  def init(params):
    protected = protected_layers(params, layers, name='gpm.layers')
    _per_layer('gpm.threshold', thresholds, protected)
    widths = _widths(protected, max_rank)
    bases = tuple(jnp.zeros((l.dim, w), jnp.float32) for l, w in zip(protected, widths))
    return GPMState(bases, jnp.zeros((len(protected),), jnp.int32), jnp.zeros((), jnp.int32))

  def end_task(params, state, task_data, *, apply_fn, key):
    del key  # The representation sample is seeded by (seed, task).
    t = int(state.num_tasks)
    protected = protected_layers(params, layers, name='gpm.layers')
    per_layer = _per_layer('gpm.threshold', thresholds, protected)
    rep_fn = representation_fn or functools.partial(layer_representations, apply_fn)
    representations = rep_fn(params, sample_inputs(task_data, num_samples, seed=seed, task=t))
    bases = []
    for layer, basis, thr in zip(protected, state.bases, per_layer):
      matrix = _lookup(representations, layer, 'gpm')
      _check_width(basis, layer.dim, layer, 'input')
      level = min(1.0, thr + t * threshold_increment)
      bases.append(subspace.grow_basis_padded(basis, matrix, level, width=basis.shape[1]))
    ranks = jnp.stack([subspace.basis_rank(b) for b in bases])
    return GPMState(tuple(bases), ranks, state.num_tasks + 1)

  return base.Method(
      init=init, loss=base.no_loss,
      gradient_transform=lambda s: _gpm_transform(s, layers, freeze_others, projection),
      end_task=end_task,
      intercept=(functools.partial(_gpm_intercept, layers_pattern=layers)
                 if projection == 'backward' else None),
      prepare_task=(functools.partial(_gpm_prepare_task, layers_pattern=layers)
                    if projection == 'backward' and representation_fn is None else None))


# --------------------------------------------------------------------------------- osft


class OSFTState(NamedTuple):
  """Frozen top singular subspaces of each protected weight, in fixed shapes.

  Attributes:
    input_bases: tuple, per protected layer, its (d, m) left singular vectors U_high (input side
      of the (d, out) matrix), zero beyond the rank; m = min(d, out).
    output_bases: tuple, per layer, the (out, m) right singular vectors V_high, zero beyond it.
    ranks: (L,) int32, the number k of frozen directions of each layer.
    num_tasks: int32 scalar, tasks finished.
  """

  input_bases: tuple
  output_bases: tuple
  ranks: jax.Array
  num_tasks: jax.Array


def osft_rank(layer_rank: int, num_tasks: int, *, rank_fraction: float,
              max_rank_fraction: float) -> int:
  """Frozen directions of a weight of rank ``layer_rank`` = min(d, out) after ``num_tasks`` tasks:
  ``floor(min(max_rank_fraction, num_tasks * rank_fraction) * layer_rank)``."""
  fraction = min(max_rank_fraction, num_tasks * rank_fraction)
  return int(math.floor(fraction * layer_rank + 1e-9))


def _osft_transform(state: OSFTState, layers_pattern: str) -> optax.GradientTransformation:
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, opt_state, params=None):
    del params
    layers = protected_layers(updates, layers_pattern, name='osft.layers')
    if len(layers) != len(state.input_bases):
      raise ValueError(f'osft.layers selects {len(layers)} layers but the state holds '
                       f'{len(state.input_bases)}; the method state does not belong to these '
                       'params')
    for layer, u, v in zip(layers, state.input_bases, state.output_bases):
      _check_width(u, layer.dim, layer, 'input')
      _check_width(v, layer.out, layer, 'output')

    def fn(i, g):
      g = project_off_input(g, state.input_bases[i], state.ranks[i])
      return project_off_output(g, state.output_bases[i], state.ranks[i])
    return _map_layers(updates, layers, fn), opt_state

  return optax.GradientTransformation(init_fn, update_fn)


def osft(*, rank_fraction: float = 0.1, max_rank_fraction: float = 1.0,
         layers: str = '.*kernel') -> base.Method:
  """Orthogonal subspace fine-tuning (adaptive SVD, "Sculpting Subspaces").

  After task t (t = 1, 2, ... tasks finished), each protected weight W, viewed as (d, out), is
  decomposed W = U S Vᵀ and its top k_t singular directions (U_high, V_high) are frozen, with
  k_t = floor(min(max_rank_fraction, t * rank_fraction) * min(d, out)): the preserved rank grows
  with the number of tasks (the reference scripts add a fixed fraction, 0.07, per task). The
  next task's gradient G is constrained orthogonal to them on both sides,
  ``G <- (I - U_high U_highᵀ) G (I - V_high V_highᵀ)``, so ``U_highᵀ ΔW = 0`` and
  ``ΔW V_high = 0``: the frozen singular triplets of W are kept exactly, and new learning happens
  in the low-singular-value subspace. The first task is trained unconstrained.

  Deviations: the paper and its code train the low-rank factors U_low, S_low, V_low of the
  decomposed weight (gradients of U_low and V_low projected off U_high and V_high); to first
  order that update of W is the two-sided projection used here, which projects the full weight's
  gradient instead of reparametrizing the weight. The rank is a fraction of min(d, out) (the
  matrix rank; the reference scripts use max(d, out) capped at min(d, out)). The paper's optional
  layer-importance rank allocation is not implemented.

  Args:
    rank_fraction: fraction of each weight's rank frozen per finished task, in (0, 1].
    max_rank_fraction: cap on the frozen fraction, in (0, 1] (1 can freeze a layer entirely).
    layers: regex over '/'-joined parameter paths selecting the weights (default every kernel).

  Returns:
    A `Method` with state `OSFTState`.

  Raises:
    ValueError: a fraction outside (0, 1] (named ``osft.rank_fraction`` or
      ``osft.max_rank_fraction``), an invalid regex; from ``init``, a regex matching nothing or a
      bias.

  References:
    Nayak et al., "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual
    Learning", arXiv 2504.07097 (2025), Sec. 3 (SVD of each weight, frozen high-rank subspace,
    projected updates in the orthogonal low-rank subspace).
  """
  _validate_threshold('osft.rank_fraction', rank_fraction)
  _validate_threshold('osft.max_rank_fraction', max_rank_fraction)
  tree_lib.compile_patterns(layers, name='osft.layers')

  def init(params):
    protected = protected_layers(params, layers, name='osft.layers')
    m = [min(l.dim, l.out) for l in protected]
    return OSFTState(tuple(jnp.zeros((l.dim, k), jnp.float32) for l, k in zip(protected, m)),
                     tuple(jnp.zeros((l.out, k), jnp.float32) for l, k in zip(protected, m)),
                     jnp.zeros((len(protected),), jnp.int32), jnp.zeros((), jnp.int32))

  def end_task(params, state, task_data, *, apply_fn, key):
    del task_data, apply_fn, key
    t = int(state.num_tasks) + 1
    protected = protected_layers(params, layers, name='osft.layers')
    leaves = jax.tree_util.tree_leaves(params)
    us, vs, ranks = [], [], []
    for layer in protected:
      m = min(layer.dim, layer.out)
      k = osft_rank(m, t, rank_fraction=rank_fraction, max_rank_fraction=max_rank_fraction)
      svd = subspace.truncated_svd(_as_matrix(leaves[layer.index], layer), m)
      us.append(subspace.mask_columns(svd.u, k).astype(jnp.float32))
      vs.append(subspace.mask_columns(svd.v, k).astype(jnp.float32))
      ranks.append(k)
    return OSFTState(tuple(us), tuple(vs), jnp.asarray(ranks, jnp.int32), state.num_tasks + 1)

  return base.Method(init=init, loss=base.no_loss,
                     gradient_transform=lambda s: _osft_transform(s, layers), end_task=end_task)


# --------------------------------------------------------------------------------- coso


class CoSOState(NamedTuple):
  """CoSO's method state: historical bases and this task's Frequent-Directions sketches.

  Attributes:
    bases: tuple, per protected layer, the (d, w) historical input-side basis (zero-padded).
    ranks: (L,) int32, directions in each basis.
    sketches: tuple, per layer, a `cljax.subspace.FrequentDirectionsState` with an (ell, d)
      sketch of the task's projected gradient directions.
    step: int32 scalar, training steps taken in the current task.
    num_tasks: int32 scalar, tasks finished.
  """

  bases: tuple
  ranks: jax.Array
  sketches: tuple
  step: jax.Array
  num_tasks: jax.Array


class CoSOProjectorState(NamedTuple):
  """The gradient transform's state (fresh at every task, as the optimizer's).

  Attributes:
    count: int32 scalar, steps taken in this task.
    projectors: tuple, per layer, the (d, r) current optimization subspace P (top left singular
      vectors of the projected gradient at the last refresh; zero columns for missing rank).
  """

  count: jax.Array
  projectors: tuple


def top_left_singular(g: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """The ``rank`` leading left singular vectors of (d, n) ``g`` and their singular values.

  Vectors of (numerically) zero singular values are zeroed, so that they never add a direction
  that ``g`` does not have. ``rank`` is static and at most min(d, n).

  Returns:
    ((d, rank) float, (rank,) float).
  """
  u, s, _ = jnp.linalg.svd(g, full_matrices=False)
  tol = max(g.shape) * jnp.finfo(g.dtype).eps * s[0]
  keep = s[:rank] > tol
  return jnp.where(keep, u[:, :rank], 0.0), jnp.where(keep, s[:rank], 0.0)


def _coso_ranks(layers: Sequence[Layer], proj_rank: int, sketch_rank: int):
  return ([min(proj_rank, l.dim, l.out) for l in layers], [min(sketch_rank, l.dim) for l in layers])


def _coso_transform(state: CoSOState, layers_pattern: str, proj_rank: int, sketch_rank: int,
                    update_gap: int) -> optax.GradientTransformation:
  def init_fn(params):
    protected = protected_layers(params, layers_pattern, name='coso.layers')
    ranks, _ = _coso_ranks(protected, proj_rank, sketch_rank)
    return CoSOProjectorState(jnp.zeros((), jnp.int32),
                              tuple(jnp.zeros((l.dim, r), jnp.float32)
                                    for l, r in zip(protected, ranks)))

  def update_fn(updates, opt_state, params=None):
    del params
    protected = protected_layers(updates, layers_pattern, name='coso.layers')
    if len(protected) != len(state.bases):
      raise ValueError(f'coso.layers selects {len(protected)} layers but the state holds '
                       f'{len(state.bases)}; the method state does not belong to these params')
    refresh = opt_state.count % update_gap == 0
    ranks, _ = _coso_ranks(protected, proj_rank, sketch_rank)
    projectors = list(opt_state.projectors)

    def fn(i, g):
      _check_width(state.bases[i], protected[i].dim, protected[i], 'input')
      g = project_off_input(g, state.bases[i], state.ranks[i])               # off the history
      p = jax.lax.cond(refresh, lambda: top_left_singular(g, ranks[i])[0].astype(g.dtype),
                       lambda: opt_state.projectors[i].astype(g.dtype))
      projectors[i] = p.astype(jnp.float32)
      return _matmul(p, _matmul(p.T, g))                                      # step in span(P)

    updates = _map_layers(updates, protected, fn)
    return updates, CoSOProjectorState(opt_state.count + 1, tuple(projectors))

  return optax.GradientTransformation(init_fn, update_fn)


def coso(
    *,
    proj_rank: int = 8,
    sketch_rank: int = 16,
    update_gap: int = 50,
    threshold: float = 0.97,
    layers: str = '.*kernel',
) -> base.Method:
  """Continuous Subspace Optimization: steps in a sequence of gradient subspaces orthogonal to
  the earlier tasks' subspace.

  For each protected weight, with H the historical (input-side) basis and G the gradient viewed
  as (d, out):

    1. G' = G - H Hᵀ G, the gradient projected off the historical task subspace;
    2. every ``update_gap`` steps (and at a task's first step) the optimization subspace is
       refreshed: P = the top ``proj_rank`` left singular vectors of G'. The step is taken in it:
       the update is P Pᵀ G' (then the optimizer);
    3. at those same steps the task's Frequent-Directions sketch (``sketch_rank`` rows) absorbs
       the top ``sketch_rank`` directions of G' scaled by their singular values (U_r S_r);
    4. at the task's end the sketch's leading directions reaching ``threshold`` of its energy are
       appended to H (`cljax.subspace.grow_basis_padded` on the sketch), and the sketch is reset.

  The transform's state (P and a step count) lives in the optax state, re-initialised at every
  task as CoSO resets its projector; the sketch lives in the method state and is updated by the
  ``update`` hook from the step's task gradient (recomputing G' and its SVD at refresh steps).
  Cost: every step projects each gradient off H twice (transform and hook, rank-bucketed as in
  `gpm`); every refresh adds two thin SVDs of each (d, out) gradient and one of the (2 ell, d)
  stacked sketch, so ``update_gap`` trades the subspace's freshness against time (a (784, 100)
  SVD costs tens of milliseconds on a CPU, a batch-10 step of the PMNIST MLP ~0.1 ms).

  Deviations from the reference implementation: (a) CoSO runs Adam on the low-rank coordinates
  Pᵀ G' and maps the result back with P; here the projected gradient P Pᵀ G' is handed to the
  configured optax optimizer. With SGD (momentum included) the two coincide; with Adam the
  moments are full-size and the update is not confined to span(P). (b) The historical basis is on
  the input side of the Flax (in, out) kernel, the side that keeps the layer's response to old
  inputs (GPM's argument); the reference projects the left side of PyTorch's (out, in) weights of
  square attention projections. (c) The number of appended directions is the fewest reaching the
  threshold (GPM's Eq. 5/9), one more than the reference's count of prefixes below it.

  Args:
    proj_rank: r, the dimension of the optimization subspace (capped per layer at min(d, out)).
    sketch_rank: ell, the rows of each Frequent-Directions sketch (capped at d).
    update_gap: refresh period of P and of the sketch, in steps (>= 1).
    threshold: energy threshold in (0, 1] for the directions added to the history per task.
    layers: regex over '/'-joined parameter paths selecting the weights (default every kernel;
      other parameters are updated unprojected).

  Returns:
    A `Method` with state `CoSOState` and an ``update`` hook.

  Raises:
    ValueError: non-positive ranks or gap, a threshold outside (0, 1] (each named
      ``coso.<key>``), an invalid regex; from ``init``, a regex matching nothing or a bias.

  References:
    Cheng, Wan, Wu, Hou & Zhang, "Continuous Subspace Optimization for Continual Learning",
    arXiv 2505.11816 (2025), Sec. 3 (gradient projection onto sequential subspaces, orthogonality
    to the historical subspace, Frequent-Directions task component). Liberty, KDD 2013 (FD).
  """
  checks.integer('coso.proj_rank', proj_rank, minimum=1)
  checks.integer('coso.sketch_rank', sketch_rank, minimum=1)
  checks.integer('coso.update_gap', update_gap, minimum=1)
  _validate_threshold('coso.threshold', threshold)
  tree_lib.compile_patterns(layers, name='coso.layers')

  def fresh_sketches(protected):
    _, ells = _coso_ranks(protected, proj_rank, sketch_rank)
    return tuple(subspace.frequent_directions_init(l.dim, ell=e) for l, e in zip(protected, ells))

  def init(params):
    protected = protected_layers(params, layers, name='coso.layers')
    return CoSOState(tuple(jnp.zeros((l.dim, l.dim), jnp.float32) for l in protected),
                     jnp.zeros((len(protected),), jnp.int32), fresh_sketches(protected),
                     jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def update(state, params, updates, task_grads, *, key):
    del params, updates, key
    protected = protected_layers(task_grads, layers, name='coso.layers')
    _, ells = _coso_ranks(protected, proj_rank, sketch_rank)
    leaves = jax.tree_util.tree_leaves(task_grads)
    refresh = state.step % update_gap == 0
    sketches = []
    for i, layer in enumerate(protected):
      g = project_off_input(_as_matrix(leaves[layer.index], layer), state.bases[i], state.ranks[i])
      rows = min(ells[i], layer.out)

      def absorb(fd, g=g, rows=rows):
        u, s = top_left_singular(g, rows)
        return subspace.frequent_directions_update(fd, (u * s).T)
      sketches.append(jax.lax.cond(refresh, absorb, lambda fd: fd, state.sketches[i]))
    return state._replace(sketches=tuple(sketches), step=state.step + 1)

  def end_task(params, state, task_data, *, apply_fn, key):
    del task_data, apply_fn, key
    protected = protected_layers(params, layers, name='coso.layers')
    bases = tuple(subspace.grow_basis_padded(b, fd.sketch.T, threshold, width=b.shape[1])
                  for b, fd in zip(state.bases, state.sketches))
    ranks = jnp.stack([subspace.basis_rank(b) for b in bases])
    return CoSOState(bases, ranks, fresh_sketches(protected), jnp.zeros((), jnp.int32),
                     state.num_tasks + 1)

  return base.Method(init=init, loss=base.no_loss,
                     gradient_transform=lambda s: _coso_transform(s, layers, proj_rank,
                                                                  sketch_rank, update_gap),
                     end_task=end_task, update=update)
