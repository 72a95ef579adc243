"""Bundled models: shapes, parameter counts, the head naming convention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


def test_unknown_model_names_config_key_and_choices():
  with pytest.raises(ValueError, match=r"config key `model`\); choose one of "
                                       r"\['cnn', 'llama', 'mlp', 'qwen3', 'vit'\]"):
    models.make_model('resnet9000', num_outputs=10)


def test_registry_lookup_builds_a_new_model_from_one_entry(monkeypatch):
  class Linear(nn.Module):
    num_outputs: int = 3

    @nn.compact
    def __call__(self, x, *, train=False):
      return nn.Dense(self.num_outputs, name='head')(x.reshape((x.shape[0], -1)))

  monkeypatch.setitem(models.REGISTRY, 'linear', Linear)
  module = models.make_model('linear', num_outputs=5)
  params = models.init_params(module, jax.random.key(0), (2, 3))
  assert params['head']['kernel'].shape == (6, 5)
  with pytest.raises(ValueError, match=r"'linear' has no attribute\(s\) \['hidden'\]"):
    models.make_model('linear', num_outputs=5, hidden=(3,))


def _dropout_mlp(rate):
  module = models.make_model('mlp', num_outputs=32, hidden=(16,), dropout_rate=rate)
  params = models.init_params(module, jax.random.key(0), (6,))
  return module, jax.tree.map(np.asarray, params)


def test_dropout_mlp_train_step_drops_hidden_units_with_rngs():
  rate = 0.5
  module, params = _dropout_mlp(rate)
  apply_fn = models.linen_apply_fn(module)
  x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  # numpy float64 reference: hidden ReLU units, then the head.
  w0, b0 = (params['dense0'][k].astype(np.float64) for k in ('kernel', 'bias'))
  w, b = (params['head'][k].astype(np.float64) for k in ('kernel', 'bias'))
  h = np.maximum(x @ w0 + b0, 0.0)
  np.testing.assert_allclose(apply_fn(params, x), h @ w + b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(apply_fn(params, x, rngs=jax.random.key(1)), h @ w + b,
                             rtol=1e-5, atol=1e-5)   # eval ignores rngs
  for rngs in (jax.random.key(1), {'dropout': jax.random.key(2)}):
    out = np.asarray(apply_fn(params, x, train=True, rngs=rngs), np.float64)
    # The head has full row rank (16 <= 32 outputs), so the dropped hidden layer is recoverable.
    h_drop = np.linalg.lstsq(w.T, (out - b).T, rcond=None)[0].T
    kept = np.isclose(h_drop, h / (1 - rate), rtol=1e-4, atol=1e-4)
    dropped = np.isclose(h_drop, 0.0, atol=1e-4)
    assert np.all(kept | dropped)
    live = h > 1e-3
    assert 0 < np.sum(dropped & live) < np.sum(live)   # some, not all, live units dropped
  a = apply_fn(params, x, train=True, rngs=jax.random.key(3))
  np.testing.assert_array_equal(a, apply_fn(params, x, train=True, rngs=jax.random.key(3)))
  assert not np.allclose(a, apply_fn(params, x, train=True, rngs=jax.random.key(4)))


def test_dropout_mlp_gradient_flows_only_through_kept_units():
  module, params = _dropout_mlp(0.5)
  apply_fn = models.linen_apply_fn(module)
  x = np.random.default_rng(1).normal(size=(1, 6)).astype(np.float32)
  key = jax.random.key(5)
  grads = jax.grad(lambda p: apply_fn(p, x, train=True, rngs=key).sum())(params)
  # d sum(logits) / d head kernel [j, :] = dropped-and-scaled hidden unit j: zero where dropped.
  out = np.asarray(apply_fn(params, x, train=True, rngs=key), np.float64)
  w, b = (params['head'][k].astype(np.float64) for k in ('kernel', 'bias'))
  h_drop = np.linalg.lstsq(w.T, (out - b).T, rcond=None)[0].T[0]
  np.testing.assert_allclose(grads['head']['kernel'], np.repeat(h_drop[:, None], 32, 1),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(Exception, match='dropout'):   # training without rngs is refused by Flax
    apply_fn(params, x, train=True)
