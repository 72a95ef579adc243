"""cljax-merge with merges that are not elementwise (norms, SVDs per tensor): the driver hands
them whole tensors even with small row blocks, so the output equals the merge of the whole
tensors; merges taking ``kernel_layout`` get 'out_in' for Hugging Face weights; data-based and
per-task merges are refused.

The configs are built as `MergeConfig` directly: the YAML front end (`mergekit_config`) does not
list these methods yet. Inputs are tiny safetensors folders written with safetensors' own
``save_file``; outputs are read back with ``safe_open`` (`reference.read_folder`).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from cljax.merge_io import checkpoint_merge
from cljax.merge_io import mergekit_config
from cljax.merge_io import recipes
from cljax.merging import iso
from cljax.merging import tsv
from .reference import read_folder

SHAPES = {'model.layers.0.mlp.weight': (8, 6), 'model.layers.0.mlp.bias': (8,),
          'model.norm.weight': (6,)}
ROW_BLOCK = 6   # block_entries: one row of the (8, 6) weight per block, 6 entries of a vector


def _folders(tmp_path, n=3, seed=0):
  """base and n models, task vectors sharing a direction (so that angles are not ~90 degrees)."""
  rng = np.random.default_rng(seed)
  base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  shared = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
  models = [{k: (base[k] + 0.1 * (shared[k] + rng.standard_normal(s))).astype(np.float32)
             for k, s in SHAPES.items()} for _ in range(n)]
  paths = []
  for name, tensors in [('base', base)] + [(f'ft{i}', m) for i, m in enumerate(models)]:
    folder = tmp_path / name
    os.makedirs(folder)
    save_file(tensors, str(folder / 'model.safetensors'), metadata={'format': 'pt'})
    paths.append(str(folder))
  return base, models, paths


def _config(method, paths, **kw):
  models = tuple(mergekit_config.ModelSpec(p, 1.0, 1.0, f'models[{i}]')
                 for i, p in enumerate(paths[1:]))
  return mergekit_config.MergeConfig(method=method, base_model=paths[0], models=models, **kw)


def _merge(tmp_path, config):
  out = tmp_path / 'out'
  checkpoint_merge.merge_checkpoints(config, str(out), progress=False, block_entries=ROW_BLOCK)
  return read_folder(str(out))


def _np_model_stock(w0, ws):
  """Model Stock of one tensor (Jang et al. 2024; mergekit's pairwise mean of cosines), float64:
  t = k c / (1 + (k - 1) c), merged = t mean_i w_i + (1 - t) w0."""
  w0 = w0.astype(np.float64)
  tvs = [(w.astype(np.float64) - w0).reshape(-1) for w in ws]
  k = len(ws)
  cos = np.mean([np.dot(tvs[i], tvs[j]) / max(np.linalg.norm(tvs[i]) * np.linalg.norm(tvs[j]),
                                               1e-6)
                 for i in range(k) for j in range(i + 1, k)])
  t = k * cos / (1 + (k - 1) * cos)
  return t * np.mean([w.astype(np.float64) for w in ws], axis=0) + (1 - t) * w0


def test_model_stock_in_row_blocks_equals_the_whole_tensor_formula(tmp_path):
  base, models, paths = _folders(tmp_path)
  merged = _merge(tmp_path, _config('model_stock', paths))
  for name in SHAPES:
    np.testing.assert_allclose(merged[name], _np_model_stock(base[name], [m[name] for m in models]),
                               atol=1e-6, err_msg=name)
  # The per-row formula differs: the driver did not merge the weight row by row.
  w = 'model.layers.0.mlp.weight'
  rows = np.stack([_np_model_stock(base[w][r], [m[w][r] for m in models]) for r in range(8)])
  assert np.abs(rows - merged[w]).max() > 1e-3


def test_tsv_in_row_blocks_equals_the_library_on_whole_tensors(tmp_path):
  base, models, paths = _folders(tmp_path, n=2)
  merged = _merge(tmp_path, _config('tsv', paths, scaling=0.7))
  reference = tsv.tsv(base, models, scaling=0.7)
  for name in SHAPES:
    np.testing.assert_allclose(merged[name], np.asarray(reference[name]), atol=1e-6,
                               err_msg=name)


def test_iso_cts_gets_the_hugging_face_layout(tmp_path):
  base, models, paths = _folders(tmp_path, n=2)
  merged = _merge(tmp_path, _config('iso_cts', paths))
  w = 'model.layers.0.mlp.weight'
  out_in = iso.iso_cts(base, models, kernel_layout='out_in')
  in_out = iso.iso_cts(base, models, kernel_layout='in_out')
  np.testing.assert_allclose(merged[w], np.asarray(out_in[w]), atol=1e-6)
  assert np.abs(np.asarray(in_out[w]) - np.asarray(out_in[w])).max() > 1e-3
  assert recipes.kernel_layout(w) == 'out_in'
  assert recipes.kernel_layout('params/Dense_0/kernel') == 'in_out'


def test_recipes_of_whole_tensor_merges_and_refusals(tmp_path):
  paths = ['base', 'a', 'b']
  for name in ('tsv', 'model_stock', 'iso_c', 'wudi', 'della', 'slerp', 'breadcrumbs'):
    assert not recipes.make_recipe(_config(name, paths)).blockwise, name
  assert recipes.make_recipe(_config('task_arithmetic', paths)).blockwise
  for name, needs in (('regmean', 'grams'), ('adamerging', 'apply_fn, test_inputs'),
                      ('soft_frank_wolfe', 'loss_fns, apply_fn, test_inputs')):
    with pytest.raises(ValueError, match=rf"'{name}' needs data \({needs}\)"):
      recipes.make_recipe(_config(name, paths))
  with pytest.raises(ValueError, match="'emr' gives one model per task"):
    recipes.make_recipe(_config('emr', paths))
