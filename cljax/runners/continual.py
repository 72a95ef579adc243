"""``run(config, workdir)``: data -> model -> method -> per-task loop -> checkpoints -> report.

This is the only module below `launch.py` that reads a config object; everything it calls takes
plain arguments. Each method in ``config.methods`` runs on the same stream in
``workdir/<method>/``, with an Orbax stage checkpoint after every task, so that re-running with the
same workdir resumes after the last completed task and ends with the same accuracy matrix.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from cljax import checkpoint
from cljax import checks
from cljax import continual
from cljax import core
from cljax import methods as methods_lib
from cljax import metrics
from cljax import models
from cljax import report
from cljax import sharding
from cljax import training
from cljax import workdir as workdir_lib
from cljax.data import sources
from cljax.data import streams
from cljax.runners import pretrain

def config_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON types (tuples become lists), for saving and comparing."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _check_values(config: ml_collections.ConfigDict) -> None:
  """The config values that can be checked before any data is loaded or anything written."""
  checks.integer('epochs', config.epochs, minimum=1)
  checks.integer('num_tasks', config.num_tasks, minimum=1)
  checks.integer('seed', config.seed, minimum=0)
  checks.positive('learning_rate', config.learning_rate)
  checks.non_negative('momentum', config.momentum)
  for key in ('hidden', 'channels'):
    widths = config.model_kwargs.get(key)
    if widths is not None and not all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                                      for w in widths):
      raise ValueError(f'model_kwargs.{key} must be positive ints, got {tuple(widths)!r}')


def build_stream(config: ml_collections.ConfigDict) -> streams.Stream:
  """The task sequence named by the config's data keys."""
  if config.stream in streams.DATASET_FREE:  # Text domains read their corpora themselves.
    return streams.make_stream(config.stream, None, num_tasks=config.num_tasks, seed=config.seed,
                               scenario=config.scenario or None, **dict(config.stream_kwargs))
  dataset = sources.load(config.dataset, data_dir=config.data_dir or None,
                         download=config.get('download', False))
  if config.max_train or config.max_test:
    dataset = sources.subsample(dataset, max_train=config.max_train or None,
                                max_test=config.max_test or None, seed=config.seed)
  return streams.make_stream(config.stream, dataset, num_tasks=config.num_tasks, seed=config.seed,
                             scenario=config.scenario or None, **dict(config.stream_kwargs))


def _rules(config: ml_collections.ConfigDict) -> list[sharding.Rule]:
  """``config.sharding_rules`` as (regex, spec) pairs."""
  return [(regex, tuple(spec)) for regex, spec in config.sharding_rules]


def method_from_config(config: ml_collections.ConfigDict, name: str, *, input_shape):
  """The method ``name`` (members joined by '+') built from each member's config block.

  Raises:
    ValueError: an unknown member, or a bad hyperparameter (named ``<member>.<key>``).
  """
  blocks = {m: config.get(m) for m in methods_lib.members(name)}
  return methods_lib.get(name, blocks=blocks, input_shape=input_shape)


def _abstract_params(config: ml_collections.ConfigDict, stream: streams.Stream) -> Any:
  """The shapes of the starting params (``config.init_from``'s, or ``config.model``'s).

  Raises:
    ValueError: the model cannot be built with ``model_kwargs``, or ``init_from`` does not load.
  """
  if config.get('init_from'):
    return jax.eval_shape(lambda: pretrain.load(config.init_from)[1])
  module = models.make_model(config.model, num_outputs=stream.num_outputs,
                             **dict(config.model_kwargs))
  try:
    return jax.eval_shape(
        lambda key: models.init_params(module, key, stream.input_shape), jax.random.key(0))
  except (ValueError, TypeError) as e:
    raise ValueError(f'model {config.model!r} cannot be built with model_kwargs='
                     f'{dict(config.model_kwargs)}: {e}') from None


