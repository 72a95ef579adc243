"""Tests for cljax.merge_io.checkpoint_merge: out-of-core merges equal the library's in-memory ones.

The inputs are tiny Hugging Face folders written with safetensors' own `save_file` (two shards and
an index); outputs are read back with `safe_open`. References are the library's merges applied to
the whole pytrees ``{name: array}``, or NumPy implementations of mergekit's formulas.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from cljax.merge_io import checkpoint_merge
from cljax.merging import continual
from cljax.merge_io import mergekit_config
from cljax.merge_io import recipes
from cljax.merge_io import safetensors_reader
from cljax.merging import static
from .reference import np_magnitude, np_trim, np_weighted_disjoint_mean, read_folder

SHAPES = {'model.embed.weight': (20, 6), 'model.layers.0.weight': (6, 5), 'model.norm': (6,),
          'scale': ()}
FLOAT_NAMES = list(SHAPES)
SMALL_BLOCKS = 13   # splits the (20, 6) and (6, 5) tensors into several row blocks


def write_folder(folder, tensors, *, shards=2, config=True):
  """A Hugging Face folder: tensors split over ``shards`` files + index (save_file, not ours)."""
  os.makedirs(folder)
  names = list(tensors)
  groups = [names[i::shards] for i in range(shards)]
  weight_map = {}
  for i, group in enumerate(groups):
    filename = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
    save_file({n: tensors[n] for n in group}, os.path.join(folder, filename),
              metadata={'format': 'pt'})
    weight_map.update({n: filename for n in group})
  with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': sum(t.nbytes for t in tensors.values())},
               'weight_map': weight_map}, f)
  if config:
    with open(os.path.join(folder, 'config.json'), 'w') as f:
      json.dump({'model_type': 'toy', 'torch_dtype': 'float32'}, f)
    with open(os.path.join(folder, 'tokenizer.json'), 'w') as f:
      f.write('{"toy": true}')
  return folder


def random_models(n=3, seed=0, dtype=np.float32, scale=0.1):
  rng = np.random.default_rng(seed)
  base = {k: np.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}
  models = [{k: np.asarray(v.astype(np.float32) + scale * rng.standard_normal(v.shape), dtype)
             for k, v in base.items()} for _ in range(n)]
  ids = np.arange(7, dtype=np.int64)
  return dict(base, position_ids=ids), [dict(m, position_ids=ids) for m in models]


@pytest.fixture
def folders(tmp_path):
  base, models = random_models()
  paths = [write_folder(str(tmp_path / 'base'), base)]
  paths += [write_folder(str(tmp_path / f'ft{i}'), m) for i, m in enumerate(models)]
  return tmp_path, base, models, paths




def f32(tree):
  return {k: np.asarray(v, np.float32) for k, v in tree.items() if k in FLOAT_NAMES}


def config_of(method, paths, *, weights=None, densities=None, **kw):
  weights = weights or [1.0] * (len(paths) - 1)
  densities = densities or [1.0] * (len(paths) - 1)
  models = [mergekit_config.ModelSpec(p, w, d) for p, w, d in zip(paths[1:], weights, densities)]
  return mergekit_config.MergeConfig(method=method, base_model=paths[0], models=tuple(models),
                                     **kw)


def run(config, out, **kw):
  return checkpoint_merge.merge_checkpoints(config, str(out), progress=False, **kw)


def assert_exact(merged, reference):
  for name in FLOAT_NAMES:
    np.testing.assert_array_equal(merged[name], np.asarray(reference[name]), err_msg=name)


def continual_reference(merge, base, models):
  state = merge.init(f32(base))
  for m in models:
    state = merge.update(state, f32(m))
  return merge.params(state)


# ------------------------------------------------------------------------------------------
# Out-of-core == in-memory, exactly
# ------------------------------------------------------------------------------------------


EXACT_CASES = {
    'linear': (dict(normalize=True),
               lambda b, ms: static.average(b, ms)),
    'task_arithmetic': (dict(scaling=0.7),
                        lambda b, ms: static.task_arithmetic(b, ms, scaling=0.7)),
    'ties': (dict(scaling=0.9, normalize=True),
             lambda b, ms: static.ties(b, ms, density=0.4, scaling=0.9, trim='per_tensor')),
    'ties_global': (dict(scaling=0.9, normalize=True, trim='global'),
                    lambda b, ms: static.ties(b, ms, density=0.4, scaling=0.9, trim='global')),
    'magmax': (dict(scaling=0.5), lambda b, ms: static.magmax(b, ms, scaling=0.5)),
    'continual_average': ({}, lambda b, ms: continual_reference(continual.continual_average(),
                                                                b, ms)),
    'continual_task_arithmetic': (
        dict(scaling=0.3),
        lambda b, ms: continual_reference(continual.continual_task_arithmetic(scaling=0.3), b,
                                          ms)),
    'continual_ties': (
        dict(scaling=0.5, reduce='sum'),
        lambda b, ms: continual_reference(continual.continual_ties(
            scaling=0.5, density=0.4, trim='per_tensor', reduce='sum'), b, ms)),
}


# Elementwise merges and TIES (whose per-tensor thresholds then come from several blocks) also
# run with small blocks; continual_ties and OPCM always take whole tensors.
CASES = [(case, checkpoint_merge.DEFAULT_BLOCK_ENTRIES) for case in sorted(EXACT_CASES)] + [
    (case, SMALL_BLOCKS) for case in ('task_arithmetic', 'ties', 'ties_global',
                                      'continual_task_arithmetic')]


@pytest.mark.parametrize('case,block_entries', CASES)
def test_equals_in_memory_merge(folders, case, block_entries):
  tmp, base, models, paths = folders
  kw, reference = EXACT_CASES[case]
  method = 'ties' if case == 'ties_global' else case
  density = 0.4 if 'ties' in case else 1.0
  config = config_of(method, paths, densities=[density] * 3, **kw)
  run(config, tmp / 'out', block_entries=block_entries)
  merged = read_folder(tmp / 'out')
  assert_exact(merged, reference(f32(base), [f32(m) for m in models]))
  np.testing.assert_array_equal(merged['position_ids'], base['position_ids'])


def block_key(seed, name, block):
  h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], 'little')
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), h), block)


@pytest.mark.parametrize('method,merge', [('dare_linear', 'task_arithmetic'),
                                          ('dare_ties', 'ties')])
def test_dare_equals_library_with_documented_keys(folders, method, merge):
  tmp, base, models, paths = folders
  config = config_of(method, paths, densities=[0.6] * 3, scaling=0.8, normalize=True)
  run(config, tmp / 'out', seed=7)
  merged = read_folder(tmp / 'out')
  reference = {}
  for name in FLOAT_NAMES:
    out = static.dare({name: f32(base)[name]}, [{name: f32(m)[name]} for m in models],
                      key=block_key(7, name, 0), drop_rate=0.4,
                      scaling=0.8 / 3 if merge == 'task_arithmetic' else 0.8, merge=merge)
    reference[name] = out[name]
  assert_exact(merged, reference)
  run(config, tmp / 'again', seed=7)
  assert_exact(read_folder(tmp / 'again'), reference)
  run(config, tmp / 'other', seed=8)
  assert not np.array_equal(read_folder(tmp / 'other')['model.embed.weight'],
                            merged['model.embed.weight'])


def test_dare_blocks_use_their_own_keys(folders):
  tmp, base, models, paths = folders
  config = config_of('dare_linear', paths, densities=[0.5] * 3)
  run(config, tmp / 'out', seed=1, block_entries=SMALL_BLOCKS)
  merged = read_folder(tmp / 'out')
  name, rows = 'model.embed.weight', 2   # 13 // 6 = 2 rows per block
  for j in range(SHAPES[name][0] // rows):
    sl = slice(j * rows, (j + 1) * rows)
    ref = static.dare({name: f32(base)[name][sl]}, [{name: f32(m)[name][sl]} for m in models],
                      key=block_key(1, name, j), drop_rate=0.5, scaling=1.0)
    np.testing.assert_array_equal(merged[name][sl], np.asarray(ref[name]))


def test_opcm_matches_library_up_to_the_global_scale_rounding(folders):
  tmp, base, models, paths = folders
  run(config_of('opcm', paths, alpha=0.5), tmp / 'out')
  merged = read_folder(tmp / 'out')
  # The authors' leaves: the Linear weight is projected, the embedding added unprojected.
  reference = continual_reference(continual.opcm(alpha=0.5, project=recipes.OPCM_PROJECT),
                                  base, models)
  for name in FLOAT_NAMES:
    np.testing.assert_allclose(merged[name], np.asarray(reference[name]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# mergekit's weighted formulas (NumPy references)
# ------------------------------------------------------------------------------------------




def test_weighted_linear_is_the_normalized_weighted_sum(folders):
  tmp, base, models, paths = folders
  w = [1.0, 0.3, 0.5]
  run(config_of('linear', paths, weights=w, normalize=True), tmp / 'out')
  merged = read_folder(tmp / 'out')
  for name in FLOAT_NAMES:
    expected = sum(wi * m[name].astype(np.float64) for wi, m in zip(w, models)) / sum(w)
    np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_weighted_task_arithmetic(folders):
  tmp, base, models, paths = folders
  w = [0.5, 1.0, -0.3]
  run(config_of('task_arithmetic', paths, weights=w, scaling=0.8), tmp / 'out')
  merged = read_folder(tmp / 'out')
  for name in FLOAT_NAMES:
    b = base[name].astype(np.float64)
    expected = b + 0.8 * sum(wi * (m[name] - b) for wi, m in zip(w, models))
    np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('block_entries', [checkpoint_merge.DEFAULT_BLOCK_ENTRIES, SMALL_BLOCKS])
def test_weighted_ties_disjoint_sum(folders, block_entries):
  tmp, base, models, paths = folders
  w, d = [1.0, 0.5, 0.3], [0.3, 0.5, 0.8]
  config = config_of('ties', paths, weights=w, densities=d, scaling=0.7, normalize=False)
  run(config, tmp / 'out', block_entries=block_entries)
  merged = read_folder(tmp / 'out')
  for name in FLOAT_NAMES:
    b = base[name].astype(np.float64)
    x = np.stack([wi * np_magnitude(m[name].astype(np.float64) - b, di)
                  for wi, di, m in zip(w, d, models)])
    sign = np.sign(x.sum(0))
    expected = b + 0.7 * np.where((np.sign(x) == sign) & (x != 0), x, 0).sum(0)
    np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)




@pytest.mark.parametrize('block_entries', [checkpoint_merge.DEFAULT_BLOCK_ENTRIES, SMALL_BLOCKS])
@pytest.mark.parametrize('density', [0.3, 0.55])
def test_ties_keeps_mergekits_exact_top_k_on_bfloat16_ties(tmp_path, block_entries, density):
  # One model against a zero base, bf16 values from a 4-value set: most magnitudes are tied,
  # and base + 1 * disjoint mean of one task vector is its trimmed task vector, bit for bit.
  rng = np.random.default_rng(7)
  values = np.asarray([-0.5, -0.25, 0.25, 0.5, 1.0], ml_dtypes.bfloat16)
  base = {k: np.zeros(s, ml_dtypes.bfloat16) for k, s in SHAPES.items()}
  model = {k: np.asarray(values[rng.integers(0, len(values), s)]) for k, s in SHAPES.items()}
  paths = [write_folder(str(tmp_path / 'base'), base), write_folder(str(tmp_path / 'ft'), model)]
  config = config_of('ties', paths, densities=[density], normalize=True)
  run(config, tmp_path / 'out', block_entries=block_entries)
  merged = read_folder(tmp_path / 'out')
  for name in FLOAT_NAMES:
    expected = np_magnitude(model[name].astype(np.float32), density).astype(ml_dtypes.bfloat16)
    assert merged[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(merged[name].view(np.uint16), expected.view(np.uint16),
                                  err_msg=name)
    assert np.count_nonzero(merged[name]) == int(density * model[name].size)
  # The paper's rule keeps round(density n) and every entry tied with the last one.
  run(config._replace(selection='threshold'), tmp_path / 'paper', block_entries=block_entries)
  paper = read_folder(tmp_path / 'paper')
  name = 'model.embed.weight'
  np.testing.assert_array_equal(paper[name], np_trim(model[name].astype(np.float32), density)
                                .astype(ml_dtypes.bfloat16))
  assert np.count_nonzero(paper[name]) > np.count_nonzero(merged[name])


def np_disjoint_sum(xs):
  x = np.stack(xs)
  sign = np.sign(x.sum(0))
  return np.where((np.sign(x) == sign) & (x != 0), x, 0).sum(0)


@pytest.mark.parametrize('weights', [[1.0, 0.5, 0.25], [1.0, -1.0, 0.5]])
@pytest.mark.parametrize('block_entries', [checkpoint_merge.DEFAULT_BLOCK_ENTRIES, SMALL_BLOCKS])
def test_normalized_weighted_ties_is_mergekits_weighted_disjoint_mean(folders, weights,
                                                                      block_entries):
  tmp, base, models, paths = folders
  d = [0.3, 0.5, 0.8]
  config = config_of('ties', paths, weights=weights, densities=d, scaling=0.7, normalize=True)
  run(config, tmp / 'out', block_entries=block_entries)
  merged = read_folder(tmp / 'out')
  for name in FLOAT_NAMES:
    b = base[name].astype(np.float64)
    xs = [wi * np_magnitude(m[name].astype(np.float64) - b, di)
          for wi, di, m in zip(weights, d, models)]
    expected = b + 0.7 * np_weighted_disjoint_mean(xs, weights)
    np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def np_dare_masks(seed, name, shape, densities):
  """Model i's keep mask: bernoulli(split(block key, n)[i], d_i) over the block, reshaped (the
  documented key contract; block 0 holds the whole of these small tensors)."""
  keys = jax.random.split(block_key(seed, name, 0), len(densities))
  size = int(np.prod(shape, dtype=np.int64))
  return [np.asarray(jax.random.bernoulli(k, d, (size,))).reshape(shape)
          for k, d in zip(keys, densities)]


DARE_CASES = {
    # method, densities, weights, normalize, rescale
    'linear_per_model': ('dare_linear', [0.5, 0.25, 0.75], [1.0, 0.5, 2.0], True, True),
    'linear_no_rescale': ('dare_linear', [0.5, 0.5, 0.5], [1.0, 1.0, 1.0], False, False),
    'ties_per_model_normalized': ('dare_ties', [0.5, 0.25, 0.75], [1.0, 0.5, 2.0], True, True),
    'ties_per_model_no_rescale': ('dare_ties', [0.75, 0.5, 0.25], [1.0, 0.5, 2.0], False, False),
    'ties_one_density_weighted_mean': ('dare_ties', [0.5, 0.5, 0.5], [1.0, 0.5, 2.0], True, True),
    'linear_l1': ('dare_linear', [0.5, 0.25, 0.75], [1.0, 0.5, 2.0], False, 'l1'),
    'linear_one_density_l1': ('dare_linear', [0.5, 0.5, 0.5], [1.0, 1.0, 1.0], True, 'l1'),
    'ties_l1': ('dare_ties', [0.5, 0.25, 0.75], [1.0, 0.5, 2.0], True, 'l1'),
}


def np_l1_rescaled(tv, mask):
  """mergekit's ``rescaled_masked_tensor(tv, mask, RescaleNorm.l1)``, transcribed."""
  masked = tv * mask
  before, after = np.abs(tv).sum(), np.abs(masked).sum()
  if before < 1e-7 or after < 1e-7:
    return masked
  return masked * (before / after)


