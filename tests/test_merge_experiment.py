"""runners.merge.run end to end on real digits: outputs, numpy references, resume, bad input."""

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

from cljax import checkpoint
from cljax.runners import merge as merge_experiment
from cljax import training
from cljax.data import sources

METHODS = ('continual_average', 'continual_task_arithmetic', 'continual_ties', 'opcm')


def _tiny_config():
  """merge_digits cut to 4 tasks, 2 orders and a few epochs of a 32-32 MLP (seconds on a CPU)."""
  from experiments.configs import merge_digits
  c = merge_digits.get_config()
  # Two permuted tasks: every pixel is nonzero in some task's held-out inputs, so RegMean's
  # summed Gram is invertible (sklearn digits has pixels that are 0 in every image).
  c.task_streams = (('split', 2), ('permuted', 2))
  c.stream_kwargs = {}
  c.model_kwargs.hidden = (32, 32)
  c.num_pretrain = 500
  c.num_heldout = 16
  c.max_train = 192
  c.max_test = 120
  c.pretrain.epochs = 6
  c.probe.epochs = 6
  c.finetune.epochs = 3
  c.num_orders = 2
  c.fisher.num_samples = 32
  c.frank_wolfe.num_steps = 3
  c.wudi.num_steps = 20
  c.adamerging.num_steps = 20
  c.soft_frank_wolfe.num_iterations = 2
  c.soft_frank_wolfe.ada_steps = 10
  return c


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """One complete run: (config, workdir, results)."""
  config = _tiny_config()
  workdir = str(tmp_path_factory.mktemp('merge') / 'run')
  return config, workdir, merge_experiment.run(config, workdir)


def _steps(directory):
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def test_outputs(finished):
  config, workdir, results = finished
  t = 4
  assert len(results['tasks']) == t and results['tasks'][0].startswith('split-0')
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['static']['ties']['per_task'] == results['static']['ties']['per_task']
  assert set(results['static']) == set(config.static_methods)
  assert set(results['continual']) == set(METHODS)
  for res in [results['zero_shot'], results['experts'], *results['static'].values()]:
    assert len(res['per_task']) == t and all(0 <= a <= 1 for a in res['per_task'])
  assert results['experts']['normalized_acc'] == 1.0
  for res in results['continual'].values():
    assert np.shape(res['seen_accuracy']) == (2, t)
    assert len(res['orders']) == 2 and sorted(res['orders'][0]) == list(range(t))
  # Every model and every merge step is an Orbax checkpoint.
  for name in ['base'] + [f'{k}{i}' for k in ('probe', 'expert') for i in range(t)]:
    assert _steps(os.path.join(workdir, 'models', name)) == [1]
  for method in METHODS:
    for k in range(2):
      assert _steps(os.path.join(workdir, 'continual', method, f'order{k}')) == [1, 2, 3, 4]
  with open(os.path.join(workdir, 'summary.csv')) as f:
    lines = f.read().splitlines()
  assert lines[0].startswith('method,kind,acc,acc_std,normalized,normalized_std,task0')
  assert len(lines) == 1 + 2 + len(config.static_methods) + len(METHODS)
  summary = open(os.path.join(workdir, 'summary.md')).read()
  assert '| opcm | continual |' in summary and '| fisher | static |' in summary
  assert '| emr | per_task |' in summary and '| regmean | static |' in summary
  for plot in ('continual_accuracy.png', 'static_accuracy.png'):
    assert os.path.getsize(os.path.join(workdir, plot)) > 5000


def _restore(workdir, name, like):
  with checkpoint.StageCheckpointer(os.path.join(workdir, 'models', name)) as ckpt:
    return jax.device_get(ckpt.restore(1, {'params': like}).state['params'])


def _mlp_accuracy(params, data):
  """An independent numpy forward pass of the bundled MLP, masked to each example's head."""
  h = data.x.reshape(data.x.shape[0], -1).astype(np.float64)
  for i in range(len(params) - 1):
    layer = params[f'dense{i}']
    h = np.maximum(h @ layer['kernel'] + layer['bias'], 0.0)
  logits = h @ params['head']['kernel'] + params['head']['bias']
  logits = np.where(data.mask, logits, -np.inf)
  return float(np.mean(np.argmax(logits, axis=1) == data.y))


