"""Continual-training methods by name; each constructor returns a `Method` (see `base`).

The submodules ``replay`` and ``refresh`` keep their module names here; their constructors are
``replay.replay`` and ``refresh.refresh`` (the latter wraps a `Method`; `refresh_named` builds
the wrapped method from the registry, which is what the config key ``refresh`` selects).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

from cljax.methods import base
from cljax.methods import projection
from cljax.methods import refresh
from cljax.methods import regularizers
from cljax.methods import replay
from cljax.methods.base import Batch, Method
from cljax.methods.regularizers import ewc, finetune, l2, lwf, mas, online_ewc, si
from cljax.methods.replay import joint


def refresh_named(*, base_method: str = 'finetune',
                  base_hparams: Optional[Mapping[str, Any]] = None,
                  input_shape: Optional[Sequence[int]] = None, **refresh_hparams) -> Method:
  """Refresh learning (`cljax.methods.refresh.refresh`) around the registered method
  ``base_method`` built with ``base_hparams``; ``refresh_hparams`` are refresh's own keyword
  arguments (their names and defaults are refresh's: see the signature below). ``input_shape``
  (the stream's, filled in by `get`) is passed on to a base method that takes it (`replay`).

  Raises:
    ValueError: an unknown or recursive base method, or a bad hyperparameter (of refresh, named
      ``refresh.<key>``, or of the base method).
  """
  if base_method == 'refresh':
    raise ValueError("refresh.base_method cannot be 'refresh'")
  if base_method not in REGISTRY:
    raise ValueError(f'unknown method {base_method!r} (config key `refresh.base_method`); '
                     f'choose from {sorted(REGISTRY)}')
  return refresh.refresh(get(base_method, base_hparams, input_shape=input_shape),
                         **refresh_hparams)


# One source of refresh's hyperparameters and defaults: `get` checks config keys against this
# signature, so it lists base_method, base_hparams and refresh's own keyword arguments.
refresh_named.__signature__ = inspect.signature(refresh_named).replace(parameters=[
    *[p for p in inspect.signature(refresh_named).parameters.values()
      if p.kind == p.KEYWORD_ONLY],
    *[p for p in inspect.signature(refresh.refresh).parameters.values()
      if p.kind == p.KEYWORD_ONLY]])


REGISTRY: dict[str, Callable[..., Method]] = {
    'finetune': finetune,
    'joint': joint,
    'l2': l2,
    'ewc': ewc,
    'online_ewc': online_ewc,
    'si': si,
    'mas': mas,
    'lwf': lwf,
    'replay': replay.replay,
    'refresh': refresh_named,
    'gpm': projection.gpm,
    'osft': projection.osft,
    'coso': projection.coso,
}


def check_names(name: str, hparams: Mapping[str, Any] | None = None) -> None:
  """Checks a method name and its hyperparameters' names (not their values) without building it.

  Raises:
    ValueError: unknown method name, or a hyperparameter the method does not take (named with
      its config key, ``<method>.<key>``).
  """
  if name not in REGISTRY:
    raise ValueError(f'unknown method {name!r} (config key `methods`); choose from {sorted(REGISTRY)}')
  accepted = set(inspect.signature(REGISTRY[name]).parameters)
  unknown = sorted(set(hparams or {}) - accepted)
  if unknown:
    raise ValueError(f'unknown hyperparameter(s) {", ".join(f"{name}.{k}" for k in unknown)}; '
                     f'{name} takes {sorted(accepted) or "none"}')


def get(name: str, hparams: Mapping[str, Any] | None = None, *,
        input_shape: Sequence[int] | None = None) -> Method:
  """Builds the method ``name`` with keyword hyperparameters ``hparams``.

  Args:
    name: a key of `REGISTRY`.
    hparams: keyword hyperparameters (the config's ``<name>`` block).
    input_shape: the shape of one input of the experiment's stream, e.g. (28, 28, 1). Passed to
      methods whose state depends on it (`replay`'s buffer) unless ``hparams`` sets it.

  Raises:
    ValueError: unknown method name, a hyperparameter the method does not take (named with
      its config key, ``<method>.<key>``), or an ``input_shape`` hyperparameter that differs
      from the stream's.
  """
  check_names(name, hparams)
  ctor = REGISTRY[name]
  hparams = dict(hparams or {})
  if input_shape is not None and 'input_shape' in inspect.signature(ctor).parameters:
    stream_shape = tuple(int(d) for d in input_shape)
    given = hparams.setdefault('input_shape', stream_shape)
    if not isinstance(given, (tuple, list)) or tuple(given) != stream_shape:
      raise ValueError(f'{name}.input_shape is {given!r} but the stream\'s inputs are '
                       f'{stream_shape}; leave it unset to use the stream\'s')
  return ctor(**hparams)
