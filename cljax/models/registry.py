"""Models by name: ``REGISTRY`` maps a config's ``model`` string to a module constructor.

A new model is one file in `cljax.models` plus one line here. Every constructor takes
``num_outputs`` (the size of the output layer ``head``) and keyword-only attributes.
"""

from __future__ import annotations

from typing import Any, Callable

from cljax.models import linen
from cljax.models import vit

REGISTRY: dict = {
    'mlp': linen.MLP,
    'cnn': linen.CNN,
    'vit': vit.ViTClassifier,
}


def _fields(constructor: Callable[..., Any]) -> set:
  """The keyword attributes a constructor takes (a Linen class's dataclass fields)."""
  return set(getattr(constructor, '__dataclass_fields__', ())) - {'parent', 'name'}


def make_model(name: str, *, num_outputs: int, **kwargs: Any) -> Any:
  """Builds a registered model by name.

  Args:
    name: a key of ``REGISTRY`` (config key ``model``), e.g. 'mlp', 'cnn', 'vit'.
    num_outputs: size of the output layer.
    **kwargs: the model's attributes (e.g. ``hidden``, ``channels``, ``use_bias``).

  Returns:
    The module (for Linen models, pass it to `linen_apply_fn` and `init_params`).

  Raises:
    ValueError: unknown name (naming the config key ``model`` and the choices) or attribute.
  """
  if name not in REGISTRY:
    raise ValueError(f'unknown model {name!r} (config key `model`); choose one of '
                     f'{sorted(REGISTRY)}')
  constructor = REGISTRY[name]
  fields = _fields(constructor)
  unknown = set(kwargs) - fields
  if unknown:
    raise ValueError(f'model {name!r} has no attribute(s) {sorted(unknown)} (config key '
                     f'`model_kwargs`); it takes {sorted(fields - {"num_outputs"})}')
  return constructor(num_outputs=num_outputs, **kwargs)