def test_merges_match_numpy_references(finished):
  config, workdir, results = finished
  data = merge_experiment.build_data(
      sources.load('digits'), task_streams=config.task_streams, stream_kwargs={},
      num_pretrain=config.num_pretrain, max_train=config.max_train, max_test=config.max_test,
      num_heldout=config.num_heldout, seed=config.seed)
  from cljax import models
  module = models.make_model('mlp', num_outputs=10, **dict(config.model_kwargs))
  like = models.init_params(module, jax.random.key(0), data.input_shape)
  base = _restore(workdir, 'base', like)
  experts = [_restore(workdir, f'expert{t}', like) for t in range(4)]
  probes = [_restore(workdir, f'probe{t}', like) for t in range(4)]
  one_example = 1.0 / config.max_test + 1e-9  # float32 vs float64 may flip a near-tie
  for t, task in enumerate(data.tasks):
    # Linear probes leave the backbone bit-identical to the base.
    for layer in ('dense0', 'dense1'):
      np.testing.assert_array_equal(probes[t][layer]['kernel'], base[layer]['kernel'])
    assert abs(_mlp_accuracy(experts[t], task.test) - results['experts']['per_task'][t]) <= one_example
    assert abs(_mlp_accuracy(probes[t], task.test) - results['zero_shot']['per_task'][t]) <= one_example
    # Average and task arithmetic of the backbones, with task t's own head.
    lam = config.task_arithmetic.scaling
    for method, combine in (('average', lambda b, xs: np.mean(xs, 0)),
                            ('task_arithmetic', lambda b, xs: b + lam * np.sum(np.subtract(xs, b), 0))):
      merged = {layer: {k: combine(base[layer][k], [e[layer][k] for e in experts])
                        for k in ('kernel', 'bias')} for layer in ('dense0', 'dense1')}
      merged['head'] = experts[t]['head']
      got = results['static'][method]['per_task'][t]
      assert abs(_mlp_accuracy(merged, task.test) - got) <= one_example, (method, t)
  # EMR: task t's own model from the elected vector, its mask and rescaler (numpy, float64).
  layers = [(layer, k) for layer in ('dense0', 'dense1') for k in ('kernel', 'bias')]
  tvs = [{lk: e[lk[0]][lk[1]].astype(np.float64) - base[lk[0]][lk[1]] for lk in layers}
         for e in experts]
  sign = {lk: np.where(sum(tv[lk] for tv in tvs) > 0, 1.0, -1.0) for lk in layers}
  masks = [{lk: tv[lk] * sign[lk] > 0 for lk in layers} for tv in tvs]
  unified = {lk: sign[lk] * np.max([np.abs(np.where(m[lk], tv[lk], 0)) for m, tv in
                                    zip(masks, tvs)], 0) for lk in layers}
  # RegMean: Grams of each expert's layer inputs on its task's held-out examples.
  alpha = config.regmean.alpha
  grams = []
  for e, held in zip(experts, data.heldout):
    x0 = held.x.reshape(held.x.shape[0], -1).astype(np.float64)
    x1 = np.maximum(x0 @ e['dense0']['kernel'] + e['dense0']['bias'], 0.0)
    grams.append([x.T @ x / x.shape[0] for x in (x0, x1)])
  reduced = [[alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in gs] for gs in grams]
  regmean = {}
  for i, layer in enumerate(('dense0', 'dense1')):
    rhs = sum(r[i] @ e[layer]['kernel'] for r, e in zip(reduced, experts))
    regmean[layer] = {'kernel': np.linalg.solve(sum(r[i] for r in reduced), rhs),
                      'bias': np.mean([e[layer]['bias'] for e in experts], 0)}
  for t, task in enumerate(data.tasks):
    lam = (sum(np.mean(np.abs(tvs[t][lk])) for lk in layers) /
           sum(np.mean(np.abs(np.where(masks[t][lk], unified[lk], 0))) for lk in layers))
    emr_model = {layer: {k: base[layer][k] + lam * np.where(masks[t][(layer, k)],
                                                            unified[(layer, k)], 0)
                         for k in ('kernel', 'bias')} for layer in ('dense0', 'dense1')}
    for method, model in (('emr', emr_model), ('regmean', regmean)):
      model = dict(model, head=experts[t]['head'])
      got = results['static'][method]['per_task'][t]
      assert abs(_mlp_accuracy(model, task.test) - got) <= one_example, (method, t)
  # Normalized accuracy is merged / expert per task, averaged.
  expert_acc = np.asarray(results['experts']['per_task'])
  for res in results['static'].values():
    np.testing.assert_allclose(res['normalized_acc'], np.mean(res['per_task'] / expert_acc))
  # The continual average / task arithmetic of all models are the static ones, in every order;
  # after one merge, the continual average and OPCM are exactly the first expert.
  for cont, stat in (('continual_average', 'average'), ('continual_task_arithmetic',
                                                        'task_arithmetic')):
    np.testing.assert_allclose(results['continual'][cont]['final_per_task_mean'],
                               results['static'][stat]['per_task'], atol=one_example)
  for method in ('continual_average', 'opcm'):
    res = results['continual'][method]
    for order, curve in zip(res['orders'], res['seen_accuracy']):
      assert curve[0] == pytest.approx(expert_acc[order[0]], abs=1e-12)


class Interrupt(Exception):
  pass


def _counting(counts, name, ctor, stop_at=None):
  @functools.wraps(ctor)  # The experiment reads the constructor's keyword arguments.
  def make(**kwargs):
    merge = ctor(**kwargs)

    def update(state, finetuned):
      counts[name] = counts.get(name, 0) + 1
      if counts[name] == stop_at:
        raise Interrupt()
      return merge.update(state, finetuned)
    return merge._replace(update=update)
  return make


