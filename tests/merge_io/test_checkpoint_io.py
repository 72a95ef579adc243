"""Tests for cljax-merge's I/O pieces: lazy safetensors reading, sharded writing, streaming select.

Files are written with safetensors' own `save_file` and read back with `safe_open`, so reader and
writer are each checked against the reference implementation, not against each other.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from cljax.merge_io import magnitude_select
from cljax.merge_io import safetensors_reader
from cljax.merge_io import safetensors_writer
from cljax.merging import static

W = safetensors_writer


def _tensors(seed=0):
  rng = np.random.default_rng(seed)
  return {'a.weight': rng.standard_normal((5, 3)).astype(np.float32),
          'b.weight': rng.standard_normal((4,)).astype(ml_dtypes.bfloat16),
          'c.ids': np.arange(6, dtype=np.int64).reshape(2, 3),
          'd.scalar': np.asarray(2.5, np.float16)}


def _sharded(folder, tensors, groups):
  os.makedirs(folder)
  weight_map = {}
  for i, group in enumerate(groups):
    name = f'model-{i + 1:05d}-of-{len(groups):05d}.safetensors'
    save_file({n: tensors[n] for n in group}, os.path.join(folder, name))
    weight_map.update({n: name for n in group})
  with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': 0}, 'weight_map': weight_map}, f)
  return folder


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


def test_sharded_folder_reads_lazily_by_rows(tmp_path):
  tensors = _tensors()
  folder = _sharded(str(tmp_path / 'm'), tensors, [['a.weight', 'c.ids'], ['b.weight', 'd.scalar']])
  ckpt = safetensors_reader.open_checkpoint(folder)
  assert ckpt.folder == folder
  assert set(ckpt.tensors) == set(tensors)
  info = ckpt.tensors['b.weight']
  assert (info.shape, info.dtype, info.nbytes) == ((4,), np.dtype(ml_dtypes.bfloat16), 8)
  assert os.path.basename(info.file) == 'model-00002-of-00002.safetensors'
  for name, x in tensors.items():
    got = ckpt.read(name)
    assert got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_array_equal(got, x)
  np.testing.assert_array_equal(ckpt.read('a.weight', 1, 3), tensors['a.weight'][1:3])
  np.testing.assert_array_equal(ckpt.read('b.weight', 3, 4), tensors['b.weight'][3:4])
  np.testing.assert_array_equal(ckpt.read('d.scalar', 0, 1), tensors['d.scalar'])   # 0-d: whole
  with pytest.raises(KeyError, match='no tensor'):
    ckpt.read('missing')


def test_single_file_and_unindexed_folder(tmp_path):
  tensors = _tensors()
  save_file(tensors, str(tmp_path / 'one.safetensors'))
  ckpt = safetensors_reader.open_checkpoint(str(tmp_path / 'one.safetensors'))
  assert ckpt.folder is None and set(ckpt.tensors) == set(tensors)
  (tmp_path / 'plain').mkdir()
  save_file({'a.weight': tensors['a.weight']}, str(tmp_path / 'plain' / 'x.safetensors'))
  save_file({'c.ids': tensors['c.ids']}, str(tmp_path / 'plain' / 'y.safetensors'))
  assert set(safetensors_reader.open_checkpoint(str(tmp_path / 'plain')).tensors) == {
      'a.weight', 'c.ids'}
  save_file({'c.ids': tensors['c.ids']}, str(tmp_path / 'plain' / 'z.safetensors'))
  with pytest.raises(ValueError, match="'c.ids' is in both"):
    safetensors_reader.open_checkpoint(str(tmp_path / 'plain'))


def test_bad_inputs_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='huggingface-cli download'):
    safetensors_reader.open_checkpoint(str(tmp_path / 'meta-llama' / 'Llama-3-8B'))
  (tmp_path / 'orbax').mkdir()   # a step's metadata without any PyTree item
  (tmp_path / 'orbax' / '_CHECKPOINT_METADATA').write_text('{}')
  with pytest.raises(ValueError, match=r'orbax is not a readable Orbax PyTree checkpoint: no '
                                       r'_METADATA'):
    safetensors_reader.open_checkpoint(str(tmp_path / 'orbax'))
  (tmp_path / 'torch').mkdir()
  (tmp_path / 'torch' / 'pytorch_model.bin').write_bytes(b'x')
  with pytest.raises(ValueError, match='no .safetensors weights'):
    safetensors_reader.open_checkpoint(str(tmp_path / 'torch'))
  (tmp_path / 'junk.safetensors').write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00not json')
  with pytest.raises(ValueError, match='junk.safetensors is not a readable safetensors file'):
    safetensors_reader.open_checkpoint(str(tmp_path / 'junk.safetensors'))


def test_index_disagreeing_with_shards_is_an_error(tmp_path):
  tensors = _tensors()
  folder = _sharded(str(tmp_path / 'm'), tensors, [['a.weight', 'c.ids'], ['b.weight', 'd.scalar']])
  index_file = os.path.join(folder, 'model.safetensors.index.json')
  with open(index_file) as f:
    index = json.load(f)
  index['weight_map']['a.weight'] = 'model-00002-of-00002.safetensors'
  with open(index_file, 'w') as f:
    json.dump(index, f)
  with pytest.raises(ValueError, match="maps tensor 'a.weight' to model-00002"):
    safetensors_reader.open_checkpoint(folder)
  index['weight_map']['a.weight'] = 'model-00003-of-00002.safetensors'
  with open(index_file, 'w') as f:
    json.dump(index, f)
  with pytest.raises(FileNotFoundError, match='model-00003-of-00002'):
    safetensors_reader.open_checkpoint(folder)
  del index['weight_map']['a.weight']
  with open(index_file, 'w') as f:
    json.dump(index, f)
  with pytest.raises(ValueError, match="does not list tensor 'a.weight'"):
    safetensors_reader.open_checkpoint(folder)


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('text,expected', [('5GB', 5 * 10**9), ('500MB', 5 * 10**8),
                                           ('2GiB', 2 * 2**30), ('1.5KB', 1500), (1000, 1000),
                                           ('64', 64)])
def test_parse_size(text, expected):
  assert W.parse_size(text) == expected


@pytest.mark.parametrize('bad', ['5 parsecs', '', '-1GB', 0, 'GB', True])
def test_parse_size_rejects(bad):
  with pytest.raises(ValueError, match='max shard size'):
    W.parse_size(bad)


def test_plan_shards_is_greedy_and_named_like_transformers():
  specs = [W.TensorSpec(f't{i}', np.dtype(np.float32), (n,)) for i, n in enumerate([10, 10, 30, 5])]
  plans = W.plan_shards(specs, 80)   # bytes: 40, 40, 120, 20
  assert [[t.name for t in p.tensors] for p in plans] == [['t0', 't1'], ['t2'], ['t3']]
  assert [p.filename for p in plans] == [f'model-0000{i}-of-00003.safetensors' for i in (1, 2, 3)]
  assert [p.filename for p in W.plan_shards(specs, '1GB')] == ['model.safetensors']
  with pytest.raises(ValueError, match="duplicate tensor name 't0'"):
    W.plan_shards(specs + specs[:1], 80)


def test_written_checkpoint_reads_back_with_safetensors(tmp_path):
  tensors = _tensors()
  specs = [W.TensorSpec(n, x.dtype, x.shape) for n, x in tensors.items()]
  plans = W.write_checkpoint(str(tmp_path), specs, tensors.__getitem__, max_shard_size=50)
  assert len(plans) == 3
  with open(tmp_path / 'model.safetensors.index.json') as f:
    index = json.load(f)
  assert set(index['weight_map']) == set(tensors)
  assert index['metadata']['total_size'] == sum(x.nbytes for x in tensors.values())
  for name, x in tensors.items():
    with safe_open(str(tmp_path / index['weight_map'][name]), framework='numpy') as f:
      assert f.metadata() == {'format': 'pt'}
      got = f.get_tensor(name)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, x)


def test_shard_writer_accepts_row_blocks_and_checks_them(tmp_path):
  x = np.arange(12, dtype=np.float32).reshape(4, 3)
  plan = W.plan_shards([W.TensorSpec('x', x.dtype, x.shape),
                        W.TensorSpec('e', np.dtype(np.float32), (0, 3))], '1GB')[0]
  with W.ShardWriter(str(tmp_path), plan) as writer:
    writer.write('x', x[:1])
    writer.write('x', x[1:])
  with safe_open(str(tmp_path / 'model.safetensors'), framework='numpy') as f:
    np.testing.assert_array_equal(f.get_tensor('x'), x)
    assert f.get_tensor('e').shape == (0, 3)
  for bad, match in [(lambda w: w.write('x', x.astype(np.float16)), 'planned as float32'),
                     (lambda w: w.write('x', x.reshape(3, 4)), 'got a block of shape'),
                     (lambda w: w.write('e', x), 'out of the planned order'),
                     (lambda w: (w.write('x', x), w.write('x', x[:1])), 'more than its 48'),
                     (lambda w: (w.write('x', x[:2]), w.close()), "'x' was not fully written")]:
    os.remove(tmp_path / 'model.safetensors')
    writer = W.ShardWriter(str(tmp_path), plan)
    with pytest.raises(ValueError, match=match):
      bad(writer)
    writer._file.close()


# ------------------------------------------------------------------------------------------
# Streaming k-th largest magnitude
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('k', [1, 2, 7, 50, 99, 100])
def test_kth_largest_matches_the_library_and_numpy(k):
  rng = np.random.default_rng(k)
  arrays = [rng.standard_normal((7, 5)).astype(np.float32),
            rng.standard_normal(65).astype(np.float32)]
  arrays[1][:10] = arrays[0].reshape(-1)[:10]            # ties across blocks
  expected = np.sort(np.abs(np.concatenate([a.reshape(-1) for a in arrays])))[::-1][k - 1]
  got = magnitude_select.kth_largest_magnitude(arrays, k)
  assert got == expected == float(static.kth_largest_magnitude([jnp.asarray(a) for a in arrays], k))


def test_streamed_blocks_give_the_same_threshold():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(10_000) * np.exp(rng.uniform(-30, 30, 10_000))).astype(np.float32)
  select = magnitude_select.KthLargestMagnitude(1234, x.size)
  for block in np.array_split(x, 7):
    select.add_high(block)
  select.finish_high()
  for block in np.array_split(x, 7):
    select.add_low(block)
  assert select.threshold() == np.sort(np.abs(x))[::-1][1233]


def test_kth_largest_edge_counts():
  assert magnitude_select.KthLargestMagnitude(0, 10).threshold() == float('inf')
  assert magnitude_select.KthLargestMagnitude(11, 10).threshold() == 0.0
  assert not magnitude_select.KthLargestMagnitude(11, 10).needs_data
  assert magnitude_select.KthLargestMagnitude(10, 10).needs_data
  assert magnitude_select.keep_count(0.25, 10) == 2   # round half to even, as the library
  assert magnitude_select.kth_largest_magnitude([np.array([-3.0, 0.0, -0.0, 2.0], np.float32)],
                                                3) == 0.0
