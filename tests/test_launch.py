"""launch.py as a user runs it: quiet output, default workdirs per overrides, one-line errors."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT

TINY = ['--config.epochs=1', '--config.max_train=300', '--config.max_test=100',
        '--config.batch_size=25', '--config.eval_batch_size=50', '--config.methods=("finetune",)']
ABSL_LINE = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d', re.M)   # absl's log line prefix


def _launch(args, cwd):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600)


def _workdirs(tmp_path):
  return sorted(os.listdir(tmp_path / 'runs'))


def test_launch_is_quiet_and_each_override_set_gets_its_workdir(tmp_path):
  proc = _launch(['--config.num_tasks=2', *TINY], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not ABSL_LINE.search(proc.stderr), proc.stderr[:2000]   # no Orbax / JAX INFO lines
  assert re.search(r'^finetune: ACC \d', proc.stderr, re.M)   # cljax's own lines, plain
  (first,) = _workdirs(tmp_path)
  assert re.fullmatch(r'default-[0-9a-f]{8}', first)   # runs/<config name>-<hash of overrides>
  assert proc.stdout.splitlines() == [f'results: {os.path.join("runs", first)}']
  with open(tmp_path / 'runs' / first / 'finetune' / 'results.json') as f:
    results = json.load(f)
  assert len(results['accuracy_matrix']) == 2 and results['config']['num_tasks'] == 2
  assert (tmp_path / 'runs' / first / 'summary.md').exists()
  # README's second example after the first: other overrides, another workdir, not a refusal.
  # --verbosity=0 brings back the INFO lines (and does not change the workdir's name).
  proc = _launch(['--config.num_tasks=1', *TINY, '--verbosity=0'], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ABSL_LINE.search(proc.stderr)
  assert len(_workdirs(tmp_path)) == 2 and first in _workdirs(tmp_path)


def _one_line_error(proc):
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('launch.py: error: '), proc.stderr[-3000:]
  return lines[0]


def test_unknown_config_key_is_one_line_with_the_suggestion(tmp_path):
  line = _one_line_error(_launch(['--config.num_taks=3'], cwd=tmp_path))
  assert line == ('launch.py: error: no config key \'num_taks\'; Did you mean "num_tasks" '
                  'instead of "num_taks"?')
  assert not (tmp_path / 'runs').exists()
  proc = _launch(['--config.num_taks=3', '--traceback'], cwd=tmp_path)
  assert proc.returncode != 0 and 'Traceback (most recent call last)' in proc.stderr


def test_bad_value_dataset_and_workdir_are_one_line(tmp_path):
  line = _one_line_error(_launch(['--config.num_tasks=abc'], cwd=tmp_path))
  assert 'flag --config.num_tasks=abc' in line
  line = _one_line_error(_launch(['--config.dataset=nope'], cwd=tmp_path))
  assert "dataset 'nope'" in line
  proc = _launch(['--config.dataset=nope', '--verbosity=1'], cwd=tmp_path)   # absl's default
  assert proc.returncode != 0 and 'Traceback (most recent call last)' in proc.stderr
  (tmp_path / 'afile').write_text('x')
  line = _one_line_error(_launch(['--workdir=afile'], cwd=tmp_path))
  assert line == "launch.py: error: --workdir 'afile' is a file, not a folder; pass a folder path"