@pytest.mark.parametrize('case', sorted(DARE_CASES))
def test_dare_per_model_density_and_rescale_follow_mergekit(folders, case):
  method, d, w, normalize, rescale = DARE_CASES[case]
  tmp, base, models, paths = folders
  config = config_of(method, paths, weights=w, densities=d, scaling=0.8, normalize=normalize,
                     rescale=rescale)
  run(config, tmp / 'out', seed=5)
  merged = read_folder(tmp / 'out')
  for name in FLOAT_NAMES:
    b = base[name].astype(np.float64)
    masks = np_dare_masks(5, name, b.shape, d)
    if rescale == 'l1':
      kept = [np_l1_rescaled(m[name] - b, mask) for mask, m in zip(masks, models)]
    else:
      kept = [np.where(mask, (m[name] - b) / di if rescale else m[name] - b, 0.0)
              for mask, di, m in zip(masks, d, models)]
    if method == 'dare_linear':
      c = np.asarray(w) / sum(w) if normalize else np.asarray(w)
      tv = sum(ci * x for ci, x in zip(c, kept))
    elif normalize:
      tv = np_weighted_disjoint_mean([wi * x for wi, x in zip(w, kept)], w)
    else:
      tv = np_disjoint_sum([wi * x for wi, x in zip(w, kept)])
    np.testing.assert_allclose(merged[name], b + 0.8 * tv, rtol=1e-5, atol=1e-6, err_msg=name)


