"""Orbax checkpoints as `cljax-merge` inputs: layouts, merges against NumPy, errors, laziness.

Inputs are written with Orbax itself (``PyTreeCheckpointer``, ``StandardCheckpointer``) and with
`cljax.checkpoint.StageCheckpointer` as the merge experiment saves its models; outputs are read
back with safetensors' `safe_open`. References are NumPy computations of the merge formulas on the
original arrays.
"""

from __future__ import annotations

import os
import shutil
import textwrap

from etils import epath
import jax
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

from cljax import checkpoint
from cljax.runners import merge as merge_experiment
from cljax import models as models_lib
from cljax import sharding
from cljax.merge_io import checkpoint_merge
from cljax.merge_io import cli
from cljax.merge_io import mergekit_config
from cljax.merge_io import safetensors_reader
from cljax.methods import base as methods_base
from cljax.methods import regularizers
from .reference import np_magnitude, np_trim, np_weighted_disjoint_mean, read_folder

SMALL_BLOCKS = 13   # several row blocks per (20, 6) / (6, 5) tensor


def random_tree(rng, scale=1.0, base=None):
  """A nested params pytree (a list, a 0-d leaf, an int buffer); ``base`` + noise if given."""
  if base is None:
    return {'embed': rng.standard_normal((20, 6)).astype(np.float32),
            'layers': [{'w': rng.standard_normal((6, 5)).astype(np.float32),
                        'b': rng.standard_normal((5,)).astype(np.float32)}],
            'scale': np.asarray(rng.standard_normal(), np.float32),
            'ids': np.arange(7, dtype=np.int32)}
  return jax.tree.map(lambda x: x if x.dtype.kind == 'i' else
                      (x + scale * rng.standard_normal(x.shape)).astype(x.dtype), base)


def flat(tree):
  """'/'-joined path -> array, as cljax.tree.path_str names leaves (written out, not imported)."""
  out = {}
  for key_path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out['/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in key_path)] = np.asarray(x)
  return out


FLOAT_NAMES = ['embed', 'layers/0/w', 'layers/0/b', 'scale']


def save_pytree(path, tree):
  ocp.PyTreeCheckpointer().save(str(path), tree)
  return str(path)


def save_standard(path, tree):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(path), tree)
  return str(path)


def save_stage(directory, tree, step=1):
  """As `cljax.runners.merge.train_model` saves a model: one stage holding {'params': ...}."""
  with checkpoint.StageCheckpointer(str(directory)) as ckpt:
    ckpt.save(step, {'params': tree}, {'name': 'expert'})
  return os.path.join(str(directory), str(step))




def config_of(method, base, paths, *, weights=None, densities=None, **kw):
  weights = weights or [1.0] * len(paths)
  densities = densities or [1.0] * len(paths)
  specs = tuple(mergekit_config.ModelSpec(p, w, d) for p, w, d in zip(paths, weights, densities))
  return mergekit_config.MergeConfig(method=method, base_model=base, models=specs, **kw)


def merge(config, out, **kw):
  return checkpoint_merge.merge_checkpoints(config, str(out), progress=False, **kw)






# ------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('layout', ['pytree', 'standard', 'stage_step', 'stage_item'])
def test_layouts_list_names_shapes_dtypes_and_read_rows(tmp_path, layout):
  tree = random_tree(np.random.default_rng(0))
  tree['half'] = np.arange(6, dtype=np.float32).reshape(3, 2).astype(ml_dtypes.bfloat16)
  prefix = ''
  if layout == 'pytree':
    path = save_pytree(tmp_path / 'ck', tree)
  elif layout == 'standard':
    path = save_standard(tmp_path / 'ck', tree)
  else:
    path, prefix = save_stage(tmp_path / 'stages', tree, step=3), 'params/'
    if layout == 'stage_item':
      path = os.path.join(path, 'state')
  ckpt = safetensors_reader.open_checkpoint(path)
  assert isinstance(ckpt, safetensors_reader.OrbaxCheckpoint) and ckpt.folder is None
  expected = {prefix + k: v for k, v in flat(tree).items()}
  assert list(ckpt.tensors) == sorted(expected)   # pytree flattening order: sorted dict keys
  for name, x in expected.items():
    info = ckpt.tensors[name]
    assert (info.shape, info.dtype) == (x.shape, x.dtype), name
    np.testing.assert_array_equal(ckpt.read(name), x)
  np.testing.assert_array_equal(ckpt.read(prefix + 'embed', 4, 9), tree['embed'][4:9])
  np.testing.assert_array_equal(ckpt.read(prefix + 'scale', 0, 1), tree['scale'])
  with pytest.raises(KeyError, match="has no tensor 'nope'"):
    ckpt.read('nope')


