"""Model Stock (Jang et al. 2024): interpolate the average of k finetuned models towards the base
by a ratio set from the angle between their task vectors, per layer.

For k finetuned models w_1..w_k of the base w_0, per merged leaf (or per output filter):
cos(theta) is the mean over pairs i < j of cos(w_i - w_0, w_j - w_0), and

  t = k cos(theta) / (1 + (k - 1) cos(theta)),    w_H = t * mean_i w_i + (1 - t) * w_0

(Jang et al.: the layer-wise ratio for k models sharing one angle theta; for k > 2 the paper
does not say how theta is measured, and the mean of the pairwise cosines is mergekit's
reading). Excluded leaves keep the base's value.

References:
  Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024
  (arXiv 2403.19522): the interpolation ratio t = k cos(theta) / (1 + (k - 1) cos(theta)).
  mergekit ``merge_methods/model_stock.py`` (pairwise mean of cosines, norm product clamped at
  1e-6, ``filter_wise`` option).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from cljax.merging import leafwise
from cljax.merging import task_vectors as tvlib

Params = Any


@functools.partial(jax.jit, static_argnames=('filter_wise', 'layout'))
def _stock_leaf(w0, ws, *, filter_wise, layout):
  shape = w0.shape
  filter_wise = filter_wise and w0.ndim >= 2
  if filter_wise:
    # Per output filter: rows of the (out, ...) view; Flax kernels keep outputs last.
    axis = -1 if layout == 'in_out' else 0
    view = lambda x: jnp.moveaxis(x, axis, 0).reshape(shape[axis], -1)
  else:
    view = lambda x: x.reshape(1, -1)
  base = view(w0)
  offsets = [view(w) - base for w in ws]
  cosines = []
  for i in range(len(offsets)):
    for j in range(i + 1, len(offsets)):
      a, b = offsets[i], offsets[j]
      denom = jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-6)
      cosines.append(jnp.clip(jnp.sum(a * b, axis=-1) / denom, -1.0, 1.0))
  cos = jnp.mean(jnp.stack(cosines), axis=0)[:, None]
  k = len(ws)
  t = k * cos / (1 + (k - 1) * cos)
  merged = t * functools.reduce(jnp.add, [view(w) for w in ws]) / k + (1 - t) * base
  if filter_wise:
    moved = jnp.moveaxis(w0, axis, 0).shape
    return jnp.moveaxis(merged.reshape(moved), 0, axis)
  return merged.reshape(shape)


def model_stock(base: Params, finetuned: Sequence[Params], *, filter_wise: bool = False,
                kernel_layout: str = 'in_out', exclude: tvlib.Exclude = None) -> Params:
  """Model Stock: ``t * mean_i w_i + (1 - t) * w_0`` with t from the task vectors' angle.

  Args:
    base: base (pretrained) params w_0, a pytree of float arrays.
    finetuned: k >= 2 params pytrees with base's structure, shapes and dtypes.
    filter_wise: one ratio per output unit (the last axis of a Flax kernel; mergekit's
      ``filter_wise`` on PyTorch rows) instead of one per leaf. Leaves of 0 or 1 dimension
      (biases, scales) use one ratio, as mergekit treats them as a single row.
    kernel_layout: with filter_wise, where >= 2-D leaves keep their output units: 'in_out'
      (last axis, Flax) or 'out_in' (first axis, PyTorch / safetensors; mergekit's rows, all
      other axes flattened).
    exclude: regex(es) of leaves that are not merged (base's value is kept).

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: fewer than two finetuned models, mismatching or non-finite inputs (the model
      and path), an exclude pattern matching nothing, a non-finite result (its path; e.g.
      cos(theta) = -1 / (k - 1)).

  References:
    Jang et al., ECCV 2024 (the ratio t); mergekit ``model_stock.py``.
  """
  layout = leafwise.check_layout(kernel_layout)
  p = leafwise.prepare(base, finetuned, exclude, min_models=2, method='model_stock')
  merged = [_stock_leaf(b, [m[j] for m in p.models], filter_wise=bool(filter_wise),
                        layout=layout)
            for j, b in enumerate(p.base)]
  return leafwise.finish(base, p, merged, method='model_stock')
