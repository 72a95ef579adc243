"""Bundled models: shapes, parameter counts, the head naming convention."""

import jax
import jax.numpy as jnp
import pytest

from cljax import models


def _count(params):
  return sum(x.size for x in jax.tree.leaves(params))


def test_gpm_mlp_has_no_bias_and_paper_size():
  module = models.make_model('mlp', num_outputs=10, hidden=(100, 100), use_bias=False)
  params = models.init_params(module, jax.random.key(0), (28, 28, 1))
  assert set(params) == {'dense0', 'dense1', 'head'}
  assert all(set(layer) == {'kernel'} for layer in params.values())
  assert _count(params) == 784 * 100 + 100 * 100 + 100 * 10
  logits = models.linen_apply_fn(module)(params, jnp.ones((3, 28, 28, 1)))
  assert logits.shape == (3, 10)


@pytest.mark.parametrize('shape', [(8, 8, 1), (28, 28, 1)])
def test_cnn_shapes(shape):
  module = models.make_model('cnn', num_outputs=20)
  params = models.init_params(module, jax.random.key(0), shape)
  assert params['head']['kernel'].shape[-1] == 20
  assert models.linen_apply_fn(module)(params, jnp.zeros((2, *shape))).shape == (2, 20)


def test_bad_model_name_and_attribute():
  with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
    models.make_model('resnet9000', num_outputs=10)
  with pytest.raises(ValueError, match='no attribute'):
    models.make_model('mlp', num_outputs=10, widths=(3,))
