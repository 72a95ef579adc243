"""Tests for cljax.merging.task_vectors and the shared input checks (cljax.merging.validation)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from cljax import merging
from cljax.merging import task_vectors as tvlib
from cljax.merging import validation


def _base():
  return {
      'backbone': {'kernel': jnp.array([[1.0, 2.0], [3.0, 4.0]]), 'bias': jnp.array([0.5, -0.5])},
      'head': {'kernel': jnp.array([[1.0], [-1.0]])},
  }


def _finetuned():
  return {
      'backbone': {'kernel': jnp.array([[2.0, 2.0], [1.0, 4.5]]), 'bias': jnp.array([0.0, 1.0])},
      'head': {'kernel': jnp.array([[3.0], [3.0]])},
  }


class TaskVectorTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_task_vector_by_hand(self):
    tv = self.variant(merging.task_vector)(_base(), _finetuned())
    expected = {
        'backbone': {'kernel': np.array([[1.0, 0.0], [-2.0, 0.5]]), 'bias': np.array([-0.5, 1.5])},
        'head': {'kernel': np.array([[2.0], [4.0]])},
    }
    chex.assert_trees_all_close(tv, expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_exclude_zeroes_the_head(self):
    tv = self.variant(lambda b, f: merging.task_vector(b, f, exclude='head/.*'))(
        _base(), _finetuned())
    np.testing.assert_array_equal(tv['head']['kernel'], np.zeros((2, 1)))
    np.testing.assert_allclose(tv['backbone']['bias'], [-0.5, 1.5])

  @chex.variants(with_jit=True, without_jit=True)
  def test_apply_by_hand(self):
    tv = {'backbone': {'kernel': jnp.ones((2, 2)), 'bias': jnp.array([2.0, 4.0])},
          'head': {'kernel': jnp.zeros((2, 1))}}
    out = self.variant(lambda b, t: merging.apply(b, t, scale=0.5))(_base(), tv)
    np.testing.assert_allclose(out['backbone']['kernel'], [[1.5, 2.5], [3.5, 4.5]])
    np.testing.assert_allclose(out['backbone']['bias'], [1.5, 1.5])
    np.testing.assert_array_equal(out['head']['kernel'], _base()['head']['kernel'])

  def test_apply_inverts_task_vector(self):
    out = merging.apply(_base(), merging.task_vector(_base(), _finetuned()))
    chex.assert_trees_all_close(out, _finetuned())

  def test_apply_keeps_bfloat16(self):
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _base())
    ft = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _finetuned())
    out = merging.apply(base, merging.task_vector(base, ft), scale=1.0)
    chex.assert_trees_all_equal_dtypes(out, base)
    chex.assert_trees_all_close(out, ft)

  def test_excluded_leaf_returns_base_after_apply(self):
    tv = merging.task_vector(_base(), _finetuned(), exclude=['head/kernel'])
    out = merging.apply(_base(), tv, scale=3.0)
    np.testing.assert_array_equal(out['head']['kernel'], _base()['head']['kernel'])


class PathAndMaskTest(parameterized.TestCase):

  def test_path_names(self):
    tree = {'a': [jnp.zeros(1), {'b': jnp.zeros(2)}], 'c': jnp.zeros(3)}
    self.assertEqual(merging.leaf_names(tree), ['a/0', 'a/1/b', 'c'])

  def test_mask_is_fullmatch(self):
    tree = {'head': {'kernel': jnp.zeros(1)}, 'backbone': {'head': {'kernel': jnp.zeros(1)},
                                                           'bias': jnp.zeros(1)}}
    mask = merging.merge_mask(tree, 'head/.*')
    self.assertEqual(mask, {'head': {'kernel': False},
                            'backbone': {'head': {'kernel': True}, 'bias': True}})
    mask = merging.merge_mask(tree, ['.*head/kernel', 'backbone/bias'])
    self.assertEqual(jax.tree.leaves(mask), [False, False, False])

  def test_no_exclude_merges_everything(self):
    self.assertTrue(all(jax.tree.leaves(merging.merge_mask(_base(), None))))

  def test_pattern_matching_nothing_raises(self):
    with pytest.raises(ValueError, match=r"'heads/\.\*' matches no parameter.*'backbone/bias'"):
      merging.merge_mask(_base(), 'heads/.*')
    with pytest.raises(ValueError, match=r"'nothing' matches no parameter"):
      merging.merge_mask(_base(), ['head/.*', 'nothing'])
    with pytest.raises(ValueError, match='matches no parameter'):
      merging.task_vector(_base(), _finetuned(), exclude='kernel')  # fullmatch: no bare 'kernel'

  def test_invalid_regex_raises(self):
    with pytest.raises(ValueError, match='not a valid regex'):
      merging.merge_mask(_base(), 'head/(')


class BadInputTest(parameterized.TestCase):

  def test_missing_leaf_names_path(self):
    ft = _finetuned()
    del ft['backbone']['bias']
    with pytest.raises(ValueError, match=r"\['backbone'\]\['bias'\]"):
      merging.task_vector(_base(), ft)

  def test_extra_leaf_names_path(self):
    ft = _finetuned()
    ft['zzz'] = jnp.zeros(1)
    with pytest.raises(ValueError, match=r"extra leaf \['zzz'\]"):
      merging.task_vector(_base(), ft)

  def test_renamed_leaf_names_both_paths(self):
    ft = _finetuned()
    ft['backbone']['bias2'] = ft['backbone'].pop('bias')
    with pytest.raises(ValueError, match=r"\['backbone'\]\['bias2'\].*\['backbone'\]\['bias'\]"):
      merging.task_vector(_base(), ft)

  def test_shape_mismatch_names_path(self):
    ft = _finetuned()
    ft['head']['kernel'] = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match=r"\['head'\]\['kernel'\]: shape \(1, 2\) != \(2, 1\)"):
      merging.task_vector(_base(), ft)

  def test_dtype_mismatch_names_path(self):
    ft = _finetuned()
    ft['backbone']['bias'] = ft['backbone']['bias'].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match=r"\['backbone'\]\['bias'\]: dtype bfloat16 != float32"):
      merging.task_vector(_base(), ft)

  def test_container_type_mismatch(self):
    with pytest.raises(ValueError, match='different container types'):
      validation.check_same_structure([jnp.zeros(1)], (jnp.zeros(1),))

  @parameterized.parameters(np.nan, np.inf, -np.inf)
  def test_non_finite_finetuned_names_path(self, bad):
    ft = _finetuned()
    ft['backbone']['kernel'] = ft['backbone']['kernel'].at[1, 0].set(bad)
    with pytest.raises(ValueError, match=r"finetuned has non-finite values at "
                                         r"\['backbone'\]\['kernel'\]"):
      merging.task_vector(_base(), ft)

  def test_nan_in_base_names_path(self):
    base = _base()
    base['head']['kernel'] = base['head']['kernel'].at[0, 0].set(np.nan)
    with pytest.raises(ValueError, match=r"base has non-finite values at \['head'\]\['kernel'\] "
                                         r"\(1 NaN, 0 Inf\)"):
      merging.task_vector(base, _finetuned())

  def test_nan_in_task_vector_for_apply(self):
    tv = jax.tree.map(jnp.zeros_like, _base())
    tv['backbone']['bias'] = tv['backbone']['bias'].at[0].set(np.nan)
    with pytest.raises(ValueError, match=r"tv has non-finite values at \['backbone'\]\['bias'\]"):
      merging.apply(_base(), tv)

  def test_non_finite_scale(self):
    with pytest.raises(ValueError, match='scale must be finite'):
      merging.apply(_base(), _base(), scale=float('inf'))

  def test_integer_leaf_must_be_excluded(self):
    base = {'w': jnp.zeros(2), 'step': jnp.zeros((), jnp.int32)}
    with pytest.raises(ValueError, match=r"non-floating leaf \['step'\]"):
      merging.task_vector(base, base)
    tv = merging.task_vector(base, base, exclude='step')
    self.assertEqual(tv['step'].dtype, jnp.int32)

  def test_finite_check_is_skipped_under_jit(self):
    # Documented: values are invisible while tracing; the eager call catches the NaN.
    ft = _finetuned()
    ft['head']['kernel'] = ft['head']['kernel'].at[0, 0].set(np.nan)
    tv = jax.jit(merging.task_vector)(_base(), ft)
    self.assertTrue(np.isnan(tv['head']['kernel'][0, 0]))
    with pytest.raises(ValueError, match='non-finite'):
      merging.check_finite(ft, name='finetuned')

  @parameterized.parameters(
      (-0.1, False, False), (1.5, False, False), (float('nan'), False, False), (0.0, True, False))
  def test_check_interval(self, value, low_open, high_open):
    with pytest.raises(ValueError, match='must lie in'):
      validation.check_interval(value, name='x', low=0.0, high=1.0, low_open=low_open,
                                high_open=high_open)

  def test_check_interval_rejects_non_scalars(self):
    with pytest.raises(ValueError, match='real scalar'):
      validation.check_fraction('0.5', name='density')
    with pytest.raises(ValueError, match='real scalar'):
      validation.check_fraction(np.array([0.5, 0.2]), name='density')

  def test_mask_paths_agree_with_combine(self):
    mask = merging.merge_mask(_base(), 'head/.*')
    inc = tvlib.included_leaves(_finetuned(), mask)
    out = tvlib.combine(_base(), mask, inc)
    np.testing.assert_array_equal(out['head']['kernel'], _base()['head']['kernel'])
    np.testing.assert_array_equal(out['backbone']['bias'], _finetuned()['backbone']['bias'])
