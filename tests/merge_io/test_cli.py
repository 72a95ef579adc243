"""End-to-end tests of the `cljax-merge` command line (main(argv) and python -m)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from cljax.merge_io import cli
from cljax.merge_io import safetensors_reader
from cljax.merging import static

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = {'model.embed.weight': (12, 4), 'model.layers.0.mlp.weight': (4, 4), 'model.norm': (4,)}


def write_folder(folder, tensors):
  """Two shards + index + config/tokenizer files, written with safetensors' save_file."""
  os.makedirs(folder)
  names = sorted(tensors)
  weight_map = {}
  for i, group in enumerate([names[:2], names[2:]]):
    filename = f'model-{i + 1:05d}-of-00002.safetensors'
    save_file({n: tensors[n] for n in group}, os.path.join(folder, filename))
    weight_map.update({n: filename for n in group})
  with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': 0}, 'weight_map': weight_map}, f)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump({'model_type': 'toy'}, f)
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    f.write('{"model_max_length": 8}')


@pytest.fixture
def workspace(tmp_path, monkeypatch):
  """base + two finetuned folders, and a ties config using relative paths (as mergekit does)."""
  rng = np.random.default_rng(0)
  base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  models = [{k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
             for k, v in base.items()} for _ in range(2)]
  write_folder(str(tmp_path / 'base'), base)
  for i, m in enumerate(models):
    write_folder(str(tmp_path / f'ft{i}'), m)
  (tmp_path / 'merge.yml').write_text(textwrap.dedent("""\
      merge_method: ties
      base_model: base
      models:
        - model: base
        - model: ft0
          parameters: {weight: 1.0, density: 0.5}
        - model: ft1
          parameters: {weight: 1.0, density: 0.5}
      parameters:
        lambda: 0.9
      """))
  monkeypatch.chdir(tmp_path)
  return tmp_path, base, models


def read_all(folder):
  ckpt = safetensors_reader.open_checkpoint(str(folder))
  out = {}
  for name, info in ckpt.tensors.items():
    with safe_open(info.file, framework='numpy') as f:
      out[name] = f.get_tensor(name)
  return out


def test_main_merges_and_reports(workspace, capsys):
  tmp, base, models = workspace
  assert cli.main(['merge.yml', 'out', '--no-progress', '--max-shard-size', '100B']) == 0
  assert 'cljax-merge: wrote' in capsys.readouterr().out
  merged = read_all(tmp / 'out')
  reference = static.ties(base, models, density=0.5, scaling=0.9, trim='per_tensor')
  for name in SHAPES:
    np.testing.assert_array_equal(merged[name], np.asarray(reference[name]))
  files = sorted(os.listdir(tmp / 'out'))
  assert 'model.safetensors.index.json' in files and 'tokenizer_config.json' in files
  assert (tmp / 'out' / 'cljax_merge.yml').read_text() == (tmp / 'merge.yml').read_text()


def test_flags_override_the_config(workspace):
  tmp, base, models = workspace
  assert cli.main(['merge.yml', 'out', '--no-progress', '--dtype', 'float16', '--trim', 'global',
                   '--exclude', 'model\\.norm']) == 0
  merged = read_all(tmp / 'out')
  reference = static.ties(base, models, density=0.5, scaling=0.9, trim='global',
                          exclude='model\\.norm')
  for name in SHAPES:
    assert merged[name].dtype == np.float16
    np.testing.assert_array_equal(merged[name], np.asarray(reference[name]).astype(np.float16))
  with open(tmp / 'out' / 'config.json') as f:
    assert json.load(f)['torch_dtype'] == 'float16'


@pytest.mark.parametrize('yaml_edit,args,match', [
    (('density: 0.5}', 'density: [0.1, 0.5]}'), [], r'merge\.yml: models\[1\]\.parameters\.'
                                                   r'density: gradients'),
    (('base_model: base', 'base_model: missing'), [], 'missing does not exist'),
    (('merge_method: ties', 'merge_method: slerp'), [], "'slerp' is not supported"),
    (None, ['--exclude', 'nothing.*'], "'nothing.*' matches no tensor"),
    (None, ['--max-shard-size', 'huge'], "max shard size must look like"),
])
def test_errors_exit_1_with_one_line_and_no_output(workspace, capsys, yaml_edit, args, match):
  tmp = workspace[0]
  if yaml_edit:
    text = (tmp / 'merge.yml').read_text()
    (tmp / 'merge.yml').write_text(text.replace(*yaml_edit))
  assert cli.main(['merge.yml', 'out', '--no-progress'] + args) == 1
  err = capsys.readouterr().err
  assert err.startswith('cljax-merge: error: ')
  assert re.search(match, err)
  assert not (tmp / 'out').exists()
  assert [n for n in os.listdir(tmp) if n.startswith('.')] == []


def test_existing_output_and_mismatched_models(workspace, capsys):
  tmp = workspace[0]
  (tmp / 'out').mkdir()
  assert cli.main(['merge.yml', 'out', '--no-progress']) == 1
  assert '--force' in capsys.readouterr().err
  assert cli.main(['merge.yml', 'out', '--no-progress', '--force']) == 0
  os.remove(tmp / 'ft1' / 'model-00002-of-00002.safetensors')
  save_file({'model.norm': np.zeros((5,), np.float32)},
            str(tmp / 'ft1' / 'model-00002-of-00002.safetensors'))
  assert cli.main(['merge.yml', 'out2', '--no-progress']) == 1
  assert "tensor 'model.norm' has shape (5,)" in capsys.readouterr().err


def test_ctrl_c_exits_130_without_output(workspace, capsys, monkeypatch):
  tmp = workspace[0]
  real_read = safetensors_reader.Checkpoint.read
  calls = []

  def read(self, *args):
    calls.append(1)
    if len(calls) == 4:
      raise KeyboardInterrupt
    return real_read(self, *args)

  monkeypatch.setattr(safetensors_reader.Checkpoint, 'read', read)
  assert cli.main(['merge.yml', 'out', '--no-progress']) == 130
  assert 'interrupted' in capsys.readouterr().err
  assert sorted(os.listdir(tmp)) == ['base', 'ft0', 'ft1', 'merge.yml']


def test_python_m_runs_the_cli(workspace):
  tmp = workspace[0]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  help_run = subprocess.run([sys.executable, '-m', 'cljax.merge_io.cli', '--help'], env=env,
                            capture_output=True, text=True, check=True)
  assert 'usage: cljax-merge' in help_run.stdout and 'dare_ties' in help_run.stdout
  run = subprocess.run([sys.executable, '-m', 'cljax.merge_io.cli', 'merge.yml', 'out',
                        '--dtype', 'bfloat16'], env=env, capture_output=True, text=True,
                       cwd=tmp, timeout=300)
  assert run.returncode == 0, run.stderr
  assert 'B/s' in run.stderr   # the tqdm bar reports bytes per second
  merged = read_all(tmp / 'out')
  assert all(x.dtype == ml_dtypes.bfloat16 for x in merged.values())