class _Run:
  """One method on the stream, in ``workdir``: fresh start or resume from the last stage."""

  def __init__(self, config, stream, method_name, workdir, mesh, claim, start_folder=None):
    self.config, self.stream, self.name, self.workdir, self.mesh, self.claim = (
        config, stream, method_name, workdir, mesh, claim)
    self.method = method_from_config(config, method_name, input_shape=stream.input_shape)
    self.optimizer = training.make_optimizer(config.optimizer, learning_rate=config.learning_rate,
                                             momentum=config.momentum)
    if start_folder:  # config.init_from or the run's pretraining stage.
      self.apply_fn, self.params0 = pretrain.load(start_folder)
      return
    module = models.make_model(config.model, num_outputs=stream.num_outputs,
                               **dict(config.model_kwargs))
    self.apply_fn = models.linen_apply_fn(module)
    self.params0 = models.init_params(module, jax.random.key(config.seed), stream.input_shape)

  def run(self) -> dict:
    config, num_tasks = self.config, len(self.stream.tasks)
    state = continual.initial_state(self.params0, self.method, self.optimizer, seed=config.seed,
                                    mesh=self.mesh)
    primary = jax.process_index() == 0
    with checkpoint.StageCheckpointer(os.path.join(self.workdir, 'checkpoints'),
                                      name=self.name) as ckpt, \
        (report.MetricWriter(self.workdir) if primary else contextlib.nullcontext()) as writer:
      start = ckpt.latest_step() or 0
      if start:
        # The stored config first: it decides the arrays' layout (a changed model would
        # otherwise be reported as a mismatching checkpoint, not as the keys that differ).
        workdir_lib.check_resume(ckpt.restore_meta(start).get('config'), config_dict(config),
                                 workdir=os.path.dirname(self.workdir), method=self.name,
                                 stage=start)
        stage = ckpt.restore(start, state._asdict())
        self.claim.record_config()
        state, meta = continual.StreamState(**stage.state), stage.meta
        logging.info('%s: resuming after task %d of %d', self.name, start, num_tasks)
      else:
        init_eval = continual.evaluate_stream(self.apply_fn, self.params0, self.stream,
                                              batch_size=config.eval_batch_size, mesh=self.mesh)
        meta = dict(accuracy_rows=[], nll_rows=[], loss_curve=[],
                    random_init_accuracy=init_eval.accuracy.tolist(),
                    random_init_nll=init_eval.nll.tolist(), wall_time_s=0.0,
                    config=config_dict(config))
      rows = [core.Evaluation(np.asarray(a), np.asarray(n))
              for a, n in zip(meta['accuracy_rows'], meta['nll_rows'])]
      with tqdm.tqdm(total=0, desc=self.name, unit='step', leave=False) as bar:
        started = [time.time()]

        def on_task_start(t, steps):
          bar.total += steps
          bar.set_postfix_str(f'task {t + 1}/{num_tasks}')
          bar.refresh()

        def on_epoch(t, epoch, losses):
          del t, epoch
          meta['loss_curve'].append(float(np.mean(losses)))
          if writer is not None:  # One point per epoch: (epoch index over the run, mean loss).
            writer.write_scalars(len(meta['loss_curve']), {'train/loss': meta['loss_curve'][-1]})
          bar.update(len(losses))

        def on_task_end(done, new_state, row):
          meta['accuracy_rows'].append(row.accuracy.tolist())
          meta['nll_rows'].append(row.nll.tolist())
          meta['wall_time_s'] += time.time() - started[0]
          ckpt.save(done, new_state._asdict(), meta)
          self.claim.record_config()
          if writer is not None:
            writer.write_scalars(done, {**report.accuracy_row_scalars(row.accuracy),
                                        'eval/mean_nll': float(np.mean(row.nll[:done]))})
          logging.info('%s %s', self.name, report.task_row_line(done - 1, num_tasks,
                                                                 row.accuracy))
          started[0] = time.time()

        continual.run_stream(
            self.apply_fn, self.params0, self.method, self.optimizer, self.stream,
            epochs=config.epochs, batch_size=config.batch_size,
            eval_batch_size=config.eval_batch_size, mesh=self.mesh, param_rules=_rules(config),
            start=start, state=state, rows=rows, on_task_start=on_task_start,
            on_epoch=on_epoch, on_task_end=on_task_end)
    return self._results(meta)

  def _results(self, meta: dict) -> dict:
    r = np.asarray(meta['accuracy_rows'])
    b = np.asarray(meta['random_init_accuracy'])
    summary = metrics.summarize(r, b)
    results = dict(method=self.name, accuracy_matrix=r.tolist(), random_init_accuracy=b.tolist(),
                   nll_matrix=meta['nll_rows'], random_init_nll=meta['random_init_nll'],
                   loss_curve=meta['loss_curve'], config=meta['config'],
                   wall_time_s=meta['wall_time_s'], **summary._asdict())
    if jax.process_index() != 0:  # Only process 0 writes reports.
      return results
    report.write_json(os.path.join(self.workdir, 'results.json'), results)
    report.plot_accuracy_matrix(os.path.join(self.workdir, 'accuracy_matrix.png'), r,
                                title=f'{self.name}: ACC {100 * summary.acc:.1f}%, '
                                      f'BWT {100 * summary.bwt:.1f}')
    return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """Runs every method of ``config.methods`` on the config's stream; writes and returns results.

  Args:
    config: an experiment config (see experiments/configs/default.py for the keys).
    workdir: output directory; holds ``config.json``, ``<method>/`` (checkpoints, results.json,
      accuracy_matrix.png), and ``summary.md`` / ``summary.csv``.

  Returns:
    ``{method: results}``, each as written to ``workdir/<method>/results.json``.

  Raises:
    ValueError: an unknown method, model, dataset, stream or hyperparameter; a num_tasks the
      stream cannot supply; or a workdir holding a run of another config. Raised before anything
      in the workdir is written or changed.
    FileNotFoundError: a dataset file is missing (the message says how to install it).
    FloatingPointError: the loss became NaN (the last good stage checkpoint is kept).
  """
  if not config.methods:
    raise ValueError('config.methods is empty: name at least one method')
  _check_values(config)
  pretrain.check(config)
  for name in config.methods:  # A misspelt method or key fails before any data loading.
    for member in methods_lib.members(name):
      methods_lib.check_names(member, config.get(member))
  training.make_optimizer(config.optimizer, learning_rate=config.learning_rate,
                          momentum=config.momentum)
  mesh = sharding.make_mesh(config.num_devices or None, model=config.model_axis)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh)
  stream = build_stream(config)
  for i, task in enumerate(stream.tasks):
    if task.train.size < config.batch_size:
      raise ValueError(f'batch_size={config.batch_size} exceeds the {task.train.size} training '
                       f'examples of task {i} ({task.name}); lower batch_size or raise max_train')
  for name in config.methods:  # Values (and the stream's input shape): before any writing.
    method_from_config(config, name, input_shape=stream.input_shape)
  abstract_params = _abstract_params(config, stream)
  sharding.param_shardings(abstract_params, mesh, _rules(config))  # Bad rules fail here.
  for name in config.methods:  # Errors raised by init (a regex matching no layer, ...) too.
    jax.eval_shape(method_from_config(config, name, input_shape=stream.input_shape).init,
                   abstract_params)
  with workdir_lib.claim(workdir, config_dict(config),
                         primary=jax.process_index() == 0) as claim:
    start_folder = pretrain.starting_folder(config, workdir, num_outputs=stream.num_outputs,
                                            mesh=mesh)
    results = {}
    for name in config.methods:
      method_dir = os.path.join(workdir, name)
      os.makedirs(method_dir, exist_ok=True)
      results[name] = _Run(config, stream, name, method_dir, mesh, claim, start_folder).run()
      logging.info('%s: ACC %.2f%%  BWT %.2f  forgetting %.2f', name, 100 * results[name]['acc'],
                   100 * results[name]['bwt'], 100 * results[name]['forgetting'])
    if jax.process_index() == 0:
      report.write_summary(workdir, results, title=f'{config.name}: {stream.name}')
      report.plot_accuracy_curves(
          os.path.join(workdir, 'accuracy_curves.png'),
          {m: np.asarray(r['accuracy_matrix']) for m, r in results.items()},
          title=f'{config.name}: {stream.name}')
  return results
