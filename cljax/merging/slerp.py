"""Spherical interpolation merges: SLERP, NuSLERP and multi-model SLERP, as mergekit defines them.

  * `slerp`: two endpoints, the base and one finetuned model (mergekit) or two finetuned
    models (FusionBench), interpolated along the great circle through their directions, leaf by
    leaf (each leaf flattened to one vector); (nearly) colinear leaves,
    ``|cos| > dot_threshold``, fall back to linear interpolation.
  * `nuslerp`: two finetuned models with weights; by default it interpolates their *task
    vectors* (mergekit's NuSLERP with a base model) and adds the result to the base; vectors can
    be whole leaves (mergekit's default ``nuslerp_flatten``) or slices along one axis.
  * `multislerp`: n models, barycentric interpolation on the hypersphere (mergekit's
    ``multislerp``): the weighted mean of the unit directions, a tangent-space step and the
    exponential map, scaled by the weighted mean norm.

Excluded leaves keep the base's value. Arithmetic in float32 (or wider); results in the base's
dtypes.

References:
  Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 (slerp(t; v0, v1) =
  sin((1 - t) theta) / sin(theta) v0 + sin(t theta) / sin(theta) v1, cos(theta) = <v0, v1>).
  Goddard et al., "Arcee's MergeKit", EMNLP 2024 industry track; mergekit's
  ``merge_methods/slerp.py`` (``slerp``, DOT_THRESHOLD 0.9995), ``nuslerp.py`` and
  ``multislerp.py``.
  Buss & Fillmore, "Spherical averages and applications to spherical splines and
  interpolation", ACM TOG 2001 (the spherical weighted mean that multislerp approximates).
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


def _normalize_whole(v: jax.Array, eps: float) -> jax.Array:
  """mergekit's ``normalize``: v / |v| when |v| > eps, else v unchanged."""
  norm = jnp.linalg.norm(v)
  return jnp.where(norm > eps, v / jnp.where(norm > eps, norm, 1.0), v)


@functools.partial(jax.jit, static_argnames=('dot_threshold', 'eps'))
def _slerp_leaf(v0, v1, t, *, dot_threshold, eps):
  u0, u1 = _normalize_whole(v0.reshape(-1), eps), _normalize_whole(v1.reshape(-1), eps)
  dot = jnp.sum(u0 * u1)
  colinear = jnp.abs(dot) > dot_threshold
  theta0 = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
  sin0 = jnp.where(colinear, 1.0, jnp.sin(theta0))
  s0 = jnp.sin(theta0 - theta0 * t) / sin0
  s1 = jnp.sin(theta0 * t) / sin0
  return jnp.where(colinear, (1 - t) * v0 + t * v1, s0 * v0 + s1 * v1)


def slerp(base: Params, finetuned: Sequence[Params], *, t: float = 0.5,
          dot_threshold: float = 0.9995, eps: float = 1e-8,
          exclude: tvlib.Exclude = None) -> Params:
  """SLERP between two models, leaf by leaf: the base and one finetuned model, or two models.

  The endpoints are v0 = base, v1 = finetuned[0] when one model is given (mergekit's
  ``slerp``, whose base model is one endpoint), and v0 = finetuned[0], v1 = finetuned[1] when
  two are (FusionBench's ``SlerpMergeAlgorithm``; the base then only fills excluded leaves).
  Per merged leaf, with v0 and v1 flattened and u_i = v_i / |v_i| (v_i itself when
  |v_i| <= eps): cos(theta) = <u0, u1>; if ``|cos(theta)| > dot_threshold`` the leaf is
  ``(1 - t) v0 + t v1``, otherwise
  ``sin((1 - t) theta) / sin(theta) v0 + sin(t theta) / sin(theta) v1``.

  Args:
    base: base params, a pytree of float arrays.
    finetuned: one or two params pytrees with base's structure, shapes and dtypes.
    t: interpolation factor in [0, 1] (0 gives v0; may be traced; FusionBench's default 0.5).
    dot_threshold: |cos| above which the leaf is linearly interpolated, in (0, 1].
    eps: norms at or below it are not normalized.
    exclude: regex(es) of leaves that are not merged (base's value is kept).

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: not one or two finetuned models, mismatching or non-finite inputs (the model
      and path), t outside [0, 1], a bad dot_threshold or eps, an exclude pattern matching
      nothing.

  References:
    Shoemake 1985 (slerp); mergekit ``merge_methods/slerp.py`` (``slerp``, lerp fallback above
    DOT_THRESHOLD = 0.9995); FusionBench ``method/slerp`` (two models, t = 0.5).
  """
  if not validation.is_traced(t):
    validation.check_fraction(t, name='t')
  dot_threshold = validation.check_interval(dot_threshold, name='dot_threshold', low=0.0,
                                            high=1.0, low_open=True)
  eps = validation.check_interval(eps, name='eps', low=0.0, high=float('inf'))
  p = leafwise.prepare(base, finetuned, exclude, min_models=1, max_models=2, method='slerp')
  v0, v1 = (p.base, p.models[0]) if len(p.models) == 1 else p.models
  t = jnp.asarray(t, jnp.float32)
  merged = [_slerp_leaf(a, b, t, dot_threshold=dot_threshold, eps=eps) for a, b in zip(v0, v1)]
  return leafwise.finish(base, p, merged, method='slerp')