def test_weighted_dare_linear_keeps_or_drops_each_entry(tmp_path):
  base, (model, _) = random_models(n=2)
  paths = [write_folder(str(tmp_path / 'base'), base), write_folder(str(tmp_path / 'a'), model),
           write_folder(str(tmp_path / 'same'), base)]   # tau = 0 for the second model
  config = config_of('dare_linear', paths, weights=[2.0, 0.5], densities=[0.5, 0.5], scaling=0.5)
  run(config, tmp_path / 'out', seed=3)
  merged = read_folder(tmp_path / 'out')
  name = 'model.embed.weight'
  tv = model[name] - base[name]
  delta = merged[name] - base[name]
  kept = np.isclose(delta, 0.5 * 2.0 * tv / 0.5, rtol=1e-4, atol=1e-6)
  dropped = np.isclose(delta, 0.0, atol=1e-6)
  assert np.all(kept | dropped)
  assert 0.25 < kept.mean() < 0.75


# ------------------------------------------------------------------------------------------
# Output folder
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('dtype,np_dtype', [('bfloat16', ml_dtypes.bfloat16),
                                            ('float16', np.float16), ('float32', np.float32)])
def test_output_folder_is_complete_and_has_the_dtype(folders, dtype, np_dtype):
  tmp, base, models, paths = folders
  summary = run(config_of('task_arithmetic', paths, scaling=0.5), tmp / 'out', dtype=dtype,
                max_shard_size=100)
  out = tmp / 'out'
  with open(out / 'model.safetensors.index.json') as f:
    index = json.load(f)
  assert set(index['weight_map']) == set(base)
  shards = sorted(set(index['weight_map'].values()))
  assert len(shards) == summary.num_shards > 2
  assert shards == [f'model-{i:05d}-of-{len(shards):05d}.safetensors'
                    for i in range(1, len(shards) + 1)]
  merged = read_folder(out)
  assert index['metadata']['total_size'] == sum(x.nbytes for x in merged.values())
  for name in FLOAT_NAMES:
    assert merged[name].dtype == np.dtype(np_dtype)
  assert merged['position_ids'].dtype == np.int64
  reference = static.task_arithmetic(f32(base), [f32(m) for m in models], scaling=0.5)
  for name in FLOAT_NAMES:
    np.testing.assert_array_equal(merged[name], np.asarray(reference[name]).astype(np_dtype))
  with open(out / 'config.json') as f:
    assert json.load(f)['torch_dtype'] == dtype
  assert (out / 'tokenizer.json').read_text() == '{"toy": true}'
  assert safetensors_reader.open_checkpoint(str(out)).tensors.keys() == base.keys()