def test_checkpoint_module_lists_and_reads_one_array(tmp_path):
  tree = random_tree(np.random.default_rng(1))
  tree['note'] = 'not an array'
  path = save_pytree(tmp_path / 'ck', tree)
  arrays = checkpoint.list_arrays(path)
  assert arrays['layers/0/w'] == checkpoint.ArrayInfo((6, 5), np.dtype(np.float32))
  assert 'note' not in arrays and checkpoint.PyTreeArrays(path).skipped == ['note']
  np.testing.assert_array_equal(checkpoint.read_array(path, 'layers/0/w'), tree['layers'][0]['w'])
  np.testing.assert_array_equal(checkpoint.read_array(path, 'ids'), tree['ids'])


def test_stage_root_names_the_step_to_use(tmp_path):
  tree = random_tree(np.random.default_rng(0))
  save_stage(tmp_path / 'stages', tree, step=1)
  save_stage(tmp_path / 'stages', tree, step=2)
  with pytest.raises(ValueError, match=r'checkpoint folder with steps \[1, 2\]; point at one '
                                       r'step, e\.g\. .*stages/2'):
    safetensors_reader.open_checkpoint(str(tmp_path / 'stages'))


# ------------------------------------------------------------------------------------------
# Merges equal NumPy computations
# ------------------------------------------------------------------------------------------


@pytest.fixture
def orbax_models(tmp_path):
  """An Orbax base (PyTreeCheckpointer) and three models in the other layouts."""
  rng = np.random.default_rng(2)
  base = random_tree(rng)
  tuned = [random_tree(rng, 0.1, base) for _ in range(3)]
  base_path = save_pytree(tmp_path / 'base', base)
  paths = [save_standard(tmp_path / 'm0', tuned[0]), save_pytree(tmp_path / 'm1', tuned[1]),
           save_pytree(tmp_path / 'm2', tuned[2])]
  return tmp_path, flat(base), [flat(t) for t in tuned], base_path, paths