def test_stopped_run_resumes_after_its_last_merge(finished, tmp_path, monkeypatch):
  _, done_dir, done = finished
  config = _tiny_config()
  config.static_methods = ()  # Merges only: the stage checkpoints are what is tested here.
  config.continual_methods = ('continual_average', 'opcm')
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)  # The finished run's trained models; no merges yet.
  shutil.copytree(os.path.join(done_dir, 'models'), os.path.join(workdir, 'models'))

  def no_training(*args, **kwargs):
    raise AssertionError('a model was trained again instead of restored')
  monkeypatch.setattr(training, 'fit_task', no_training)
  ctors = dict(merge_experiment.CONTINUAL_MERGES)
  counts = {}
  for name in config.continual_methods:  # OPCM, merged last, stops in order 1 after 1 merge.
    monkeypatch.setitem(merge_experiment.CONTINUAL_MERGES, name,
                        _counting(counts, name, ctors[name], 6 if name == 'opcm' else None))
  with pytest.raises(Interrupt):
    merge_experiment.run(config, workdir)
  assert counts == {'continual_average': 8, 'opcm': 6}
  assert _steps(os.path.join(workdir, 'continual', 'opcm', 'order0')) == [1, 2, 3, 4]
  assert _steps(os.path.join(workdir, 'continual', 'opcm', 'order1')) == [1]
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  counts.clear()
  for name in config.continual_methods:
    monkeypatch.setitem(merge_experiment.CONTINUAL_MERGES, name,
                        _counting(counts, name, ctors[name]))
  resumed = merge_experiment.run(config, workdir)
  assert counts == {'opcm': 3}  # Only the 3 merges left in order 1; the rest was restored.
  assert _steps(os.path.join(workdir, 'continual', 'opcm', 'order1')) == [1, 2, 3, 4]
  for name in config.continual_methods:  # The same result as the uninterrupted run.
    assert resumed['continual'][name]['task_accuracy'] == done['continual'][name]['task_accuracy']
  assert os.path.exists(os.path.join(workdir, 'results.json'))


@pytest.mark.parametrize('key, value, match', [
    ('static_methods', ('average', 'soup'), "unknown static merge 'soup'"),
    ('static_methods', ('average', 'opcm'), "unknown static merge 'opcm'"),
    ('breadcrumbs.gamma', 1.5, r'gamma must lie in \[0, 1\]'),
    ('regmean.alpha', -0.5, r'alpha must lie in \[0, 1\]'),
    ('adamerging.granularity', 'neuron', 'granularity'),
    ('continual_methods', ('opcm', 'continual_magic'), "unknown continual merge 'continual_magic'"),
    ('ties.density', 1.5, r'density must lie in \[0, 1\]'),
    ('dare_ties.drop_rate', -0.1, 'drop_rate'),
    ('opcm.alpha', 0.0, r'alpha must lie in \(0, 1\]'),
    ('frank_wolfe.criterion', 'sine', 'criterion'),
    ('exclude', 'heads/.*', 'matches no parameter'),
    ('finetune.optimizer', 'lion', "unknown optimizer 'lion'"),
    ('num_pretrain', 5000, 'num_pretrain'),
])
def test_bad_config_fails_before_writing(tmp_path, key, value, match):
  config = _tiny_config()
  *path, last = key.split('.')
  node = config
  for part in path:
    node = node[part]
  node[last] = value
  with pytest.raises(ValueError, match=match):
    merge_experiment.run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_unknown_hyperparameter_is_named(tmp_path):
  config = _tiny_config()
  config.ties.unlock()
  config.ties.densty = 0.3
  with pytest.raises(ValueError, match='ties.densty'):
    merge_experiment.run(config, str(tmp_path / 'run'))


def test_workdir_of_another_config_is_refused(finished):
  config, workdir, _ = finished
  config = _tiny_config()
  config.opcm.alpha = 0.7
  with pytest.raises(ValueError, match=r'keys differing: opcm.alpha'):
    merge_experiment.run(config, workdir)


def test_build_data_holds_out_and_caps():
  data = merge_experiment.build_data(
      sources.digits(), task_streams=[('split', 2), ('permuted', 1)], stream_kwargs={},
      num_pretrain=700, max_train=100, max_test=50, num_heldout=10, seed=3)
  assert data.pretrain.size == 700 and len(data.tasks) == len(data.heldout) == 3
  for task, held in zip(data.tasks, data.heldout):
    assert task.train.size == 100 and task.test.size == 50 and held.size == 10
    rows = {r.tobytes() for r in task.train.x}
    assert not any(r.tobytes() in rows for r in held.x)  # held out means never trained on
  split0 = data.tasks[0]
  classes = sorted(set(split0.train.y))
  assert len(classes) == 5 and split0.train.mask[:, classes].all()
  assert split0.train.mask.sum(1).tolist() == [5] * 100
  pre_rows = {r.tobytes() for r in data.pretrain.x}
  assert not any(r.tobytes() in pre_rows for r in split0.train.x)  # disjoint examples
