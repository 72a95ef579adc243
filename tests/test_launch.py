"""launch.py as a user runs it: config overrides, the default workdir name, bad keys."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def _launch(args, cwd):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600)


def test_launch_with_overrides_writes_results(tmp_path):
  proc = _launch(['--config.num_tasks=2', '--config.epochs=1', '--config.max_train=300',
                  '--config.max_test=100', '--config.batch_size=25', '--config.eval_batch_size=50',
                  '--config.methods=("finetune",)'], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = tmp_path / 'runs' / 'default'  # runs/<config file name>
  with open(workdir / 'finetune' / 'results.json') as f:
    results = json.load(f)
  assert len(results['accuracy_matrix']) == 2
  assert results['config']['num_tasks'] == 2
  assert (workdir / 'summary.md').exists()


def test_unknown_config_key_is_rejected(tmp_path):
  proc = _launch(['--config.num_taks=3'], cwd=tmp_path)
  assert proc.returncode != 0
  assert 'num_taks' in proc.stderr
  assert not (tmp_path / 'runs').exists()