@pytest.mark.parametrize('block_entries', [checkpoint_merge.DEFAULT_BLOCK_ENTRIES, SMALL_BLOCKS])
def test_weighted_task_arithmetic_of_orbax_models(orbax_models, block_entries):
  tmp, base, tuned, base_path, paths = orbax_models
  w = [0.5, 1.0, -0.3]
  merge(config_of('task_arithmetic', base_path, paths, weights=w, scaling=0.8), tmp / 'out',
        block_entries=block_entries, max_shard_size=600)
  out = read_folder(str(tmp / 'out'))
  assert set(out) == set(base)
  for name in FLOAT_NAMES:
    b = base[name].astype(np.float64)
    expected = b + 0.8 * sum(wi * (m[name] - b) for wi, m in zip(w, tuned))
    np.testing.assert_allclose(out[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
    assert out[name].dtype == np.float32
  np.testing.assert_array_equal(out['ids'], base['ids'])   # not floating: the base's values
  assert out['ids'].dtype == np.int32
  assert not os.path.exists(tmp / 'out' / 'config.json')   # an Orbax base has none to copy


@pytest.mark.parametrize('trim,block_entries', [
    ('per_tensor', SMALL_BLOCKS), ('per_tensor', checkpoint_merge.DEFAULT_BLOCK_ENTRIES),
    ('global', SMALL_BLOCKS)])
def test_normalized_weighted_ties_of_orbax_models(orbax_models, trim, block_entries):
  tmp, base, tuned, base_path, paths = orbax_models
  w, d = [1.0, 0.5, 0.25], [0.3, 0.5, 0.8]
  config = config_of('ties', base_path, paths, weights=w, densities=d, scaling=0.9,
                     normalize=True, trim=trim)
  merge(config, tmp / 'out', block_entries=block_entries)
  out = read_folder(str(tmp / 'out'))
  if trim == 'global':   # one threshold per model over every merged tensor
    sizes = [base[n].size for n in FLOAT_NAMES]
    tvs = [np.concatenate([(m[n].astype(np.float64) - base[n]).reshape(-1) for n in FLOAT_NAMES])
           for m in tuned]
    trimmed = [np.split(np_trim(tv, di), np.cumsum(sizes)[:-1]) for tv, di in zip(tvs, d)]
  for j, name in enumerate(FLOAT_NAMES):
    b = base[name].astype(np.float64)
    if trim == 'global':
      xs = [wi * t[j].reshape(b.shape) for wi, t in zip(w, trimmed)]
    else:
      xs = [wi * np_magnitude(m[name] - b, di) for wi, di, m in zip(w, d, tuned)]
    expected = b + 0.9 * np_weighted_disjoint_mean(xs, w)
    np.testing.assert_allclose(out[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_merge_experiment_models_merge_through_the_command_line(tmp_path, monkeypatch):
  """Base and experts trained and saved by `cljax.runners.merge.train_model` (a stage holding
  {'params': flax params}); the YAML names step folders and an item folder."""
  module = models_lib.MLP(hidden=(8,), num_outputs=3)
  init = models_lib.init_params(module, jax.random.key(0), (4,))
  trainer = merge_experiment.Trainer(models_lib.linen_apply_fn(module), regularizers.finetune(),
                                     optax.sgd(0.5), epochs=1, batch_size=8,
                                     mesh=sharding.make_mesh(1))
  rng = np.random.default_rng(3)

  def data():
    return methods_base.Batch(rng.standard_normal((16, 4)).astype(np.float32),
                              rng.integers(0, 3, 16).astype(np.int32), np.ones((16, 3), bool))

  models_dir = tmp_path / 'models'
  params = merge_experiment.train_model(str(models_dir / 'base'), trainer, init, data(), seed=0,
                                        name='base')
  experts = [merge_experiment.train_model(str(models_dir / f'expert{t}'), trainer, params, data(),
                                          seed=t + 1, name=f'expert{t}') for t in range(2)]
  (tmp_path / 'merge.yml').write_text(textwrap.dedent("""\
      merge_method: task_arithmetic
      base_model: models/base/1
      models:
        - model: models/expert0/1
          parameters: {weight: 0.7}
        - model: models/expert1/1/state
          parameters: {weight: 0.4}
      parameters: {lambda: 0.5}
      exclude: ['params/head/.*']
      """))
  monkeypatch.chdir(tmp_path)
  assert cli.main(['merge.yml', 'merged', '--no-progress']) == 0
  out = read_folder(str(tmp_path / 'merged'))
  base, tuned = flat({'params': params}), [flat({'params': e}) for e in experts]
  assert all(not np.array_equal(t['params/dense0/kernel'], base['params/dense0/kernel'])
             for t in tuned)   # training moved the experts away from the base
  assert set(out) == {'params/dense0/kernel', 'params/dense0/bias', 'params/head/kernel',
                      'params/head/bias'}
  for name in out:
    b = base[name].astype(np.float64)
    if name.startswith('params/head/'):
      np.testing.assert_array_equal(out[name], base[name])
      continue
    expected = b + 0.5 * (0.7 * (tuned[0][name] - b) + 0.4 * (tuned[1][name] - b))
    np.testing.assert_allclose(out[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
  assert (tmp_path / 'merged' / 'cljax_merge.yml').exists()


def test_orbax_base_with_safetensors_models(tmp_path):
  rng = np.random.default_rng(4)
  base = random_tree(rng)
  tuned = [flat(random_tree(rng, 0.1, base)) for _ in range(2)]
  base_path = save_pytree(tmp_path / 'base', base)
  paths = []
  for i, tree in enumerate(tuned):
    os.makedirs(tmp_path / f'hf{i}')
    save_file(tree, str(tmp_path / f'hf{i}' / 'model.safetensors'))
    paths.append(str(tmp_path / f'hf{i}'))
  base = flat(base)
  merge(config_of('linear', base_path, paths, weights=[3.0, 1.0], normalize=True), tmp_path / 'o')
  out = read_folder(str(tmp_path / 'o'))
  for name in FLOAT_NAMES:
    expected = (3.0 * tuned[0][name].astype(np.float64) + tuned[1][name]) / 4.0
    np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)
  np.testing.assert_array_equal(out['ids'], base['ids'])
  # Names that do not line up (HF-style dots against pytree paths) name the tensor.
  os.makedirs(tmp_path / 'dots')
  save_file({k.replace('/', '.'): v for k, v in tuned[0].items()},
            str(tmp_path / 'dots' / 'model.safetensors'))
  with pytest.raises(ValueError, match=r"tensor 'layers/0/b' is in the base model .*base but not "
                                       r'in .*dots'):
    merge(config_of('linear', base_path, [str(tmp_path / 'dots')]), tmp_path / 'o2')
  assert not (tmp_path / 'o2').exists()


# ------------------------------------------------------------------------------------------
# Broken checkpoints name the file
# ------------------------------------------------------------------------------------------


def test_corrupt_metadata_names_the_file_and_leaves_no_output(orbax_models):
  tmp, base, tuned, base_path, paths = orbax_models
  with open(os.path.join(paths[1], '_METADATA'), 'w') as f:
    f.write('{not json')
  pattern = rf'{paths[1]} is not a readable Orbax PyTree checkpoint .*{paths[1]}/_METADATA'
  with pytest.raises(ValueError, match=pattern):
    safetensors_reader.open_checkpoint(paths[1])
  with pytest.raises(ValueError, match=pattern):
    merge(config_of('task_arithmetic', base_path, paths), tmp / 'out')
  assert not (tmp / 'out').exists()
  assert [n for n in os.listdir(tmp) if n.startswith('.')] == []


def test_missing_metadata_unfinished_save_and_empty_step(tmp_path):
  path = save_pytree(tmp_path / 'ck', random_tree(np.random.default_rng(0)))
  os.remove(os.path.join(path, '_METADATA'))
  with pytest.raises(ValueError, match=rf'{path} is not a readable Orbax PyTree checkpoint: no '
                                       r'_METADATA'):
    safetensors_reader.open_checkpoint(path)
  tmp_save = str(tmp_path / f'ck2{ocp.utils.TMP_DIR_SUFFIX}-123')
  save_pytree(tmp_path / 'ck3', random_tree(np.random.default_rng(0)))
  shutil.copytree(tmp_path / 'ck3', tmp_save)
  with pytest.raises(ValueError, match='is an unfinished Orbax save'):
    safetensors_reader.open_checkpoint(tmp_save)


def test_missing_array_data_names_the_array(tmp_path):
  """A checkpoint whose one array lost its data: listing and the other arrays still work (lazy),
  reading that array names it and the folder."""
  tree = random_tree(np.random.default_rng(5))
  path = str(tmp_path / 'ck')
  ocp.PyTreeCheckpointHandler(use_ocdbt=False).save(epath.Path(path),
                                                    args=ocp.args.PyTreeSave(tree))
  chunks = [f for f in os.listdir(os.path.join(path, 'layers.0.w')) if not f.startswith('.')]
  assert chunks   # one folder per array without OCDBT: its .zarray metadata and data chunks
  for chunk in chunks:
    os.remove(os.path.join(path, 'layers.0.w', chunk))
  ckpt = safetensors_reader.open_checkpoint(path)   # metadata only ...
  np.testing.assert_array_equal(ckpt.read('embed'), tree['embed'])   # ... other arrays read fine
  with pytest.raises(ValueError, match=rf"{path}: array 'layers/0/w' cannot be read"):
    ckpt.read('layers/0/w')


# ------------------------------------------------------------------------------------------
# Laziness
# ------------------------------------------------------------------------------------------


def test_reading_one_tensor_restores_only_that_array(tmp_path, monkeypatch):
  tree = random_tree(np.random.default_rng(6))
  path = save_pytree(tmp_path / 'ck', tree)
  restored = []
  real = ocp.type_handlers.NumpyHandler.deserialize

  async def spy(self, infos, args=None):
    restored.append(sorted(info.name for info in infos))
    return await real(self, infos, args)

  monkeypatch.setattr(ocp.type_handlers.NumpyHandler, 'deserialize', spy)
  ckpt = safetensors_reader.open_checkpoint(path)
  assert restored == []   # opening reads metadata only
  block = ckpt.read('embed', 0, 5)
  assert restored == [['embed']]
  np.testing.assert_array_equal(block, tree['embed'][:5])
  assert not block.flags.writeable   # a view of the held tensor: nobody may change it
  np.testing.assert_array_equal(ckpt.read('embed', 5, 20), tree['embed'][5:])
  assert restored == [['embed']]   # later blocks of the held tensor: no new restore
  np.testing.assert_array_equal(ckpt.read('layers/0/b'), tree['layers'][0]['b'])
  assert restored == [['embed'], ['layers.0.b']]


def test_a_merge_restores_each_tensor_of_each_model_once(orbax_models, monkeypatch):
  tmp, base, tuned, base_path, paths = orbax_models
  restored = []
  real = ocp.type_handlers.NumpyHandler.deserialize

  async def spy(self, infos, args=None):
    restored.extend((str(info.parent_dir), info.name) for info in infos)
    return await real(self, infos, args)

  monkeypatch.setattr(ocp.type_handlers.NumpyHandler, 'deserialize', spy)
  merge(config_of('task_arithmetic', base_path, paths), tmp / 'out', block_entries=SMALL_BLOCKS)
  names = ['embed', 'ids', 'layers.0.b', 'layers.0.w', 'scale']
  assert sorted(restored) == sorted((p, n) for p in [base_path] + paths for n in names
                                    if n != 'ids' or p == base_path)
