"""The Linen modules behind the HF architectures: hand-computed pieces and the registry entry."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import models
from cljax.models import lm


def _init(module, shape):
  """Jitted ``init`` (one compile; eager Linen init compiles every op on its own)."""
  return jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, *shape)))['params']


def test_llama3_rope_frequencies_by_hand():
  config = lm.LMConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                       rope_theta=10000.0,
                       rope_scaling=(('factor', 4.0), ('high_freq_factor', 4.0),
                                     ('low_freq_factor', 1.0),
                                     ('original_max_position_embeddings', 8.0)))
  # Plain: theta^(-2i/8) = 1, 0.1, 0.01, 0.001; wavelengths 2 pi / f = 6.28, 62.8, 628, 6283.
  # Longer than 8 / low_freq_factor = 8: divided by the factor 4. Between 8 / 4 = 2 and 8: mixed
  # with s = (8 / 6.2832 - 1) / (4 - 1) as (1 - s) f / 4 + s f.
  s = (8 / (2 * math.pi) - 1) / 3
  expected = [(1 - s) * 0.25 + s, 0.1 / 4, 0.01 / 4, 0.001 / 4]
  np.testing.assert_allclose(lm.rope_inv_freq(config), expected, rtol=1e-6)
  plain = lm.LMConfig(**{**config.__dict__, 'rope_scaling': None})
  np.testing.assert_allclose(lm.rope_inv_freq(plain), [1, 0.1, 0.01, 0.001], rtol=1e-6)


def test_rms_norm_by_hand():
  x = np.array([[3.0, 4.0]], np.float32)
  out = lm.RMSNorm(eps=0.0).apply({'params': {'scale': jnp.array([1.0, 2.0])}}, x)
  rms = math.sqrt((9 + 16) / 2)
  np.testing.assert_allclose(out, [[3 / rms, 8 / rms]], rtol=1e-6)


def test_vit_from_the_registry_classifies_fashion_mnist_sized_images():
  module = models.make_model('vit', num_outputs=10, patch_size=7, hidden_size=16,
                             num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
  params = _init(module, (28, 28, 1))
  assert params['vit']['embeddings']['position_embeddings'].shape == (1, 16 + 1, 16)
  assert params['head']['kernel'].shape == (16, 10)
  assert jax.jit(models.linen_apply_fn(module))(params, jnp.zeros((3, 28, 28, 1))).shape == (3, 10)
  with pytest.raises(ValueError, match=r'do not split into 5x5 patches \(patch_size\)'):
    _init(models.make_model('vit', num_outputs=10, patch_size=5), (28, 28, 1))


def test_vit_dropout_needs_rngs_only_in_training():
  module = models.make_model('vit', num_outputs=3, patch_size=4, hidden_size=8,
                             num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                             dropout_rate=0.5)
  params = _init(module, (8, 8, 1))
  apply_fn = jax.jit(models.linen_apply_fn(module), static_argnames='train')
  x = np.random.default_rng(1).normal(size=(2, 8, 8, 1)).astype(np.float32)
  eval_out = apply_fn(params, x)
  a = apply_fn(params, x, train=True, rngs=jax.random.key(2))
  b = apply_fn(params, x, train=True, rngs=jax.random.key(3))
  assert not np.allclose(a, b) and not np.allclose(a, eval_out)
  np.testing.assert_array_equal(a, apply_fn(params, x, train=True, rngs=jax.random.key(2)))


@pytest.mark.parametrize('name', ['qwen3', 'llama'])
def test_lm_from_the_registry_has_the_hand_counted_parameters(name):
  module = models.make_model(name, num_outputs=50)
  params = _init(module, (8,))   # float zeros: cast to token ids
  d, heads, kv, hd, ff, layers, vocab = 64, 4, 2, 16, 192, 2, 50
  per_layer = (2 * d + d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * ff
               + (2 * hd if name == 'qwen3' else 0))
  head = 0 if name == 'qwen3' else d * vocab   # Qwen3 ties the output to the embedding
  assert sum(x.size for x in jax.tree.leaves(params)) == vocab * d + layers * per_layer + d + head
  assert ('head' in params) == (name == 'llama')
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % vocab
  assert jax.jit(models.linen_apply_fn(module))(params, tokens).shape == (2, 8, vocab)
  with pytest.raises(ValueError, match=r"model 'qwen3' has no attribute\(s\) \['hidden'\]"):
    models.make_model('qwen3', num_outputs=50, hidden=(3,))
