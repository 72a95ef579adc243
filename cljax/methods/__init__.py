"""Continual-training methods by name; each constructor returns a `Method` (see `base`)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from cljax.methods import base
from cljax.methods import regularizers
from cljax.methods import replay
from cljax.methods.base import Batch, Method
from cljax.methods.regularizers import ewc, finetune
from cljax.methods.replay import joint

REGISTRY: dict[str, Callable[..., Method]] = {
    'finetune': finetune,
    'joint': joint,
    'ewc': ewc,
}


def get(name: str, hparams: Mapping[str, Any] | None = None) -> Method:
  """Builds the method ``name`` with keyword hyperparameters ``hparams``.

  Raises:
    ValueError: unknown method name, or a hyperparameter the method does not take (named with
      its config key, ``<method>.<key>``).
  """
  if name not in REGISTRY:
    raise ValueError(f'unknown method {name!r} (config key `methods`); choose from {sorted(REGISTRY)}')
  ctor = REGISTRY[name]
  hparams = dict(hparams or {})
  accepted = set(inspect.signature(ctor).parameters)
  unknown = sorted(set(hparams) - accepted)
  if unknown:
    raise ValueError(f'unknown hyperparameter(s) {", ".join(f"{name}.{k}" for k in unknown)}; '
                     f'{name} takes {sorted(accepted) or "none"}')
  return ctor(**hparams)
