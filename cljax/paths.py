"""Parameter paths: the '/'-joined names that big_vision-style regex rules match.

One definition shared by sharding rules, method parameter selection (l2's ``param_regex``,
projection layers), subspace transforms and merges' ``exclude`` patterns, so that a pattern such
as ``'head/.*'`` means the same leaves everywhere.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax


def key_name(key: Any) -> str:
  """The name of one `jax.tree_util` path entry (dict key, attribute name or sequence index)."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  """``(DictKey('dense0'), DictKey('kernel')) -> 'dense0/kernel'``."""
  return '/'.join(key_name(k) for k in path)


def leaf_paths(tree: Any) -> list[str]:
  """The path of every leaf of ``tree``, in flattening order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
