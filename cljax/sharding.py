"""Device meshes, parameter sharding rules and process-local batches (JAX SPMD, no pmap).

The mesh has two axes: ``data`` (the batch is split over it) and ``model`` (size 1 unless
asked for; large parameter leaves can be split over it FSDP-style). Parameters are replicated
unless a rule says otherwise. Rules are big_vision-style regexes over '/'-joined parameter paths
(``'dense0/kernel'``, ``'head/.*'``), each with a partition spec for that leaf, first match wins.

Multi-host: every process builds the same mesh over all global devices, computes the same
global batch indices, and passes only its own rows to `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cljax import tree as tree_lib

PyTree = Any
Rule = tuple[str, Sequence[Optional[str]]]


def make_mesh(num_devices: Optional[int] = None, *, model: int = 1) -> Mesh:
  """A (data, model) mesh over the first ``num_devices`` global devices (all by default).

  Args:
    num_devices: devices to use; None for all of `jax.devices()` (all processes' devices).
    model: size of the ``model`` axis; ``data`` gets ``num_devices // model``.

  Raises:
    ValueError: more devices than exist, or ``model`` not dividing the device count.
  """
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f'num_devices={num_devices} but {len(devices)} device(s) are available')
  if model < 1 or n % model:
    raise ValueError(f'the model axis size {model} must divide the {n} device(s) '
                     '(config key `model_axis`)')
  return Mesh(np.asarray(devices[:n]).reshape(n // model, model), ('data', 'model'))


def param_shardings(params: PyTree, mesh: Mesh, rules: Sequence[Rule] = ()) -> PyTree:
  """A `NamedSharding` per leaf of ``params``: the first rule whose regex fully matches its path.

  Args:
    params: a pytree of arrays (or ShapeDtypeStructs).
    mesh: from `make_mesh`.
    rules: ``(regex, spec)`` pairs; ``spec`` has one entry per array dimension, each None,
      'data' or 'model' (e.g. ``('.*/kernel', (None, 'model'))``). Unmatched leaves are replicated.

  Raises:
    ValueError: a rule that matches no leaf, a spec of the wrong rank, or a dimension not
      divisible by its mesh axis; the message names the rule and the leaf path.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [tree_lib.path_str(p) for p, _ in flat]
  regexes = [regex for regex, _ in rules]
  tree_lib.select(params, regexes, name='sharding_rules')  # Each rule must match some leaf.
  compiled = list(zip(tree_lib.compile_patterns(regexes, name='sharding_rules'),
                      (tuple(spec) for _, spec in rules)))
  shardings = []
  for path, (_, leaf) in zip(paths, flat):
    spec = tree_lib.first_match(path, compiled) or ()
    if spec and len(spec) != len(leaf.shape):
      raise ValueError(f'sharding spec {spec} for {path!r} has {len(spec)} entries but the leaf '
                       f'has shape {leaf.shape}')
    for dim, axis in zip(leaf.shape, spec):
      if axis is not None and dim % mesh.shape[axis]:
        raise ValueError(f'{path!r}: dimension {dim} of shape {leaf.shape} is not divisible by '
                         f'the {mesh.shape[axis]} devices of mesh axis {axis!r}')
    shardings.append(NamedSharding(mesh, P(*spec)))
  return jax.tree_util.tree_unflatten(treedef, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch splits evenly over the ``data`` axis and processes."""
  n = mesh.shape['data']
  if batch_size < 1 or batch_size % n or batch_size % jax.process_count():
    raise ValueError(f'batch_size={batch_size} must be a positive multiple of the {n} device(s) '
                     f'on the data axis (and of the {jax.process_count()} process(es))')


def shard_batch(mesh: Mesh, array: np.ndarray, axis: int = 0) -> jax.Array:
  """A global array split along ``axis`` over ``data``, from this process's rows of ``array``.

  Args:
    mesh: the device mesh.
    array: the *global* host array; every process passes the same one (same seed, same
      indices) and contributes only its contiguous block of rows along ``axis``.
    axis: the batch axis.

  Returns:
    A `jax.Array` of ``array``'s global shape, sharded ``P(..., 'data', ...)``.
  """
  spec = [None] * array.ndim
  spec[axis] = 'data'
  sharding = NamedSharding(mesh, P(*spec))
  count, index = jax.process_count(), jax.process_index()
  if count > 1:
    rows = array.shape[axis] // count
    array = np.take(array, np.arange(index * rows, (index + 1) * rows), axis=axis)
  return jax.make_array_from_process_local_data(sharding, array)
