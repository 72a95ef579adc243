"""experiment.run end to end on real digits: outputs, resume after an interruption, bad input."""

import json
import os

import numpy as np
import pytest

from cljax.runners import continual as experiment
from cljax import training


def _read(workdir, method):
  with open(os.path.join(workdir, method, 'results.json')) as f:
    return json.load(f)


def test_outputs_and_summary(tiny_config, tmp_path):
  workdir = str(tmp_path / 'run')
  results = experiment.run(tiny_config, workdir)
  assert set(results) == {'finetune', 'ewc'}
  for method in ('finetune', 'ewc'):
    res = _read(workdir, method)
    r = np.asarray(res['accuracy_matrix'])
    assert r.shape == (3, 3) and ((r >= 0) & (r <= 1)).all()
    assert len(res['random_init_accuracy']) == 3
    assert res['acc'] == pytest.approx(r[-1].mean())
    for key in ('bwt', 'fwt', 'forgetting', 'wall_time_s', 'config'):
      assert key in res
    assert os.path.getsize(os.path.join(workdir, method, 'accuracy_matrix.png')) > 1000
    assert sorted(os.listdir(os.path.join(workdir, method, 'checkpoints'))) == ['1', '2', '3']
  with open(os.path.join(workdir, 'summary.csv')) as f:
    lines = f.read().splitlines()
  assert lines[0] == 'method,acc,bwt,fwt,forgetting,wall_time_s' and len(lines) == 3
  assert '| ewc |' in open(os.path.join(workdir, 'summary.md')).read()


class Interrupt(Exception):
  pass


def test_resume_after_interruption_matches_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
  full = experiment.run(tiny_config, str(tmp_path / 'full'))
  real_fit = training.fit_task

  def fit_until_task_2(*args, task_index=0, **kwargs):
    if task_index == 2:
      raise Interrupt()
    return real_fit(*args, task_index=task_index, **kwargs)

  workdir = str(tmp_path / 'interrupted')
  monkeypatch.setattr(training, 'fit_task', fit_until_task_2)
  with pytest.raises(Interrupt):
    experiment.run(tiny_config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'finetune', 'checkpoints'))) == ['1', '2']
  monkeypatch.setattr(training, 'fit_task', real_fit)
  calls = []
  monkeypatch.setattr(training, 'fit_task', lambda *a, **k: calls.append(k['task_index']) or real_fit(*a, **k))
  resumed = experiment.run(tiny_config, workdir)
  assert calls == [2, 0, 1, 2]  # finetune resumes at its last task; ewc starts afresh
  for method in ('finetune', 'ewc'):
    np.testing.assert_allclose(resumed[method]['accuracy_matrix'], full[method]['accuracy_matrix'],
                               atol=1e-6)


def test_workdir_of_another_config_is_refused_and_untouched(tiny_config, tmp_path):
  workdir = str(tmp_path / 'run')
  tiny_config.methods = ('finetune',)
  experiment.run(tiny_config, workdir)
  before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
  tiny_config.learning_rate = 0.01
  with pytest.raises(ValueError, match=r'different config \(keys differing: learning_rate\)'):
    experiment.run(tiny_config, workdir)
  after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
  # The lock file records the pid of the latest claimant (cljax.workdir); nothing else changes.
  before.pop('.lock'), after.pop('.lock')
  assert before == after


@pytest.mark.parametrize('key, value, match', [
    ('methods', ('finetune', 'magic'), "unknown method 'magic'"),
    ('dataset', 'imagenet', 'imagenet'),
    ('stream', 'shuffled', 'shuffled'),
    ('model', 'transformer', "unknown model 'transformer'"),
    ('optimizer', 'lion', "unknown optimizer 'lion'"),
    ('batch_size', 0, 'batch_size=0'),
])
def test_bad_config_values(tiny_config, tmp_path, key, value, match):
  tiny_config[key] = value
  with pytest.raises(ValueError, match=match):
    experiment.run(tiny_config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_unknown_method_hyperparameter(tiny_config, tmp_path):
  tiny_config.ewc.unlock()
  tiny_config.ewc.strenght = 5.0
  with pytest.raises(ValueError, match='ewc.strenght'):
    experiment.run(tiny_config, str(tmp_path / 'run'))
  # Named before any data is read: a missing dataset is not what fails first.
  tiny_config.dataset = 'fashion_mnist'
  tiny_config.data_dir = str(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match='ewc.strenght'):
    experiment.run(tiny_config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_too_many_tasks_for_split(tiny_config, tmp_path):
  tiny_config.stream = 'split'
  tiny_config.num_tasks = 11
  with pytest.raises(ValueError, match='num_tasks'):
    experiment.run(tiny_config, str(tmp_path / 'run'))


def test_missing_dataset_file_says_how_to_install(tiny_config, tmp_path):
  tiny_config.dataset = 'fashion_mnist'
  tiny_config.data_dir = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
    experiment.run(tiny_config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_task_incremental_split_runs(tiny_config, tmp_path):
  tiny_config.stream = 'split'
  tiny_config.scenario = 'task'
  tiny_config.num_tasks = 5
  tiny_config.epochs = 5
  tiny_config.methods = ('finetune', 'joint')
  results = experiment.run(tiny_config, str(tmp_path / 'run'))
  # Two-way heads on digits: every task is well above chance once learned.
  assert np.diag(results['joint']['accuracy_matrix']).min() > 0.8
