"""Flax Linen classifiers (MLP, CNN) and the ``(apply_fn, params)`` pair every algorithm takes.

Every model's last layer is named ``head`` so that regex rules (``'head/.*'``) can select it: a
task-incremental stream gives each task a disjoint block of the head's outputs (see
`cljax.methods.base.Batch.mask`), which is the multi-head setting with one shared output layer.
Models are looked up by name in `cljax.models.REGISTRY`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any


class MLP(nn.Module):
  """Fully connected network on flattened inputs.

  ``MLP(hidden=(100, 100), num_outputs=10, use_bias=False)`` is the 784-100-100-10 network of the
  GPM permuted-MNIST protocol (Saha et al., ICLR 2021).

  Attributes:
    hidden: widths of the hidden layers (ReLU).
    num_outputs: size of the output layer ``head``.
    use_bias: whether Dense layers have biases.
    dropout_rate: inverted dropout after every hidden ReLU when ``train=True`` (Srivastava et al.,
      JMLR 2014); it draws from the ``'dropout'`` stream, so training needs ``rngs`` (a key or
      ``{'dropout': key}``). 0 (the default) is the plain network, the same in train and eval.
  """

  hidden: Sequence[int] = (100, 100)
  num_outputs: int = 10
  use_bias: bool = True
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, use_bias=self.use_bias, name=f'dense{i}')(x))
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_outputs, use_bias=self.use_bias, name='head')(x)


class CNN(nn.Module):
  """Small convolutional network: [conv3x3 -> ReLU -> 2x2 max-pool] per stage, then Dense layers.

  Attributes:
    channels: output channels of each conv stage.
    hidden: widths of the Dense layers after the conv stages.
    num_outputs: size of the output layer ``head``.
    use_bias: whether layers have biases.
  """

  channels: Sequence[int] = (32, 64)
  hidden: Sequence[int] = (128,)
  num_outputs: int = 10
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    for i, ch in enumerate(self.channels):
      x = nn.Conv(ch, (3, 3), padding='SAME', use_bias=self.use_bias, name=f'conv{i}')(x)
      x = nn.relu(x)
      if min(x.shape[1:3]) >= 2:  # 8x8 digits run out of resolution before 28x28 images do.
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, use_bias=self.use_bias, name=f'dense{i}')(x))
    return nn.Dense(self.num_outputs, use_bias=self.use_bias, name='head')(x)


def linen_apply_fn(module: nn.Module) -> Callable[..., jax.Array]:
  """Turns a Linen module into ``apply_fn(params, x, *, train=False, rngs=None) -> logits``.

  ``params`` is the module's ``'params'`` collection itself (not ``{'params': ...}``), so task
  vectors, Fishers and bases are pytrees of exactly the trainable weights. ``rngs`` goes to
  ``module.apply`` unchanged: a ``{'dropout': key}`` dict, or one key, which Flax uses for every
  stream the module draws from (dropout included). A module with dropout needs it when
  ``train=True``; with ``train=False`` it is not used.

  Args:
    module: a Linen module whose ``__call__`` takes ``(x, *, train)``.

  Returns:
    ``apply_fn(params, x, *, train=False, rngs=None)`` returning the module's output (logits).
  """

  def apply_fn(params: Params, x: jax.Array, *, train: bool = False, rngs: Any = None) -> jax.Array:
    return module.apply({'params': params}, x, train=train, rngs=rngs)

  return apply_fn


def init_params(module: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> Params:
  """Initialises the ``'params'`` collection for inputs of shape (1, *input_shape), float32.

  Args:
    module: a Linen module.
    key: PRNG key of the initialisation.
    input_shape: one example's shape, e.g. (28, 28, 1).

  Returns:
    The ``'params'`` collection (a nested dict of float32 arrays).
  """
  return module.init(key, jnp.zeros((1, *input_shape), jnp.float32))['params']