def test_single_shard_and_single_file_inputs(tmp_path):
  base, models = random_models(n=2)
  paths = []
  for i, tree in enumerate([base] + models):
    save_file(tree, str(tmp_path / f'm{i}.safetensors'))
    paths.append(str(tmp_path / f'm{i}.safetensors'))
  run(config_of('task_arithmetic', paths, scaling=1.0), tmp_path / 'out')
  assert sorted(os.listdir(tmp_path / 'out')) == ['model.safetensors']
  reference = static.task_arithmetic(f32(base), [f32(m) for m in models], scaling=1.0)
  assert_exact(read_folder(tmp_path / 'out'), reference)


def test_bfloat16_inputs_are_merged_in_float32(tmp_path):
  base, models = random_models(n=2, dtype=ml_dtypes.bfloat16)
  paths = [write_folder(str(tmp_path / f'm{i}'), t) for i, t in enumerate([base] + models)]
  # The library's (paper's) selection: static.ties keeps every entry tied at the threshold.
  run(config_of('ties', paths, densities=[0.5, 0.5], normalize=True, selection='threshold'),
      tmp_path / 'out')
  merged = read_folder(tmp_path / 'out')
  reference = static.ties(f32(base), [f32(m) for m in models], density=0.5, trim='per_tensor')
  for name in FLOAT_NAMES:
    assert merged[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(merged[name],
                                  np.asarray(reference[name]).astype(ml_dtypes.bfloat16))


def test_exclude_keeps_the_base_and_unknown_pattern_fails(folders):
  tmp, base, models, paths = folders
  config = config_of('task_arithmetic', paths, exclude=('model\\.norm', 'sc.*'))
  run(config, tmp / 'out')
  merged = read_folder(tmp / 'out')
  np.testing.assert_array_equal(merged['model.norm'], base['model.norm'])
  np.testing.assert_array_equal(merged['scale'], base['scale'])
  assert not np.array_equal(merged['model.layers.0.weight'], base['model.layers.0.weight'])
  with pytest.raises(ValueError, match="'lm_head.*' matches no tensor"):
    run(config_of('task_arithmetic', paths, exclude=('lm_head.*',)), tmp / 'out2')
  assert not (tmp / 'out2').exists()


# ------------------------------------------------------------------------------------------
# Failures leave nothing behind
# ------------------------------------------------------------------------------------------


def leftovers(folder):
  return [n for n in os.listdir(folder) if n.startswith('.')]


@pytest.mark.parametrize('error', [RuntimeError, KeyboardInterrupt])
def test_interrupted_merge_leaves_no_output(folders, monkeypatch, error):
  tmp, base, models, paths = folders
  calls = {'n': 0}
  real_read = safetensors_reader.Checkpoint.read

  def failing_read(self, name, start=None, stop=None):
    calls['n'] += 1
    if calls['n'] == 30:   # mid-merge: some shards and blocks are already written
      raise error('simulated failure')
    return real_read(self, name, start, stop)

  monkeypatch.setattr(safetensors_reader.Checkpoint, 'read', failing_read)
  with pytest.raises(error, match='simulated'):
    run(config_of('task_arithmetic', paths), tmp / 'out', max_shard_size=200,
        block_entries=SMALL_BLOCKS)
  assert calls['n'] == 30
  assert not (tmp / 'out').exists()
  assert leftovers(tmp) == []


def test_existing_output_is_refused_and_force_replaces_after_success(folders, monkeypatch):
  tmp, base, models, paths = folders
  (tmp / 'out').mkdir()
  (tmp / 'out' / 'keep.txt').write_text('old')
  with pytest.raises(FileExistsError, match='--force'):
    run(config_of('task_arithmetic', paths), tmp / 'out')
  monkeypatch.setattr(checkpoint_merge, '_copy_model_files',
                      lambda *a: (_ for _ in ()).throw(OSError('disk full')))
  with pytest.raises(OSError, match='disk full'):
    run(config_of('task_arithmetic', paths), tmp / 'out', force=True)
  assert (tmp / 'out' / 'keep.txt').read_text() == 'old'   # a failed forced merge keeps it
  monkeypatch.undo()
  run(config_of('task_arithmetic', paths), tmp / 'out', force=True)
  assert not (tmp / 'out' / 'keep.txt').exists()
  assert (tmp / 'out' / 'model.safetensors').exists()
  assert leftovers(tmp) == []


def test_output_overlapping_an_input_is_refused(folders):
  tmp, base, models, paths = folders
  with pytest.raises(ValueError, match='overlaps the input'):
    run(config_of('task_arithmetic', paths), paths[1], force=True)
  assert os.path.exists(os.path.join(paths[1], 'model.safetensors.index.json'))


# ------------------------------------------------------------------------------------------
# Mismatched models name the tensor
# ------------------------------------------------------------------------------------------


def test_missing_tensor_is_named(tmp_path):
  base, models = random_models(n=2)
  del models[1]['model.norm']
  paths = [write_folder(str(tmp_path / f'm{i}'), t) for i, t in enumerate([base] + models)]
  with pytest.raises(ValueError, match=r"tensor 'model\.norm' is in the base model .* not in "
                                       r'.*m2'):
    run(config_of('task_arithmetic', paths), tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_extra_tensor_is_named(tmp_path):
  base, models = random_models(n=1)
  models[0]['lm_head.weight'] = np.zeros((2, 2), np.float32)
  paths = [write_folder(str(tmp_path / f'm{i}'), t) for i, t in enumerate([base] + models)]
  with pytest.raises(ValueError, match=r"tensor 'lm_head\.weight' is in .*m1 but not in the base"):
    run(config_of('task_arithmetic', paths), tmp_path / 'out')


def test_shape_mismatch_is_named(tmp_path):
  base, models = random_models(n=2)
  models[0]['model.layers.0.weight'] = np.zeros((5, 6), np.float32)
  paths = [write_folder(str(tmp_path / f'm{i}'), t) for i, t in enumerate([base] + models)]
  with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.weight' has shape \(5, 6\) in "
                                       r'.*m1 but \(6, 5\)'):
    run(config_of('ties', paths, densities=[0.5, 0.5]), tmp_path / 'out')


def test_nan_in_a_model_is_named(tmp_path):
  base, models = random_models(n=2)
  models[1]['model.layers.0.weight'][2, 3] = np.nan
  paths = [write_folder(str(tmp_path / f'm{i}'), t) for i, t in enumerate([base] + models)]
  for trim in ('per_tensor', 'global'):
    with pytest.raises(ValueError, match=r'model\.layers\.0\.weight'):
      run(config_of('ties', paths, densities=[0.5, 0.5], trim=trim), tmp_path / 'out')
  assert not (tmp_path / 'out').exists()
  assert leftovers(tmp_path) == []


@pytest.mark.parametrize('method,kw', [('ties', dict(trim='per_tensor')),
                                       ('ties', dict(trim='global')),
                                       ('task_arithmetic', {}), ('opcm', {})])
def test_nan_in_the_base_names_the_base_not_a_finetuned_model(tmp_path, method, kw):
  base, models = random_models(n=2)
  base['model.layers.0.weight'][1, 4] = np.nan
  paths = [write_folder(str(tmp_path / f'm{i}'), t) for i, t in enumerate([base] + models)]
  densities = [0.5, 0.5] if method == 'ties' else None
  with pytest.raises(ValueError) as info:
    run(config_of(method, paths, densities=densities, **kw), tmp_path / 'out')
  assert str(info.value).startswith(f'the base model {paths[0]} has non-finite values in tensor '
                                    "'model.layers.0.weight' (1 NaN, 0 Inf)"), str(info.value)
  assert not (tmp_path / 'out').exists()
