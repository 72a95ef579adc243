"""Task-vector algebra over arbitrary parameter pytrees, and the exclusion rules of merging.

A task vector is the difference between a finetuned model and its base,
``tau = theta_finetuned - theta_base`` (Ilharco et al. 2023, Sec. 2); adding a scaled sum of task
vectors to the base is task arithmetic. The arithmetic is `optax.tree` (sub, add_scale, ...).

Exclusion (big_vision style). ``exclude`` is a regex, or a sequence of regexes, matched with
`re.fullmatch` against each leaf's '/'-joined path, e.g. ``'head/kernel'`` for
``{'head': {'kernel': ...}}`` (`path_name`). A leaf matching any pattern is *not merged*: its task
vector is zero and every merge in `cljax.merging` returns the base's value for it. This is how task
heads are kept out of a merge of backbones; the caller then swaps each task's own head in after
merging. Paths are those of the tree you pass: for Flax ``variables = {'params': {...}}`` a head
is ``'params/head/kernel'`` (use ``exclude='params/head/.*'``, or merge ``variables['params']``).
A pattern that matches no leaf is an error (a typo would otherwise merge the heads silently).

References:
  Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, Sec. 2 (task vectors, Eq. of
  the merged model theta = theta_pre + lambda * sum_i tau_i).
  Beyer et al., big_vision (parameter-path regex rules, e.g. ``'head/.*'``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from cljax import tree as tree_lib
from cljax.merging import validation

Params = Any
Exclude = Optional[Union[str, Sequence[str]]]


# A pytree key path as '/'-joined keys (e.g. 'params/Dense_0/kernel'), and every leaf's, in
# flattening order: the names `cljax.tree` defines for sharding rules and methods' regexes.
path_name = tree_lib.path_str
leaf_names = tree_lib.leaf_paths


def merge_mask(tree: Any, exclude: Exclude = None) -> Any:
  """Which leaves a merge touches: True where merged, False where excluded.

  Args:
    tree: a pytree of arrays (only its structure and paths are read).
    exclude: None, a regex, or a sequence of regexes, each `re.fullmatch`-ed against the
      '/'-joined leaf paths (`path_name`).

  Returns:
    A pytree with the structure of ``tree`` whose leaves are Python bools (static under jit).

  Raises:
    ValueError: a pattern is not a valid regex or matches no leaf (the error lists a few paths).
  """
  excluded = tree_lib.select(tree, exclude, name='exclude')
  return jax.tree.map(lambda e: not e, excluded)


def included_leaves(tree: Any, mask: Any) -> list:
  """The leaves of ``tree`` that are merged (``mask`` True), in flattening order."""
  return [x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m]


def combine(base: Params, mask: Any, merged: Sequence[Any]) -> Params:
  """Reassembles a full params tree: ``merged`` leaves where ``mask`` is True, base elsewhere.

  Args:
    base: the base params; its leaves fill the excluded positions and set the dtypes.
    mask: the `merge_mask` of ``base``.
    merged: one array per merged leaf, in flattening order (any float dtype; cast to base's).

  Returns:
    A pytree with base's structure and dtypes.
  """
  merged = iter(merged)
  leaves = [next(merged).astype(b.dtype) if m else b
            for b, m in zip(jax.tree.leaves(base), jax.tree.leaves(mask))]
  return jax.tree.unflatten(jax.tree.structure(base), leaves)


def compute_dtype(dtype: Any) -> Any:
  """The dtype merges compute in: at least float32 (bf16/f16 params are upcast)."""
  return jnp.promote_types(dtype, jnp.float32)


def upcast(leaves: Sequence[jax.Array]) -> list:
  """Casts each leaf to `compute_dtype` (a no-op for float32)."""
  return [x.astype(compute_dtype(x.dtype)) for x in leaves]


def task_vector(base: Params, finetuned: Params, *, exclude: Exclude = None) -> Params:
  """The task vector ``finetuned - base``, zero on excluded leaves.

  Args:
    base: base params, a pytree of float arrays.
    finetuned: params with base's structure, shapes and dtypes.
    exclude: regex(es) over '/'-joined leaf paths of leaves not merged (their task vector is 0).

  Returns:
    A pytree with base's structure and dtypes.

  Raises:
    ValueError: structure/shape/dtype mismatch (first mismatching path), NaN/Inf in either model
      (its path), a non-floating merged leaf, or an exclude pattern matching no leaf.

  References:
    Ilharco et al., ICLR 2023, Sec. 2: tau_t = theta_ft^t - theta_pre.
  """
  validation.check_same_structure(base, finetuned)
  mask = merge_mask(base, exclude)
  validation.check_floating(base, mask)
  validation.check_finite(base, name='base')
  validation.check_finite(finetuned, name='finetuned')
  tv = optax.tree.sub(finetuned, base)
  return jax.tree.map(lambda t, m: t if m else jnp.zeros_like(t), tv, mask)


def apply(base: Params, tv: Params, *, scale: float = 1.0) -> Params:
  """The model ``base + scale * tv``, in base's dtypes.

  Args:
    base: base params.
    tv: a task vector (or any sum of them) with base's structure and shapes; zero on excluded
      leaves if it came from `task_vector` or a merge, so those leaves stay at base.
    scale: the scaling coefficient lambda.

  Returns:
    A pytree with base's structure and dtypes.

  Raises:
    ValueError: structure/shape mismatch (first mismatching path), NaN/Inf in base or tv, or a
      non-finite ``scale``.

  References:
    Ilharco et al., ICLR 2023, Sec. 2: theta_new = theta_pre + lambda * tau.
  """
  validation.check_same_structure(base, tv, other_name='tv', check_dtype=False)
  if not validation.is_traced(scale):
    validation.check_finite_scalar(scale, name='scale')
  validation.check_finite(base, name='base')
  validation.check_finite(tv, name='tv')
  return optax.tree.cast_like(optax.tree.add_scale(base, scale, tv), base)
