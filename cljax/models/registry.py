"""Models by name: ``REGISTRY`` maps a config's ``model`` string to a module constructor.

A new model is one file in `cljax.models` plus one line here. Every constructor takes
``num_outputs`` (the size of the output layer ``head``; an LM's vocabulary) and keyword-only
attributes: a Linen class, or a function returning a module.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from cljax.models import linen
from cljax.models import lm
from cljax.models import vit

REGISTRY: dict = {
    'mlp': linen.MLP,
    'cnn': linen.CNN,
    'vit': vit.ViTClassifier,
    'qwen3': lm.qwen3,
    'llama': lm.llama,
}


def _fields(constructor: Callable[..., Any]) -> set:
  """The keyword attributes a constructor takes (a Linen class's fields, a function's keywords)."""
  if hasattr(constructor, '__dataclass_fields__'):
    return set(constructor.__dataclass_fields__) - {'parent', 'name'}
  return {name for name, p in inspect.signature(constructor).parameters.items()
          if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def make_model(name: str, *, num_outputs: int, **kwargs: Any) -> Any:
  """Builds a registered model by name.

  Args:
    name: a key of ``REGISTRY`` (config key ``model``), e.g. 'mlp', 'cnn', 'vit', 'qwen3', 'llama'.
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
