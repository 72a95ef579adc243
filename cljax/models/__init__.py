"""Models: the ``(apply_fn, params)`` pair, a registry of bundled modules, Hugging Face checkpoints.

A model is ``apply_fn(params, x, *, train=False, rngs=None) -> logits`` ((B, K) or (B, L, V)) and
its ``params`` pytree. `make_model` builds a registered module by name (``REGISTRY``; a new model
is one file plus one line in `cljax.models.registry`), `linen_apply_fn` and `init_params` turn a
Linen module into the pair. `from_pretrained` / `save_pretrained` read and write Hugging Face
model folders (Qwen3 / Llama causal LMs, ViT image classifiers; ``hf.ARCHITECTURES``).
"""

from cljax.models.hf import ARCHITECTURES, from_pretrained, save_pretrained
from cljax.models.linen import CNN, MLP, init_params, linen_apply_fn
from cljax.models.lm import CausalLM, LMConfig
from cljax.models.registry import REGISTRY, make_model
from cljax.models.vit import ViTClassifier

MODELS = REGISTRY  # The name this mapping had before the registry module.

__all__ = ['ARCHITECTURES', 'CNN', 'CausalLM', 'LMConfig', 'MLP', 'MODELS', 'REGISTRY',
           'ViTClassifier', 'from_pretrained', 'init_params', 'linen_apply_fn', 'make_model',
           'save_pretrained']
