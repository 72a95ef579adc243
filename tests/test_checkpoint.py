"""Stage checkpoints: exact round trip of NamedTuple states, no overwrite, structure mismatch."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import checkpoint


class S(NamedTuple):
  a: jax.Array
  b: dict


def _state(x):
  return dict(params={'w': jnp.full((3, 2), x)}, method_state=S(jnp.arange(4) * x, {'c': jnp.ones(2)}),
              rng=jax.random.key_data(jax.random.key(7)))


def test_round_trip_latest_and_meta(tmp_path):
  with checkpoint.StageCheckpointer(str(tmp_path / 'ckpt')) as ckpt:
    assert ckpt.latest_step() is None
    ckpt.save(1, _state(1.0), {'accuracy_rows': [[0.5]]})
    ckpt.save(2, _state(2.0), {'accuracy_rows': [[0.5], [0.25, 0.75]]})
  with checkpoint.StageCheckpointer(str(tmp_path / 'ckpt')) as ckpt:
    assert ckpt.latest_step() == 2
    stage = ckpt.restore(2, _state(0.0))
  chex.assert_trees_all_equal(stage.state, _state(2.0))
  assert isinstance(stage.state['method_state'], S)
  assert stage.meta == {'accuracy_rows': [[0.5], [0.25, 0.75]]}


def test_refuses_to_overwrite(tmp_path):
  with checkpoint.StageCheckpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _state(1.0), {})
    with pytest.raises(FileExistsError, match='stage 1 already exists'):
      ckpt.save(1, _state(3.0), {})
    np.testing.assert_array_equal(ckpt.restore(1, _state(0.0)).state['params']['w'], 1.0)


def test_mismatched_target(tmp_path):
  with checkpoint.StageCheckpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _state(1.0), {})
    with pytest.raises(ValueError, match='does not match'):
      ckpt.restore(1, dict(params={'w': jnp.zeros((5, 5))}))
