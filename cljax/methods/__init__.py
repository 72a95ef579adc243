"""Continual-training methods by name; each constructor returns a `Method` (see `base`).

The submodules ``replay`` and ``refresh`` keep their module names here; their constructors are
``replay.replay`` and ``refresh.refresh``.

`REGISTRY` maps a method's name to its constructor, whose keyword-only arguments are the method's
hyperparameters (the config block ``config.<name>``). A name joining registered names with ``+``
is their `chain`: ``'replay+ewc'`` trains with replay's and EWC's terms together, and
``'ewc+refresh'`` is refresh learning around EWC; each member reads its own config block.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

from cljax.core import Batch
from cljax.methods import base
from cljax.methods import projection
from cljax.methods import refresh
from cljax.methods import regularizers
from cljax.methods import replay
from cljax.methods.base import Method, chain
from cljax.methods.projection import coso, gpm, osft
from cljax.methods.regularizers import ewc, finetune, l2, lwf, mas, online_ewc, si
from cljax.methods.replay import joint

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
    'refresh': refresh.refresh,
    'gpm': gpm,
    'osft': osft,
    'coso': coso,
}


def members(name: str) -> list[str]:
  """The registered names of a method name: ``'replay+ewc' -> ['replay', 'ewc']``.

  Raises:
    ValueError: an empty member, or one that is not registered (config key `methods`).
  """
  parts = [p.strip() for p in str(name).split('+')]
  for part in parts:
    if part not in REGISTRY:
      raise ValueError(f'unknown method {part!r} in {name!r} (config key `methods`); choose from '
                       f"{sorted(REGISTRY)}, or join several with '+'")
  if len(set(parts)) != len(parts):
    raise ValueError(f'method {name!r} names a member twice (config key `methods`)')
  return parts


def hyperparameters(name: str) -> list[str]:
  """The hyperparameter names of the registered method ``name`` (its keyword-only arguments)."""
  return [p.name for p in inspect.signature(REGISTRY[name]).parameters.values()
          if p.kind == p.KEYWORD_ONLY]


def check_names(name: str, hparams: Mapping[str, Any] | None = None) -> None:
  """Checks one registered method name and its hyperparameters' names, without building it.

  Raises:
    ValueError: unknown method name, or a hyperparameter the method does not take (named with
      its config key, ``<method>.<key>``).
  """
  if name not in REGISTRY:
    raise ValueError(f'unknown method {name!r} (config key `methods`); choose from '
                     f'{sorted(REGISTRY)}')
  accepted = set(hyperparameters(name))
  unknown = sorted(set(hparams or {}) - accepted)
  if unknown:
    raise ValueError(f'unknown hyperparameter(s) {", ".join(f"{name}.{k}" for k in unknown)}; '
                     f'{name} takes {sorted(accepted) or "none"}')


def _build(name: str, hparams: Optional[Mapping[str, Any]], input_shape) -> Method:
  check_names(name, hparams)
  ctor = REGISTRY[name]
  hparams = dict(hparams or {})
  if input_shape is not None and 'input_shape' in hyperparameters(name):
    stream_shape = tuple(int(d) for d in input_shape)
    given = hparams.setdefault('input_shape', stream_shape)
    if not isinstance(given, (tuple, list)) or tuple(given) != stream_shape:
      raise ValueError(f'{name}.input_shape is {given!r} but the stream\'s inputs are '
                       f'{stream_shape}; leave it unset to use the stream\'s')
  return ctor(**hparams)


def get(name: str, hparams: Mapping[str, Any] | None = None, *,
        input_shape: Sequence[int] | None = None,
        blocks: Mapping[str, Mapping[str, Any]] | None = None) -> Method:
  """Builds the method ``name``: one registered name, or several joined by ``+`` (a `chain`).

  Args:
    name: a key of `REGISTRY`, or keys joined by ``+`` (chained in that order).
    hparams: keyword hyperparameters of a single method (the config's ``<name>`` block).
    input_shape: the shape of one input of the experiment's stream, e.g. (28, 28, 1). Passed to
      methods whose state depends on it (`replay`'s buffer) unless their block sets it.
    blocks: ``{member: hyperparameters}`` for a ``+`` name (a config: each member's block).

  Raises:
    ValueError: unknown method name, a hyperparameter the method does not take (named with its
      config key, ``<method>.<key>``), a bad value (named likewise), or an ``input_shape``
      hyperparameter that differs from the stream's.
  """
  parts = members(name)
  if len(parts) == 1:
    return _build(parts[0], hparams if hparams is not None else (blocks or {}).get(parts[0]),
                  input_shape)
  if hparams is not None:
    raise ValueError(f'{name!r} is a chain: pass each member\'s hyperparameters in `blocks`')
  return chain(*(_build(p, (blocks or {}).get(p), input_shape) for p in parts))


__all__ = ['Batch', 'Method', 'REGISTRY', 'base', 'chain', 'check_names', 'coso', 'ewc',
           'finetune', 'get', 'gpm', 'hyperparameters', 'joint', 'l2', 'lwf', 'mas', 'members',
           'online_ewc', 'osft', 'projection', 'refresh', 'regularizers', 'replay', 'si']
