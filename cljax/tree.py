"""Parameter paths and regex selection over them: the one helper every rule and selection uses.

A leaf is named by its '/'-joined pytree path (``'dense0/kernel'``, ``'params/head/bias'``); a
pattern is matched with `re.fullmatch` against that name. Sharding rules, regularizers'
``param_regex``, projection layers, subspace transforms and merges' ``exclude`` all go through
`select` / `first_match`, so a pattern such as ``'head/.*'`` means the same leaves everywhere
(big_vision's convention).

This module imports nothing of cljax.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence, TypeVar, Union

import jax

Patterns = Union[None, str, Sequence[str]]
T = TypeVar('T')


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


def path_tree(tree: Any) -> Any:
  """A pytree like ``tree`` whose leaves are the leaves' path names."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path_str(path), tree)


def compile_patterns(patterns: Patterns, *, name: str) -> list[re.Pattern]:
  """Compiles a regex or a sequence of them (None: none).

  Raises:
    ValueError: a pattern that is not a string or not a valid regex; names ``name`` (the config
      key or argument).
  """
  if patterns is None:
    return []
  items = [patterns] if isinstance(patterns, str) else list(patterns)
  compiled = []
  for pattern in items:
    if not isinstance(pattern, str):
      raise ValueError(f'{name} must be a regex string or a sequence of them, got {pattern!r}')
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f'{name}={pattern!r} is not a valid regex: {e}') from None
  return compiled


def _examples(names: Sequence[str]) -> str:
  return ', '.join(repr(n) for n in names[:8]) + (', ...' if len(names) > 8 else '')


def select(tree: Any, patterns: Patterns, *, name: str, require_match: bool = True) -> Any:
  """Which leaves' paths fully match any of ``patterns``: a pytree of Python bools.

  Works on traced or abstract trees too (only the structure is read), so a jitted loss can call
  it; the bools are static.

  Args:
    tree: a pytree (arrays, tracers or ShapeDtypeStructs).
    patterns: a regex, a sequence of regexes, or None (selects nothing).
    name: the config key or argument named in errors, e.g. ``'l2.param_regex'``.
    require_match: raise if a pattern matches no leaf (a typo would otherwise select nothing).

  Returns:
    A pytree with ``tree``'s structure and bool leaves.

  Raises:
    ValueError: an invalid pattern, or (``require_match``) a pattern matching no leaf; the
      message lists the tree's paths.
  """
  compiled = compile_patterns(patterns, name=name)
  names = leaf_paths(tree)
  if require_match:
    for pattern in compiled:
      if not any(pattern.fullmatch(n) for n in names):
        raise ValueError(f'{name}={pattern.pattern!r} matches no parameter (re.fullmatch on '
                         f"'/'-joined paths); the paths are {_examples(names)}")
  flags = [any(p.fullmatch(n) for p in compiled) for n in names]
  return jax.tree.unflatten(jax.tree.structure(tree), flags)


def first_match(path: str, rules: Sequence[tuple[re.Pattern, T]]) -> Optional[T]:
  """The value of the first ``(compiled regex, value)`` rule whose regex fully matches ``path``."""
  return next((value for regex, value in rules if regex.fullmatch(path)), None)