@functools.partial(jax.jit, static_argnames=('axis', 'eps'))
def nuslerp_vectors(v0: jax.Array, v1: jax.Array, t: Any, *, axis: Optional[int] = None,
                    eps: float = 1e-8) -> jax.Array:
  """mergekit's ``nuslerp(t, v0, v1)`` of two arrays: slerp of the vectors along ``axis``.

  With ``axis=None`` each array is one vector (flattened). Vectors are normalized by
  max(|v|, 1e-7); where |sin(theta)| < eps (colinear) the result is (1 - t) v0 + t v1.

  Args:
    v0, v1: float arrays of one shape.
    t: interpolation factor (0 gives v0, 1 gives v1).
    axis: the axis holding the vectors, or None for the whole array (static).
    eps: colinearity threshold on |sin(theta)| (static).

  Returns:
    An array of v0's shape.

  References:
    mergekit ``merge_methods/nuslerp.py``, ``nuslerp``.
  """
  shape = v0.shape
  if axis is None:
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
  else:
    a, b = jnp.moveaxis(v0, axis, -1), jnp.moveaxis(v1, axis, -1)
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-7)
  cos = jnp.sum(unit(a) * unit(b), axis=-1, keepdims=True)
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  sin = jnp.sin(theta)
  colinear = jnp.abs(sin) < eps
  safe = jnp.where(colinear, 1.0, sin)
  res = jnp.where(colinear, (1 - t) * a + t * b,
                  (jnp.sin((1 - t) * theta) * a + jnp.sin(t * theta) * b) / safe)
  return res.reshape(shape) if axis is None else jnp.moveaxis(res, -1, axis)


def nuslerp(base: Params, finetuned: Sequence[Params], *, weights: Sequence[float] = (1.0, 1.0),
            axis: Optional[int] = None, relative_to_base: bool = True, eps: float = 1e-8,
            exclude: tvlib.Exclude = None) -> Params:
  """NuSLERP: slerp of two finetuned models with weights, optionally of their task vectors.

  t = w_1 / (w_0 + w_1) (0.5 when |w_0 + w_1| < 1e-6, as mergekit). With
  ``relative_to_base`` (mergekit's NuSLERP given a base model) each merged leaf is
  ``base + nuslerp(t, tau_0, tau_1)``, tau_i = theta_i - base; otherwise
  ``nuslerp(t, theta_0, theta_1)`` of the raw weights. See `nuslerp_vectors`.

  Args:
    base: base params.
    finetuned: two params pytrees with base's structure, shapes and dtypes.
    weights: (w_0, w_1), finite.
    axis: None slerps each leaf as one vector (mergekit's default ``nuslerp_flatten: true``);
      an int slerps the vectors along that axis of every leaf with more than one dimension
      (leaves of 0 or 1 dimension are slerped whole). For a Flax Dense kernel (in, out),
      ``axis=0`` is mergekit's per-row mode (``nuslerp_flatten: false``,
      ``nuslerp_row_wise: false``: vectors along the input dimension of each output unit).
    relative_to_base: interpolate task vectors (True) or raw weights (False).
    eps: colinearity threshold on |sin(theta)|.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: not two models, mismatching or non-finite inputs, bad weights or axis,
      an exclude pattern matching nothing.

  References:
    mergekit ``merge_methods/nuslerp.py`` (``NuSlerpTask.execute``, ``nuslerp``).
  """
  p = leafwise.prepare(base, finetuned, exclude, min_models=2, max_models=2, method='nuslerp')
  if len(weights) != 2:
    raise ValueError(f'nuslerp: weights must hold two numbers; got {weights!r}')
  w0, w1 = (validation.check_finite_scalar(w, name='weights') for w in weights)
  t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
  if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
    raise ValueError(f'nuslerp: axis must be None or an int; got {axis!r}')
  merged = []
  for name, b, m0, m1 in zip(p.names, p.base, *p.models):
    leaf_axis = axis if (axis is not None and b.ndim >= 2) else None
    if leaf_axis is not None and not -b.ndim <= leaf_axis < b.ndim:
      raise ValueError(f'nuslerp: axis {axis} is out of range for {name!r} of shape {b.shape}')
    if relative_to_base:
      merged.append(b + nuslerp_vectors(m0 - b, m1 - b, t, axis=leaf_axis, eps=eps))
    else:
      merged.append(nuslerp_vectors(m0, m1, t, axis=leaf_axis, eps=eps))
  return leafwise.finish(base, p, merged, method='nuslerp')


