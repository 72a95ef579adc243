"""The continual runner around the loop: checks before the workdir is claimed (F2, F9), a resume
refused when a stage was written with another config (F1), and what a run writes (metric files,
loss curve, accuracy curves, one line per task)."""

import csv
import json
import logging
import os

import numpy as np
import pytest

from cljax.runners import continual as runner


@pytest.mark.parametrize('key, value, match', [
    ('batch_size', 100000, r'batch_size=100000 exceeds the \d+ training examples of task 0'),
    ('epochs', 0, r'epochs must be an int >= 1, got 0'),
    ('seed', -1, r'seed must be an int >= 0, got -1'),
    ('learning_rate', float('nan'), r'learning_rate must be a finite number > 0'),
])
def test_bad_values_fail_before_the_workdir_exists(tiny_config, tmp_path, key, value, match):
  setattr(tiny_config, key, value)
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=match):
    runner.run(tiny_config, str(workdir))
  assert not workdir.exists()


def test_bad_model_kwargs_name_the_key(tiny_config, tmp_path):
  tiny_config.model_kwargs.hidden = (-5,)
  with pytest.raises(ValueError, match=r'model_kwargs.hidden must be positive ints, got \(-5,\)'):
    runner.run(tiny_config, str(tmp_path / 'run'))


def test_resume_without_config_json_checks_the_stage(tiny_config, tmp_path):
  tiny_config.methods = ('finetune',)
  workdir = tmp_path / 'run'
  runner.run(tiny_config, str(workdir))
  os.remove(workdir / 'config.json')
  tiny_config.learning_rate = 0.01
  with pytest.raises(ValueError, match=r'stage 3 of method finetune was written with a different '
                                       r'config \(keys differing: learning_rate\)'):
    runner.run(tiny_config, str(workdir))
  assert not (workdir / 'config.json').exists()


def test_outputs_metrics_and_task_lines(tiny_config, tmp_path, caplog):
  tiny_config.methods = ('finetune', 'replay+ewc')
  workdir = tmp_path / 'run'
  with caplog.at_level(logging.INFO):
    results = runner.run(tiny_config, str(workdir))
  for method in tiny_config.methods:
    folder = workdir / method
    with open(folder / 'results.json') as f:
      stored = json.load(f)
    # One mean loss per epoch (3 tasks x 2 epochs), and NLLs beside the accuracies.
    assert len(stored['loss_curve']) == 6 and all(np.isfinite(stored['loss_curve']))
    assert np.asarray(stored['nll_matrix']).shape == (3, 3)
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(folder))
    with open(folder / 'train.csv') as f:
      rows = list(csv.DictReader(f))
    assert len(rows) == 6
    np.testing.assert_allclose([float(r['loss']) for r in rows], stored['loss_curve'],
                               rtol=1e-5)
    row = np.asarray(stored['accuracy_matrix'])[-1]
    line = f'{method} task 3/3: acc on tasks 1..3 = ' + ' '.join(f'{100 * a:.1f}' for a in row)
    assert line in caplog.text
  assert (workdir / 'accuracy_curves.png').stat().st_size > 0
  assert set(results) == {'finetune', 'replay+ewc'}


def test_method_init_errors_come_before_any_method_runs(tiny_config, tmp_path):
  """l2.param_regex matching no parameter is found by init: before finetune trains and writes."""
  tiny_config.methods = ('finetune', 'l2')
  tiny_config.l2.param_regex = 'nope/.*'
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=r"l2.param_regex='nope/\.\*' matches no parameter"):
    runner.run(tiny_config, str(workdir))
  assert not workdir.exists()


def test_merge_runner_checks_epochs_before_the_workdir(tmp_path):
  from experiments.configs import merge_digits
  from cljax.runners import merge
  config = merge_digits.get_config()
  config.finetune.epochs = 0
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=r'finetune.epochs must be an int >= 1, got 0'):
    merge.run(config, str(workdir))
  assert not workdir.exists()


def test_resume_with_another_model_names_the_keys_not_a_layout_mismatch(tiny_config, tmp_path):
  tiny_config.methods = ('finetune',)
  workdir = tmp_path / 'run'
  runner.run(tiny_config, str(workdir))
  os.remove(workdir / 'config.json')
  tiny_config.model_kwargs.hidden = (50, 50)
  with pytest.raises(ValueError, match=r'keys differing: model_kwargs.hidden'):
    runner.run(tiny_config, str(workdir))


def test_text_domains_through_the_runner(tiny_config, tmp_path):
  """A config naming the text stream and a tiny Qwen3 runs end to end: token accuracy and NLL
  matrices, no image dataset loaded."""
  import ml_collections
  files = {}
  for name, word in (('animals', 'cat dog'), ('numbers', '1 2 3')):
    path = tmp_path / f'{name}.txt'
    path.write_text('\n\n'.join(f'{name} {i}: {word} {i * "x"}.' for i in range(8)) + '\n')
    files[name] = [str(path)]
  config = tiny_config
  config.dataset = 'no-such-dataset'  # Not read by a text stream.
  config.max_train = config.max_test = 0
  config.stream, config.num_tasks, config.methods = 'text_domains', 2, ('finetune',)
  config.stream_kwargs = ml_collections.ConfigDict({'files': files, 'seq_len': 8,
                                                    'test_fraction': 0.25})
  config.model = 'qwen3'
  config.model_kwargs = ml_collections.ConfigDict(dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=1, head_dim=16))
  config.optimizer, config.learning_rate, config.momentum = 'adam', 1e-2, 0.0
  config.batch_size, config.eval_batch_size, config.epochs = 4, 8, 2
  results = runner.run(config, str(tmp_path / 'run'))['finetune']
  r, nll = np.asarray(results['accuracy_matrix']), np.asarray(results['nll_matrix'])
  assert r.shape == nll.shape == (2, 2)
  assert np.all((r >= 0) & (r <= 1)) and np.all(np.isfinite(nll))
  assert nll[0, 0] < np.log(259)  # Learned something about task 0's bytes.
