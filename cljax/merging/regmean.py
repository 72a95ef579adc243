"""RegMean (Jin et al. 2023): merge each linear layer by the closed-form least-squares solution
that matches every model's outputs on its own inputs, from per-layer input Gram matrices.

For a linear layer y = x K (Flax Dense kernel K, (in, out)) and models i with inputs X_i, the
merged K minimises sum_i ||X_i K - X_i K_i||^2, whose solution is

  K = (sum_i G_i)^-1 sum_i G_i K_i,        G_i = X_i^T X_i        (Jin et al., the closed form)

To regularise, the off-diagonal entries of each Gram are scaled by alpha:
G_i <- alpha G_i + (1 - alpha) diag(G_i) (the authors' ``reduce_non_diagonal_ratio``).
Leaves without a Gram (biases, norms, embeddings) are averaged, as the authors' code. Grams
are per-example averages X^T X / N (the authors' running mean over batches): models seen on
different numbers of examples weigh alike.

Gram matrices come from captured layer inputs (`gram_matrix`, `gram_matrices`); for a Flax
Linen model, ``cljax.methods.projection.layer_representations(apply_fn, params, x)`` records
each Dense layer's inputs as ``{'<module path>/kernel': (d, N)}`` columns: pass their
transposes.

References:
  Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
  Models", ICLR 2023 (the closed-form merge of linear layers; alpha scaling of the
  non-diagonal Gram entries).
  FusionBench ``method/regmean`` (``merging_with_regmean_weights``,
  ``reduce_non_diagonal_elements``; Grams averaged over examples; non-Linear parameters
  averaged).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from cljax.merging import leafwise
from cljax.merging import task_vectors as tvlib
from cljax.merging import validation

Params = Any
Grams = Mapping[str, jax.Array]


def gram_matrix(x: jax.Array) -> jax.Array:
  """The per-example Gram matrix ``X^T X / N`` of a layer's inputs.

  Args:
    x: (..., d) float inputs of one layer; every leading position (batch, sequence) is a row,
      N of them.

  Returns:
    (d, d) float32.

  Raises:
    ValueError: x has no rows or is 0-D.

  References:
    Jin et al., ICLR 2023 (G = X^T X); FusionBench ``clip_regmean`` (divided by the rows).
  """
  x = jnp.asarray(x)
  if x.ndim < 1 or x.size == 0:
    raise ValueError(f'gram_matrix needs (..., d) inputs with at least one row; got shape '
                     f'{x.shape}')
  rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return rows.T @ rows / rows.shape[0]


def gram_matrices(inputs: Mapping[str, Union[jax.Array, Sequence[jax.Array]]]) -> dict:
  """Gram matrices of several layers, each from one array or a sequence of batches.

  A layer given batches X_1..X_B gets ``sum_b X_b^T X_b / sum_b N_b`` (the authors' running
  mean, equal to `gram_matrix` of the concatenated rows).

  Args:
    inputs: {kernel path ('/'-joined, as the params tree passed to `regmean`): (..., d) inputs
      or a sequence of such batches}.

  Returns:
    {path: (d, d) float32}.

  Raises:
    ValueError: a layer with no rows, or batches of different widths (the path).
  """
  out = {}
  for name, value in inputs.items():
    batches = [value] if hasattr(value, 'shape') else list(value)
    widths = {np.shape(b)[-1] for b in batches if np.ndim(b) >= 1}
    if len(widths) != 1:
      raise ValueError(f'gram_matrices: the inputs of {name!r} have widths {sorted(widths)}')
    width = widths.pop()
    rows = [jnp.asarray(b).reshape(-1, width).astype(jnp.float32) for b in batches]
    count = sum(r.shape[0] for r in rows)
    if count == 0:
      raise ValueError(f'gram_matrices: no inputs recorded for {name!r}')
    out[name] = sum(r.T @ r for r in rows) / count
  return out


def reduce_non_diagonal(gram: jax.Array, alpha: Any) -> jax.Array:
  """``alpha * G + (1 - alpha) * diag(G)``: the off-diagonal entries scaled by alpha."""
  return alpha * gram + (1 - alpha) * jnp.diag(jnp.diag(gram))


@jax.jit
def regmean_kernel(kernels: Sequence[jax.Array], grams: Sequence[jax.Array],
                   alpha: Any) -> jax.Array:
  """``(sum_i G_i)^-1 sum_i G_i K_i`` of (in, out) kernels, Grams reduced by alpha (solve)."""
  reduced = [reduce_non_diagonal(g.astype(jnp.float32), alpha) for g in grams]
  rhs = sum(g @ k for g, k in zip(reduced, kernels))
  return jnp.linalg.solve(sum(reduced), rhs)


def _check_grams(grams: Sequence[Grams], p: leafwise.Prepared, layout: str) -> dict:
  """{merged leaf index: [Gram of each model]}, after checking names and shapes."""
  if isinstance(grams, Mapping) or not isinstance(grams, Sequence) or len(grams) != len(p.models):
    raise ValueError(f'regmean: grams must be a sequence of {len(p.models)} mappings (one per '
                     f'finetuned model)')
  names = set(grams[0])
  for i, g in enumerate(grams):
    if set(g) != names:
      raise ValueError(f'regmean: grams[{i}] names {sorted(set(g) ^ names)} that grams[0] does '
                       f'not (or the reverse); every model needs the same layers')
  index = {n: j for j, n in enumerate(p.names)}
  out = {}
  for name in sorted(names):
    if name not in index:
      raise ValueError(f'regmean: grams name {name!r}, which is not a merged leaf (excluded, or '
                       f'not a path of the params; paths look like {p.names[:3]})')
    j = index[name]
    kernel = p.base[j]
    if kernel.ndim != 2:
      raise ValueError(f'regmean: {name!r} has shape {kernel.shape}; Grams apply to 2-D kernels')
    d = kernel.shape[0] if layout == 'in_out' else kernel.shape[1]
    for i, g in enumerate(grams):
      if np.shape(g[name]) != (d, d):
        raise ValueError(f'regmean: grams[{i}][{name!r}] has shape {np.shape(g[name])}; the '
                         f'kernel {kernel.shape} ({layout}) needs ({d}, {d})')
      validation.check_finite(g[name], name=f'grams[{i}][{name!r}]')
    out[j] = [g[name] for g in grams]
  return out


def regmean(base: Params, finetuned: Sequence[Params], *, grams: Sequence[Grams], alpha: float,
            kernel_layout: str = 'in_out', exclude: tvlib.Exclude = None) -> Params:
  """RegMean: Gram-weighted least-squares merge of linear kernels; other leaves averaged.

  Args:
    base: base params (its values only fill excluded leaves; RegMean merges the models).
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    grams: per model, {kernel path: (in, in) Gram of that layer's inputs on that model's data}
      (`gram_matrices`); every model names the same 2-D merged leaves.
    alpha: the scaling of the Grams' off-diagonal entries, in [0, 1] (1: exact least squares;
      FusionBench uses 0.95 for CLIP, 0.1 by default).
    kernel_layout: 'in_out' (Flax Dense, y = x K) or 'out_in' (PyTorch Linear, y = x W^T).
    exclude: regex(es) of leaves that are not merged (base's value is kept).

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: mismatching or non-finite inputs or Grams (the model and path); Grams of the
      wrong number, names or shapes (the path); alpha out of [0, 1]; a singular summed Gram
      (a non-finite merged kernel, its path: an input feature never active, use alpha < 1 or
      exclude the layer).

  References:
    Jin et al., ICLR 2023 (closed form, alpha); FusionBench ``merging_with_regmean_weights``.
  """
  alpha = validation.check_fraction(alpha, name='alpha')
  layout = leafwise.check_layout(kernel_layout)
  p = leafwise.prepare(base, finetuned, exclude, method='regmean')
  by_leaf = _check_grams(grams, p, layout)
  merged = []
  for j, b in enumerate(p.base):
    if j not in by_leaf:
      merged.append(sum(m[j] for m in p.models) / len(p.models))
      continue
    kernels = [leafwise.as_out_in(m[j], layout).T for m in p.models]   # -> (in, out)
    k = regmean_kernel(kernels, by_leaf[j], jnp.float32(alpha))
    if not validation.is_traced(k) and not bool(jnp.all(jnp.isfinite(k))):
      raise ValueError(f'regmean: the summed Gram of {p.names[j]!r} is singular (an input '
                       f'feature never active?); use alpha < 1 or exclude the layer')
    merged.append(leafwise.as_out_in(k.T, layout))
  return leafwise.finish(base, p, merged, method='regmean')
