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


def test_info_lines_are_printed_once(workspace, capsys):
  import logging
  root_handler = logging.StreamHandler(sys.stderr)   # as some imports (Orbax's stack) install
  logging.root.addHandler(root_handler)
  try:
    for out in ('out', 'out2'):   # a second main() in one process adds no second handler
      assert cli.main(['merge.yml', out, '--no-progress']) == 0
      err = capsys.readouterr().err
      assert err.count('ties of 2 models') == 1, err
      assert err.startswith('cljax-merge: INFO: ties of 2 models -> ')
  finally:
    logging.root.removeHandler(root_handler)
  logger = logging.getLogger('cljax')   # main() leaves the loggers as it found them
  assert logger.propagate and not logger.handlers


def test_unwritable_output_is_one_line(workspace, capsys):
  target = '/sys/cljax-merge-test-out'   # read-only even for root
  try:
    os.close(os.open('/sys/.cljax-probe', os.O_CREAT | os.O_WRONLY))
    os.remove('/sys/.cljax-probe')
    pytest.skip('/sys is writable here')
  except OSError:
    pass
  assert cli.main(['merge.yml', target, '--no-progress']) == 1
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [f'cljax-merge: error: cannot write the output {target}: '
                                      'Permission denied (/sys/.cljax-merge-test-out.lock)']
  with pytest.raises(ValueError, match='cannot write the output'):
    cli.main(['merge.yml', target, '--no-progress', '--traceback'])


def test_os_errors_while_writing_are_one_line(workspace, capsys, monkeypatch):
  checkpoint_merge = cli.checkpoint_merge   # the engine, wherever the package keeps it

  def full_disk(*args):
    raise OSError(28, 'No space left on device', 'out/model-00001-of-00002.safetensors')

  monkeypatch.setattr(checkpoint_merge, '_copy_model_files', full_disk)
  assert cli.main(['merge.yml', 'out', '--no-progress']) == 1
  assert capsys.readouterr().err.strip().splitlines()[1:] == [
      'cljax-merge: error: out/model-00001-of-00002.safetensors: No space left on device']
  assert sorted(os.listdir(workspace[0])) == ['base', 'ft0', 'ft1', 'merge.yml']


_KILLED_SWAP = textwrap.dedent("""\
    import importlib, os, sys
    sys.path.insert(0, {root!r})
    cli = importlib.import_module({cli!r})
    real_rename = os.rename
    def rename(src, dst):
      real_rename(src, dst)
      if '.old-' in os.path.basename(dst):   # the old output moved aside: kill -9 now
        os._exit(9)
    os.rename = rename
    cli.main(['merge.yml', 'out', '--no-progress', '--force', '--dtype', 'float16'])
    """)


def test_a_merge_killed_mid_swap_is_rolled_back_by_the_next_run(workspace, capsys):
  tmp = workspace[0]
  assert cli.main(['merge.yml', 'out', '--no-progress']) == 0
  before = read_all(tmp / 'out')
  script = _KILLED_SWAP.format(root=ROOT, cli=cli.__name__)
  proc = subprocess.run([sys.executable, '-c', script], cwd=tmp, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 9, proc.stderr[-2000:]
  hidden = sorted(n for n in os.listdir(tmp) if n.startswith('.'))
  assert not (tmp / 'out').exists()   # what the kill left: no output folder
  assert [n.split('-')[0] for n in hidden] == ['.out.lock', '.out.old', '.out.tmp'], hidden
  # The next run restores the previous output, removes the rest, and still needs --force.
  assert cli.main(['merge.yml', 'out', '--no-progress']) == 1
  err = capsys.readouterr().err
  assert 'WARNING: restored' in err and 'WARNING: removed' in err and '--force' in err
  after = read_all(tmp / 'out')
  assert sorted(after) == sorted(before)
  for name in before:
    np.testing.assert_array_equal(after[name], before[name])
  assert [n for n in os.listdir(tmp) if n.startswith('.')] == []
  assert cli.main(['merge.yml', 'out', '--no-progress', '--force']) == 0


def test_stale_temporary_folder_of_a_dead_run_is_removed(workspace, capsys):
  tmp = workspace[0]
  os.makedirs(tmp / '.out.tmp-abc123')   # a killed merge's unfinished output
  (tmp / '.out.tmp-abc123' / 'model-00001-of-00002.safetensors').write_bytes(b'partial')
  assert cli.main(['merge.yml', 'out', '--no-progress']) == 0
  assert 'removed' in capsys.readouterr().err
  assert [n for n in os.listdir(tmp) if n.startswith('.')] == []


def test_a_second_merge_into_the_same_output_is_refused(workspace, capsys):
  checkpoint_merge = cli.checkpoint_merge
  tmp = workspace[0]
  lock = checkpoint_merge._lock_output(str(tmp / 'out'))   # a live merge holds it
  try:
    assert cli.main(['merge.yml', 'out', '--no-progress']) == 1
    err = capsys.readouterr().err
    assert f'being written by another cljax-merge (process {os.getpid()}' in err
  finally:
    checkpoint_merge._unlock_output(lock)
  assert not (tmp / 'out').exists()


def test_bad_command_line_is_one_line_exit_2(workspace, capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(['merge.yml', 'out', '--dtype', 'int8'])
  assert info.value.code == 2
  err = capsys.readouterr().err
  (line,) = err.strip().splitlines()
  assert line.startswith("cljax-merge: error: argument --dtype: invalid choice: 'int8'")
  assert line.endswith('(see cljax-merge --help)')
