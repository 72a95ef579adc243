"""Tests for cljax.runners.pretrain: a continual run from a pretraining stage or a Hugging Face folder."""

import json
import os

import ml_collections
import numpy as np
import pytest

from cljax import models
from cljax.runners import continual as runner
from cljax.runners import pretrain


def _text_config(tiny_config, tmp_path):
  files = {}
  for name, word in (('general', 'the cat sat on the mat'), ('animals', 'cat dog'),
                     ('numbers', '1 2 3')):
    path = tmp_path / f'{name}.txt'
    path.write_text('\n\n'.join(f'{name} {i}: {word} {i * "x"}.' for i in range(8)) + '\n')
    files[name] = [str(path)]
  config = tiny_config
  config.max_train = config.max_test = 0
  config.stream, config.num_tasks, config.methods = 'text_domains', 2, ('finetune',)
  config.stream_kwargs = ml_collections.ConfigDict({
      'files': files, 'domains': ('animals', 'numbers'), 'seq_len': 8, 'test_fraction': 0.25})
  config.model = 'qwen3'
  config.model_kwargs = ml_collections.ConfigDict(dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=1, head_dim=16))
  config.optimizer, config.learning_rate, config.momentum = 'adam', 1e-2, 0.0
  config.batch_size, config.eval_batch_size, config.epochs = 4, 8, 1
  return config


def test_pretraining_stage_is_written_once_and_starts_every_method(tiny_config, tmp_path):
  config = _text_config(tiny_config, tmp_path)
  config.pretrain.domains = ('general',)
  config.pretrain.epochs, config.pretrain.learning_rate = 3, 1e-2
  config.methods = ('finetune', 'l2')
  workdir = tmp_path / 'run'
  results = runner.run(config, str(workdir))
  folder = workdir / pretrain.FOLDER
  summary = json.loads((folder / pretrain.SUMMARY).read_text())
  assert summary['domains'] == ['general'] and summary['final_loss'] < summary['first_loss']
  _, params = models.from_pretrained(str(folder))
  # Both methods' zero-shot row (before task 0) is the pretrained model's, not a random init's.
  for name in config.methods:
    init_nll = np.asarray(results[name]['random_init_nll'])
    assert np.all(init_nll < np.log(259)), name  # Better than uniform over the byte vocabulary.
  assert results['finetune']['random_init_nll'] == results['l2']['random_init_nll']
  mtime = os.path.getmtime(folder / 'model.safetensors')
  runner.run(config, str(workdir))  # Resume: the stage is not trained again.
  assert os.path.getmtime(folder / 'model.safetensors') == mtime
  del params


def test_init_from_a_folder_equals_its_weights(tiny_config, tmp_path):
  config = _text_config(tiny_config, tmp_path)
  module = models.make_model('qwen3', num_outputs=259, **dict(config.model_kwargs))
  import jax
  params = models.init_params(module, jax.random.key(7), (8,))
  models.save_pretrained(str(tmp_path / 'hf'), params, like=module)
  config.init_from = str(tmp_path / 'hf')
  config.model_kwargs = ml_collections.ConfigDict()  # Not used with init_from.
  config.epochs = 1
  results = runner.run(config, str(tmp_path / 'run'))['finetune']
  apply_fn = models.linen_apply_fn(module)
  # The zero-shot NLL on task 0's test split, from the saved params directly.
  from cljax import training
  stream = runner.build_stream(config)
  from cljax import sharding
  ev = training.Evaluator(apply_fn, [t.test for t in stream.tasks], batch_size=8,
                          mesh=sharding.make_mesh(None)).evaluate_all(params)
  np.testing.assert_allclose(results['random_init_nll'], ev.nll, rtol=1e-5)


@pytest.mark.parametrize('change, message', [
    (dict(init_from='/no/such/folder'), r'init_from=.*not a Hugging Face model folder'),
    (dict(pretrain_domains=('general',), init_from='x'), r'both set'),
    (dict(pretrain_domains=('general',), pretrain_epochs=0), r'pretrain\.epochs'),
])
def test_bad_starting_points_fail_before_writing(tiny_config, tmp_path, change, message):
  config = _text_config(tiny_config, tmp_path)
  if 'init_from' in change:
    config.init_from = change['init_from']
  if 'pretrain_domains' in change:
    config.pretrain.domains = change['pretrain_domains']
  if 'pretrain_epochs' in change:
    config.pretrain.epochs = change['pretrain_epochs']
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    runner.run(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_pretraining_needs_a_text_stream(tiny_config, tmp_path):
  tiny_config.pretrain.domains = ('bible',)
  with pytest.raises(ValueError, match=r'not a text stream'):
    runner.run(tiny_config, str(tmp_path / 'run'))