@functools.partial(jax.jit, static_argnames=('eps',))
def _multislerp_leaf(vectors, weights, *, eps):
  """(n, d) vectors -> (merged (d,), degenerate flag): mergekit's ``multislerp`` of one leaf."""
  norms = jnp.linalg.norm(vectors, axis=-1, keepdims=True)
  unit = vectors / (norms + eps)
  mean = jnp.sum(unit * weights[:, None], axis=0)
  mean_norm = jnp.linalg.norm(mean)
  degenerate = mean_norm < eps
  mean = mean / jnp.where(degenerate, 1.0, mean_norm)
  tangent = unit - jnp.sum(unit * mean, axis=-1, keepdims=True) * mean
  step = jnp.sum(tangent * weights[:, None], axis=0)
  step_norm = jnp.linalg.norm(step) + eps
  result = (mean * jnp.cos(step_norm) + step * (jnp.sin(step_norm) / step_norm)) * jnp.sum(
      norms[:, 0] * weights)
  if vectors.shape[0] == 2:   # mergekit's fallback for two antipodal inputs: lerp
    result = jnp.where(degenerate, weights[0] * vectors[0] + weights[1] * vectors[1], result)
    degenerate = jnp.zeros((), bool)
  return result, degenerate


def multislerp(base: Params, finetuned: Sequence[Params], *,
               weights: Optional[Sequence[float]] = None, normalize_weights: bool = True,
               relative_to_base: bool = True, eps: float = 1e-8,
               exclude: tvlib.Exclude = None) -> Params:
  """Multi-model SLERP: barycentric interpolation of n models on the hypersphere, per leaf.

  Per merged leaf, with v_i the flattened task vectors (``relative_to_base``) or weights and
  w_i the (normalized) weights: u_i = v_i / (|v_i| + eps); m = sum_i w_i u_i / |sum_i w_i u_i|;
  tangent steps g_i = u_i - <u_i, m> m; s = sum_i w_i g_i; result
  ``(m cos|s| + s sin|s| / |s|) * sum_i w_i |v_i|`` (|s| + eps in place of |s|), plus the base
  when ``relative_to_base``. Two models whose weighted directions cancel fall back to
  ``w_0 v_0 + w_1 v_1``; more than two are refused (mergekit's rule). With one model the result
  is that model.

  Args:
    base: base params.
    finetuned: n >= 1 params pytrees with base's structure, shapes and dtypes.
    weights: n finite weights (default all 1).
    normalize_weights: divide the weights by their sum (mergekit's default).
    relative_to_base: interpolate task vectors (True, mergekit with a base model) or weights.
    eps: stability constant of the normalizations.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: mismatching or non-finite inputs; weights of the wrong length, non-finite or
      summing to 0 with normalize_weights; more than two models whose weighted unit directions
      sum to (nearly) zero at a leaf (its path).

  References:
    mergekit ``merge_methods/multislerp.py`` (``multislerp``); Buss & Fillmore 2001.
  """
  p = leafwise.prepare(base, finetuned, exclude, method='multislerp')
  n = len(p.models)
  weights = [1.0] * n if weights is None else list(weights)
  if len(weights) != n:
    raise ValueError(f'multislerp: {len(weights)} weights for {n} models')
  weights = [validation.check_finite_scalar(w, name=f'weights[{i}]') for i, w in enumerate(weights)]
  if normalize_weights:
    total = sum(weights)
    if total == 0:
      raise ValueError('multislerp: the weights sum to 0 and cannot be normalized')
    weights = [w / total for w in weights]
  if n == 1:
    return leafwise.finish(base, p, p.models[0], method='multislerp')
  w = jnp.asarray(weights, jnp.float32)
  merged = []
  for j, (name, b) in enumerate(zip(p.names, p.base)):
    vectors = jnp.stack([(m[j] - b if relative_to_base else m[j]).reshape(-1) for m in p.models])
    result, degenerate = _multislerp_leaf(vectors, w, eps=eps)
    if not validation.is_traced(degenerate) and bool(degenerate):
      raise ValueError(f'multislerp: at {name!r} the weighted unit directions of the models sum '
                       f'to zero (antipodal inputs); choose other weights')
    result = result.reshape(b.shape)
    merged.append(result + b if relative_to_base else result)
  return leafwise.finish(base, p, merged, method='multislerp')
