"""Models: the ``(apply_fn, params)`` pair, a registry of bundled modules, Hugging Face checkpoints.

A model is ``apply_fn(params, x, *, train=False, rngs=None) -> logits`` ((B, K) or (B, L, V)) and
its ``params`` pytree. `make_model` builds a registered module by name (``REGISTRY``; a new model
is one file plus one line in `cljax.models.registry`), `linen_apply_fn` and `init_params` turn a
Linen module into the pair.
"""

from cljax.models.linen import CNN, MLP, init_params, linen_apply_fn
from cljax.models.registry import REGISTRY, make_model

MODELS = REGISTRY  # The name this mapping had before the registry module.

__all__ = ['CNN', 'MLP', 'MODELS', 'REGISTRY', 'init_params', 'linen_apply_fn', 'make_model']
