"""Stage checkpoints: exact round trip of NamedTuple states, no overwrite, structure mismatch."""

import os
import shutil
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


def _stage_files(step_dir):
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs)


def _saved(tmp_path):
  with checkpoint.StageCheckpointer(str(tmp_path / 'ckpt'), name='ewc') as ckpt:
    ckpt.save(1, _state(1.0), {'accuracy_rows': [[0.5]]})
    ckpt.save(2, _state(2.0), {'accuracy_rows': [[0.5], [0.25, 0.75]]})
  return tmp_path / 'ckpt' / '2'


def _truncate(path):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[: len(data) // 2])


def _garble(path):
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  for i in range(len(data) // 3, min(len(data), len(data) // 3 + 8)):
    data[i] ^= 0x5A
  with open(path, 'wb') as f:
    f.write(bytes(data))


def _damage_targets(step_dir):
  """The array data files (state/d/*), the tree metadata and the JSON meta of a stage."""
  data = [p for p in _stage_files(step_dir) if os.sep + os.path.join('state', 'd') + os.sep in p]
  assert data, _stage_files(step_dir)
  return data + [os.path.join(step_dir, 'state', '_METADATA'),
                 os.path.join(step_dir, 'meta', 'metadata')]


@pytest.mark.parametrize('damage', [_truncate, _garble, os.remove])
def test_damaged_stage_names_the_method_and_folder(tmp_path, damage):
  step_dir = _saved(tmp_path)
  for k in range(len(_damage_targets(step_dir))):
    shutil.rmtree(tmp_path / 'ckpt')
    step_dir = _saved(tmp_path)
    target = _damage_targets(step_dir)[k]
    if damage is os.remove and target.endswith('_METADATA'):
      continue   # Orbax restores a StandardSave item from its array metadata alone
    damage(target)
    with checkpoint.StageCheckpointer(str(tmp_path / 'ckpt'), name='ewc') as ckpt:
      with pytest.raises(ValueError) as info:
        ckpt.restore(2, _state(0.0))
      assert str(info.value) == (f'stage 2 of method ewc is damaged: {step_dir}; delete that '
                                 'folder to recompute it'), target
      np.testing.assert_array_equal(ckpt.restore(1, _state(0.0)).state['params']['w'], 1.0)
    shutil.rmtree(step_dir)   # what the message says to do: stage 1 is then the latest
    with checkpoint.StageCheckpointer(str(tmp_path / 'ckpt'), name='ewc') as ckpt:
      assert ckpt.latest_step() == 1


def test_intact_stage_of_another_model_is_a_mismatch_not_damage(tmp_path):
  _saved(tmp_path)
  with checkpoint.StageCheckpointer(str(tmp_path / 'ckpt'), name='ewc') as ckpt:
    other = dict(_state(0.0), params={'w': jnp.zeros((5, 5))})
    with pytest.raises(ValueError, match=r"does not match this run's model/method state: "
                                         r"'params/w' is stored with shape \(3, 2\)"):
      ckpt.restore(2, other)
