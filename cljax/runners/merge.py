"""``run(config, workdir)`` for model merging: base -> probes -> experts -> merges -> report.

The protocol of issue 5, on one dataset whose tasks share the input shape:

  1. Pretraining. The training images are split once, by a seeded permutation, into a
     pretraining part (``num_pretrain`` examples) and a task part (the rest; disjoint examples).
     The base model is trained on the pretraining part as it is (all classes, one head).
  2. Tasks. The task part feeds several `cljax.data.streams` (``task_streams``, e.g. two class
     groups of ``split``, four ``rotated``, two ``permuted``), concatenated into T tasks. Every
     task has its own head: the model's ``head`` layer with ``num_classes`` outputs, masked to the
     task's classes for split tasks. Per task, ``num_heldout`` training examples are held out
     (labeled; the Frank-Wolfe proxy loss), at most ``max_train`` train, ``max_test`` test.
  3. Zero-shot reference. Per task a linear probe: only the head is trained, from a fresh
     initialization, on the frozen base (the backbone's gradients are zeroed before the
     optimizer, so its weights stay bit-identical to the base's).
  4. Experts. Each starts from its probe (LP-FT: Kumar et al., ICLR 2022) and fine-tunes every
     weight. Every model (base, probes, experts) is an Orbax checkpoint under
     ``workdir/models/<name>/``; a re-run restores it instead of training it again.
  5. Static merges. The backbones are merged with every method of ``static_methods``; leaves
     matching ``exclude`` (the heads, ``'head/.*'``) are not merged. Task t is evaluated with
     expert t's head swapped into the merged model. Fisher merging weighs with
     `cljax.fisher.diagonal_fisher` of each expert on its own training data; Frank-Wolfe merging
     minimizes the mean cross-entropy, over tasks, of the merged backbone with each task's head
     on that task's held-out labeled examples. RegMean takes each expert's per-layer input Gram
     matrices on its task's held-out examples (`cljax.methods.projection.layer_representations`);
     AdaMerging minimizes the entropy of each task's predictions (its head swapped in, logits
     restricted to its classes) on the task's unlabelled test inputs (the paper's test-time
     protocol); soft Frank-Wolfe uses both that and per-task held-out cross-entropies. Per-task
     merges (EMR) give task t its own model, evaluated with its head.
  6. Continual merges. The experts arrive one at a time in ``num_orders`` random orders; after
     every merge, the accuracy on each task seen so far (with its own head). Every merge ends
     with an Orbax stage checkpoint (the merge state, without its copy of the base, and the
     accuracies so far) under ``workdir/continual/<method>/order<k>/``, so a stopped run resumes
     after its last merge and reaches the same result.

Reported per method: the average accuracy over tasks and the normalized accuracy (merged /
expert accuracy per task, averaged over tasks; Ilharco et al. 2023, Sec. 4), beside the zero-shot
probes and the experts. Outputs: ``results.json``, ``summary.md``, ``summary.csv``,
``continual_accuracy.png`` (accuracy on the tasks seen so far against the number of merged models,
mean and standard deviation over orders) and ``static_accuracy.png`` (per-task heatmap).

This is the only module of the merge experiment that reads a config object; everything it calls
takes plain arguments.

References:
  Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (protocol: experts fine-tuned
  from one pretrained model, absolute and normalized accuracy).
  Tang et al., arXiv 2501.09522 (continual merging protocol: random task orders, accuracy on the
  tasks seen so far after each merge).
  Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution",
  ICLR 2022 (LP-FT: linear probe, then fine-tune).
"""

from __future__ import annotations

import csv
import io
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from cljax import checkpoint
from cljax import checks
from cljax import continual
from cljax import core
from cljax import fisher as fisher_lib
from cljax import merging
from cljax import models
from cljax import report
from cljax import sharding
from cljax import training
from cljax import workdir as workdir_lib
from cljax.data import sources
from cljax.data import streams
from cljax.merging import regmean as regmean_lib
from cljax.methods import base
from cljax.methods import projection
from cljax.methods import regularizers
from cljax.runners import continual as continual_runner

Params = Any

# Merges are looked up in `merging.REGISTRY` (one registry; hyperparameters from signatures).
# The continual constructors by name, read from it (not a second table): a module-level mapping
# so that a test can wrap a constructor.
CONTINUAL_MERGES = {name: merging.get(name).fn for name in merging.registry.names('continual')}
# Config keys of a merge's block that configure how the experiment computes one of the merge's
# inputs (not hyperparameters of the merge itself), by input.
INPUT_HPARAMS = {'fishers': ('num_samples', 'estimator', 'batch_size')}
# Merges run eagerly on concrete arrays only (their Python loop compares traced scores), so the
# config check validates their names but does not trace them.
_UNTRACEABLE = ('soft_frank_wolfe',)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class MergeData(NamedTuple):
  """The pretraining data and the tasks of a merge experiment (host numpy arrays).

  Attributes:
    pretrain: the base model's training data, all classes, masks all True.
    pretrain_test: the dataset's test images as they are, masks all True.
    tasks: the T tasks (`streams.Task`: name, train, test), in stream order.
    heldout: per task, its held-out labeled training examples (not trained on).
    num_outputs: the head's size (the dataset's number of classes).
    input_shape: (H, W, C) of every task.
  """

  pretrain: core.Batch
  pretrain_test: core.Batch
  tasks: tuple
  heldout: tuple
  num_outputs: int
  input_shape: tuple


def _all_classes(x: np.ndarray, y: np.ndarray, num_classes: int) -> core.Batch:
  return core.Batch(np.ascontiguousarray(x, np.float32), y.astype(np.int32),
                    np.ones((y.shape[0], num_classes), bool))


def _take(batch: core.Batch, idx: np.ndarray) -> core.Batch:
  return jax.tree.map(lambda a: a[idx], batch)


def build_data(dataset: sources.Dataset, *, task_streams: Sequence[tuple],
               stream_kwargs: Mapping[str, Mapping[str, Any]], num_pretrain: int,
               max_train: Optional[int], max_test: Optional[int], num_heldout: int,
               seed: int) -> MergeData:
  """Splits ``dataset`` into pretraining data and T tasks with their own heads.

  Args:
    dataset: the source `Dataset`, images (N, H, W, C) float32 in [0, 1].
    task_streams: ``(kind, num_tasks)`` pairs, kind in `streams.KINDS`. Split streams use the
      task scenario (each task's head masked to its classes); permuted and rotated streams use
      all classes (every task has its own ``num_classes``-way head anyway).
    stream_kwargs: per kind, extra keyword arguments of the stream (e.g.
      ``{'rotated': {'max_degrees': 360.0}}``).
    num_pretrain: training examples for the base, in [1, N - 1]; the other N - num_pretrain
      build the tasks.
    max_train: per task, at most this many training examples (None: all but the held-out).
    max_test: per task, at most this many test examples (None: all).
    num_heldout: per task, labeled training examples held out from training, >= 1.
    seed: seeds the pretraining split, the streams and the per-task subsets.

  Returns:
    A `MergeData`.

  Raises:
    ValueError: an unknown stream kind, a bad count, or a task with fewer than
      ``num_heldout + 1`` training examples.
  """
  n = dataset.x_train.shape[0]
  if isinstance(num_pretrain, bool) or not isinstance(num_pretrain, int) or \
      not 1 <= num_pretrain < n:
    raise ValueError(f'num_pretrain must be an int in [1, {n - 1}] (the dataset has {n} training '
                     f'examples); got {num_pretrain!r}')
  if isinstance(num_heldout, bool) or not isinstance(num_heldout, int) or num_heldout < 1:
    raise ValueError(f'num_heldout must be an int >= 1; got {num_heldout!r}')
  if not task_streams:
    raise ValueError('task_streams is empty: name at least one (kind, num_tasks) pair')
  unknown = set(stream_kwargs) - {kind for kind, _ in task_streams}
  if unknown:
    raise ValueError(f'stream_kwargs names stream kinds not in task_streams: {sorted(unknown)}')
  rng = np.random.default_rng(seed)
  perm = rng.permutation(n)
  pre, rest = np.sort(perm[:num_pretrain]), np.sort(perm[num_pretrain:])
  c = int(dataset.num_classes)
  pool = dataset._replace(x_train=dataset.x_train[rest], y_train=dataset.y_train[rest])
  tasks, heldout = [], []
  for i, pair in enumerate(task_streams):
    if len(pair) != 2:
      raise ValueError(f'task_streams[{i}] must be a (kind, num_tasks) pair; got {pair!r}')
    kind, num_tasks = pair
    stream = streams.make_stream(kind, pool, num_tasks=num_tasks, seed=seed + 1 + i,
                                 scenario='task' if kind == 'split' else 'domain',
                                 **dict(stream_kwargs.get(kind, {})))
    for task in stream.tasks:
      t = len(tasks)
      task_rng = np.random.default_rng([seed, t])
      order = task_rng.permutation(task.train.size)
      if order.size <= num_heldout:
        raise ValueError(f'task {task.name!r} has {order.size} training examples, not more than '
                         f'num_heldout={num_heldout}')
      train_idx = order[num_heldout:num_heldout + max_train] if max_train else order[num_heldout:]
      test_idx = np.arange(task.test.size)
      if max_test and max_test < task.test.size:
        test_idx = np.sort(task_rng.permutation(task.test.size)[:max_test])
      tasks.append(streams.Task(task.name, _take(task.train, np.sort(train_idx)),
                                _take(task.test, test_idx)))
      heldout.append(_take(task.train, np.sort(order[:num_heldout])))
  return MergeData(
      pretrain=_all_classes(dataset.x_train[pre], dataset.y_train[pre], c),
      pretrain_test=_all_classes(dataset.x_test, dataset.y_test, c),
      tasks=tuple(tasks), heldout=tuple(heldout), num_outputs=c,
      input_shape=tuple(int(d) for d in dataset.x_train.shape[1:]))


# --------------------------------------------------------------------------------------------
# Heads, probes, training with model checkpoints
# --------------------------------------------------------------------------------------------


def swap_excluded(params: Params, donor: Params, mask: Any) -> Params:
  """``params`` with ``donor``'s values on the excluded leaves (``mask`` False): e.g. a merged
  backbone with a task's own head. Jittable (``mask`` holds Python bools)."""
  return jax.tree.map(lambda p, d, m: p if m else d, params, donor, mask)


def probe_method(frozen: Any) -> base.Method:
  """Finetune with the gradients of the ``frozen`` leaves (True) zeroed: a linear probe when every
  leaf but the head is frozen. With Adam or SGD, zero gradients leave those weights unchanged.

  Args:
    frozen: a pytree of Python bools with the params' structure.
  """
  tx = optax.masked(optax.set_to_zero(), frozen)
  return base.Method(init=lambda params: base.EmptyState(), loss=base.no_loss,
                     gradient_transform=lambda state: tx, end_task=base.keep_state)


class Trainer(NamedTuple):
  """What `train_model` needs besides the data: the model function, an optimizer and the loop's
  settings (shared by every model of one phase, so the compiled epoch is reused)."""

  apply_fn: Callable
  method: base.Method
  optimizer: optax.GradientTransformation
  epochs: int
  batch_size: int
  mesh: Any


def train_model(directory: str, trainer: Trainer, init: Params, data: core.Batch, *, seed: int,
                name: str) -> Params:
  """Trains ``init`` on ``data``, or restores the result from the Orbax checkpoint in
  ``directory``; saves it there after training (one stage holding ``{'params': ...}``).

  Args:
    directory: the model's checkpoint directory.
    trainer: the model function, method, optimizer and loop settings.
    init: the starting parameters (also the restore target's structure).
    data: host training data.
    seed: seeds `continual.run_stream`'s key (the data order of its one task).
    name: for logs and the checkpoint's metadata.

  Returns:
    The trained parameters.
  """
  with checkpoint.StageCheckpointer(directory) as ckpt:
    if ckpt.latest_step():
      logging.info('%s: restored from %s', name, directory)
      return ckpt.restore(ckpt.latest_step(), {'params': init}).state['params']
    started = time.time()
    result = continual.run_stream(
        trainer.apply_fn, init, trainer.method, trainer.optimizer,
        [streams.Task(name, data, None)], epochs=trainer.epochs, batch_size=trainer.batch_size,
        seed=seed, mesh=trainer.mesh, evaluate=False)
    params = result.state.params
    ckpt.save(1, {'params': params},
              dict(name=name, examples=data.size, final_loss=float(result.losses[-1][-1]),
                   wall_time_s=time.time() - started))
    return params


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Merges
# --------------------------------------------------------------------------------------------


def check_hparams(name: str, hparams: Mapping[str, Any], *, kind: str) -> dict:
  """Returns the merge's own hyperparameters from a config block ``hparams``, after checking
  the name (in `merging.REGISTRY`, of ``kind``) and every key: a hyperparameter of the merge or
  a key of `INPUT_HPARAMS` for one of its inputs (those are left out of the result).

  Raises:
    ValueError: an unknown merge, or naming the unknown config keys ``<name>.<key>``.
  """
  entry = merging.get(name, kind=kind)
  own_inputs = {k for i in entry.inputs for k in INPUT_HPARAMS.get(i, ())}
  own = {k: v for k, v in hparams.items() if k not in own_inputs}
  merging.check_names(name, own, kind=kind)
  return own


def proxy_loss_fn(apply_fn: Callable, heads: Sequence[Params], batches: Sequence[core.Batch],
                  mask: Any) -> Callable[[Params], jax.Array]:
  """Frank-Wolfe's proxy objective: the mean over tasks of the cross-entropy of the merged
  backbone with task t's head (``heads[t]``, swapped in on the excluded leaves) on task t's
  held-out labeled ``batches[t]``. Traced under jit; the data are closed over."""
  data = [core.Batch(jnp.asarray(b.x), jnp.asarray(b.y), jnp.asarray(b.mask)) for b in batches]
  heads = [jax.tree.map(jnp.asarray, h) for h in heads]

  def loss(params: Params) -> jax.Array:
    losses = [core.cross_entropy(apply_fn(swap_excluded(params, h, mask), b.x), b.y, b.mask)
              for h, b in zip(heads, data)]
    return sum(losses) / len(losses)

  return loss


def task_logits_fn(apply_fn: Callable, head: Params, classes: np.ndarray,
                   mask: Any) -> Callable[[Params, jax.Array], jax.Array]:
  """Task t's model function for AdaMerging: ``f(params, x)`` is the logits (B, K) of ``params``
  with ``head`` swapped in on the excluded leaves, outside the task's ``classes`` (K,) bool set
  to -1e9 (`core.masked_logits`: their probability is exactly 0, as with a head of the task's
  classes only)."""
  head = jax.tree.map(jnp.asarray, head)
  allowed = jnp.asarray(classes, bool)[None, :]

  def logits(params: Params, x: jax.Array) -> jax.Array:
    return core.masked_logits(apply_fn(swap_excluded(params, head, mask), x), allowed)

  return logits


def gram_inputs(apply_fn: Callable, experts: Sequence[Params], batches: Sequence[core.Batch],
                mask: Any) -> list:
  """RegMean's Grams: per expert, ``{kernel path: X^T X / N}`` of each merged 2-D Dense kernel's
  inputs X (N, in) when the expert runs on its own task's ``batches[t].x``.

  Args:
    apply_fn: the Linen model function.
    experts: T params pytrees.
    batches: T host batches (the held-out examples).
    mask: `merging.merge_mask` of the params (the excluded heads get no Gram).

  Returns:
    T dicts ``{path: (in, in) float32}`` (`cljax.merging.regmean.gram_matrices`).

  References:
    Jin et al., ICLR 2023 (Grams of each model's layer inputs on its own data).
  """
  merged = {merging.path_name(path) for (path, leaf), m in zip(
      jax.tree_util.tree_flatten_with_path(experts[0])[0], jax.tree.leaves(mask))
      if m and np.ndim(leaf) == 2}
  out = []
  for expert, batch in zip(experts, batches):
    reps = projection.layer_representations(apply_fn, expert, batch.x)
    out.append(regmean_lib.gram_matrices({k: r.T for k, r in reps.items() if k in merged}))
  return out


def static_merge(name: str, base_params: Params, experts: Sequence[Params], *,
                 hparams: Mapping[str, Any], exclude: Any, key: jax.Array,
                 fishers: Optional[Sequence[Params]] = None,
                 proxy_loss: Optional[Callable[[Params], jax.Array]] = None,
                 grams: Optional[Sequence[Mapping[str, jax.Array]]] = None,
                 apply_fns: Optional[Sequence[Callable]] = None,
                 test_inputs: Optional[Sequence[np.ndarray]] = None,
                 task_losses: Optional[Sequence[Callable[[Params], jax.Array]]] = None) -> Any:
  """Merges ``experts`` into ``base_params`` with the static or per-task merge ``name``.

  Args:
    name: a static or per_task key of `merging.REGISTRY`.
    base_params: the base model.
    experts: the fine-tuned models.
    hparams: the config block ``<name>``: the merge's hyperparameters, plus, for a merge taking
      an input of `INPUT_HPARAMS` (fisher's ``fishers``), the keys configuring that input
      (used where the input is computed, ignored here).
    exclude: regex(es) of leaves not merged.
    key: PRNG key, the ``key`` input (DARE's drop masks, TIES's sampled threshold, DELLA's).
    fishers: per expert its diagonal Fisher, the ``fishers`` input.
    proxy_loss: Frank-Wolfe's objective, the ``loss_fn`` input.
    grams: per expert its layers' input Grams (`gram_inputs`), RegMean's ``grams``.
    apply_fns: per task its model function (`task_logits_fn`), the ``apply_fn`` input.
    test_inputs: per task its unlabelled test inputs, the ``test_inputs`` input.
    task_losses: per task its proxy loss, soft Frank-Wolfe's ``loss_fns``.

  Returns:
    A static merge's params (excluded leaves hold the base's values), or a per-task merge's
    ``task_model(t) -> params``.

  Raises:
    ValueError: an unknown method or hyperparameter, or what the merge itself raises.
  """
  kind = 'per_task' if name in merging.registry.names('per_task') else 'static'
  hp = check_hparams(name, hparams, kind=kind)
  inputs = dict(key=key, fishers=fishers, loss_fn=proxy_loss, grams=grams,
                apply_fn=None if apply_fns is None else tuple(apply_fns),
                test_inputs=test_inputs, loss_fns=task_losses)
  merge_fn = merging.merge if kind == 'static' else merging.per_task_merge
  return merge_fn(name, base_params, experts, hparams=hp, exclude=exclude, inputs=inputs)


def continual_merge(name: str, hparams: Mapping[str, Any], exclude: Any) -> merging.ContinualMerge:
  """The continual merge ``name`` (of `merging.REGISTRY`) with its hyperparameters.

  Raises:
    ValueError: an unknown method, an unknown hyperparameter (named ``<name>.<key>``), or a bad
      value (from the constructor).
  """
  hp = check_hparams(name, hparams, kind='continual')
  return CONTINUAL_MERGES[name](exclude=exclude, **hp)


def _stored(state: Any) -> dict:
  """The part of a continual merge state that is checkpointed: every field but the base (the
  base is restored from its own checkpoint, so each merge step does not store it again)."""
  return {k: v for k, v in state._asdict().items() if k != 'base'}


def run_order(merge: merging.ContinualMerge, base_params: Params, experts: Sequence[Params],
              order: Sequence[int], *, directory: str,
              accuracy: Callable[[Params, int], float]) -> dict:
  """Merges ``experts`` one at a time in ``order``, resuming from the stage checkpoints.

  After merge j (1-based) the accuracy on each task ``order[:j]`` seen so far is measured, and
  stage j is saved in ``directory`` (the merge state without its base, and the accuracies).

  Args:
    merge: the continual merge.
    base_params: the base model.
    experts: all T experts, indexed by task.
    order: a permutation of range(T).
    directory: this order's checkpoint directory.
    accuracy: ``accuracy(merged_params, task) -> float``, with the task's head swapped in.

  Returns:
    ``dict(order, task_accuracy, seen_accuracy)``: per merge the accuracies on the seen tasks
    (in arrival order) and their mean.

  Raises:
    ValueError: the checkpoints in ``directory`` belong to another order.
  """
  order = [int(t) for t in order]
  state = merge.init(base_params)
  with checkpoint.StageCheckpointer(directory) as ckpt:
    done = ckpt.latest_step() or 0
    if done:
      stage = ckpt.restore(done, _stored(state))
      state, meta = state._replace(**stage.state), stage.meta
      if list(meta['order']) != order:
        raise ValueError(f'{directory} holds merges in the order {meta["order"]}, not {order}')
    else:
      meta = dict(order=order, task_accuracy=[], seen_accuracy=[])
    for j in range(done, len(order)):
      state = merge.update(state, experts[order[j]])
      params = merge.params(state)
      accs = [accuracy(params, t) for t in order[:j + 1]]
      meta['task_accuracy'].append(accs)
      meta['seen_accuracy'].append(float(np.mean(accs)))
      ckpt.save(j + 1, _stored(state), meta)
  return meta


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _summary_rows(results: dict) -> list:
  """Rows of the summary table (percentages, rounded), references first."""
  rows = []

  def row(method, kind, acc, norm, acc_std=None, norm_std=None, per_task=()):
    r = dict(method=method, kind=kind, acc=round(100 * acc, 2), normalized=round(100 * norm, 2),
             acc_std='' if acc_std is None else round(100 * acc_std, 2),
             normalized_std='' if norm_std is None else round(100 * norm_std, 2))
    r.update({f'task{t}': round(100 * a, 2) for t, a in enumerate(per_task)})
    rows.append(r)

  for key, label in (('zero_shot', 'zero-shot (linear probes on the frozen base)'),
                     ('experts', 'experts (each on its own task)')):
    res = results[key]
    row(label, 'reference', res['acc'], res['normalized_acc'], per_task=res['per_task'])
  for name, res in results['static'].items():
    row(name, res.get('kind', 'static'), res['acc'], res['normalized_acc'],
        per_task=res['per_task'])
  for name, res in results['continual'].items():
    row(name, 'continual', res['final_acc_mean'], res['final_normalized_mean'],
        res['final_acc_std'], res['final_normalized_std'], res['final_per_task_mean'])
  return rows


def _cell(value: Any, std: Any) -> str:
  return f'{value:.2f}' if std == '' else f'{value:.2f} ± {std:.2f}'


def write_summary(workdir: str, results: dict, *, title: str) -> list:
  """Writes ``summary.md`` (main table, per-task table) and ``summary.csv``; returns the rows."""
  rows = _summary_rows(results)
  tasks = results['tasks']
  main = [dict(method=r['method'], kind=r['kind'], acc=_cell(r['acc'], r['acc_std']),
               normalized=_cell(r['normalized'], r['normalized_std'])) for r in rows]
  per_task = [dict(method=r['method'], **{n: f'{r[f"task{t}"]:.1f}' for t, n in enumerate(tasks)})
              for r in rows]
  t = len(tasks)
  text = (f'# {title}\n\n'
          f'{t} tasks, one expert each, merged from one base. acc: average test accuracy over '
          f'the {t} tasks (%), each task evaluated with its own head; normalized: merged / expert '
          f'accuracy per task, averaged (%). Continual rows: after all {t} merges, mean ± std over '
          f'{results["num_orders"]} random orders. The base reaches '
          f'{100 * results["base_pretrain_accuracy"]:.2f}% on its own pretraining task.\n\n'
          + report.markdown_table(main, ('method', 'kind', 'acc', 'normalized'))
          + '\n## Per-task accuracy (%)\n\n' + report.markdown_table(per_task, ('method', *tasks)))
  report.write_bytes(os.path.join(workdir, 'summary.md'), text.encode())
  columns = ['method', 'kind', 'acc', 'acc_std', 'normalized', 'normalized_std'] + \
      [f'task{i}' for i in range(t)]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  report.write_bytes(os.path.join(workdir, 'summary.csv'), buf.getvalue().encode())
  return rows


def write_reports(workdir: str, results: dict, *, title: str) -> None:
  """Writes ``results.json``, the summaries and the plots of a finished run into ``workdir``."""
  report.write_json(os.path.join(workdir, 'results.json'), results)
  write_summary(workdir, results, title=title)
  if results['continual']:
    plot_continual(os.path.join(workdir, 'continual_accuracy.png'), results)
  if results['static']:
    plot_static(os.path.join(workdir, 'static_accuracy.png'), results)


def plot_continual(path: str, results: dict) -> None:
  """Accuracy on the tasks seen so far against the number of merged models: mean ± std over
  orders per continual method, with the experts and zero-shot probes on the same tasks."""
  from matplotlib.figure import Figure  # No pyplot: no global figure state or GUI backend.

  fig = Figure(figsize=(7.0, 4.5))
  ax = fig.add_subplot()
  for name, res in results['continual'].items():
    mean, std = 100 * np.asarray(res['mean_curve']), 100 * np.asarray(res['std_curve'])
    x = np.arange(1, mean.size + 1)
    ax.plot(x, mean, marker='o', label=name)
    ax.fill_between(x, mean - std, mean + std, alpha=0.2)
  for key, style in (('experts', 'k--'), ('zero_shot', 'k:')):
    curve = 100 * np.asarray(results['continual_reference'][key])
    ax.plot(np.arange(1, curve.size + 1), curve, style, label=key.replace('_', '-'))
  ax.set_xlabel('number of merged models')
  ax.set_ylabel('accuracy on the tasks seen so far (%)')
  ax.set_title(f'continual merging, mean ± std over {results["num_orders"]} orders')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  report.save_figure(path, fig)


def plot_static(path: str, results: dict) -> None:
  """Heatmap of per-task accuracy (%) for the references and every static merge, over a colour
  range that shows their spread (`report.color_range`)."""
  names = ['zero_shot', 'experts', *results['static']]
  values = [results[n]['per_task'] if n in ('zero_shot', 'experts')
            else results['static'][n]['per_task'] for n in names]
  report.plot_per_task_heatmap(path, 100 * np.asarray(values), row_labels=names,
                               col_labels=results['tasks'],
                               title='per-task accuracy of each static merge')


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


def _optimizer(phase: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return training.make_optimizer(phase.optimizer, learning_rate=phase.learning_rate,
                                 momentum=phase.get('momentum', 0.0))


def _validate(config: ml_collections.ConfigDict, abstract: Params, apply_fn: Callable,
              input_shape: tuple, num_outputs: int) -> None:
  """Checks methods, hyperparameters and the exclusion regex on the parameter shapes only, so
  that a bad config fails before the tasks are built, a model is trained or a file written.
  Every static and per-task merge is traced with dummy inputs of the right shapes (but those of
  `_UNTRACEABLE`, whose names alone are checked)."""
  if not config.static_methods and not config.continual_methods:
    raise ValueError('config.static_methods and config.continual_methods are both empty')
  if isinstance(config.num_orders, bool) or not isinstance(config.num_orders, int) or \
      config.num_orders < 1:
    raise ValueError(f'num_orders must be an int >= 1; got {config.num_orders!r}')
  for phase in ('pretrain', 'probe', 'finetune'):
    _optimizer(config[phase])
  mask = merging.merge_mask(abstract, config.exclude)
  key = jax.random.key(0)
  grams = {merging.path_name(path): jax.ShapeDtypeStruct((leaf.shape[0],) * 2, jnp.float32)
           for (path, leaf), m in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                                      jax.tree.leaves(mask))
           if m and len(leaf.shape) == 2 and merging.path_name(path).endswith('/kernel')}
  x = np.zeros((2, *input_shape), np.float32)
  classes = np.ones(num_outputs, bool)
  for name in config.static_methods:
    hp = dict(config.get(name) or {})
    if name == 'fisher':
      est = hp.get('estimator', 'exact')
      if est not in fisher_lib.ESTIMATORS:
        raise ValueError(f'fisher.estimator must be one of {fisher_lib.ESTIMATORS}; got {est!r}')
    if name in _UNTRACEABLE:
      check_hparams(name, hp, kind='static')
      continue

    def traced(b, g, name=name, hp=hp):
      out = static_merge(
          name, b, [b, b], hparams=hp, exclude=config.exclude, key=key, fishers=[b, b],
          proxy_loss=lambda p: jnp.zeros(()), grams=[g, g],
          apply_fns=[task_logits_fn(apply_fn, b, classes, mask)] * 2, test_inputs=[x, x],
          task_losses=[lambda p: jnp.zeros(())] * 2)
      return out(0) if callable(out) else out

    jax.eval_shape(traced, abstract, grams)
  for name in config.continual_methods:
    continual_merge(name, dict(config.get(name) or {}), config.exclude)


def _normalized(per_task: Sequence[float], expert: Sequence[float]) -> float:
  return float(np.mean(np.asarray(per_task) / np.asarray(expert)))


def _train_models(config, data, module, mesh, workdir, mask) -> tuple:
  """Base, probes and experts (restored where their checkpoints exist)."""
  apply_fn = models.linen_apply_fn(module)
  params0 = models.init_params(module, jax.random.key(config.seed), data.input_shape)
  models_dir = os.path.join(workdir, 'models')

  def trainer(phase, method):
    p = config[phase]
    return Trainer(apply_fn, method, _optimizer(p), p.epochs, config.batch_size, mesh)

  base_params = train_model(os.path.join(models_dir, 'base'),
                            trainer('pretrain', regularizers.finetune()), params0, data.pretrain,
                            seed=config.seed, name='base')
  probe_init = swap_excluded(base_params, params0, mask)  # A fresh head on the frozen base.
  probe_trainer = trainer('probe', probe_method(mask))
  finetune_trainer = trainer('finetune', regularizers.finetune())
  probes, experts = [], []
  for t, task in enumerate(tqdm.tqdm(data.tasks, desc='probes and experts', leave=False)):
    probes.append(train_model(os.path.join(models_dir, f'probe{t}'), probe_trainer, probe_init,
                              task.train, seed=config.seed + 1 + t, name=f'probe {task.name}'))
    experts.append(train_model(os.path.join(models_dir, f'expert{t}'), finetune_trainer,
                               probes[t], task.train, seed=config.seed + 1 + t,
                               name=f'expert {task.name}'))
  return apply_fn, base_params, probes, experts


def _merge_inputs(config, data, apply_fn, experts, mask) -> dict:
  """The data inputs of the configured static merges, computed only where a merge takes them:
  Fishers, Frank-Wolfe's proxy loss, RegMean's Grams (held-out data), AdaMerging's per-task
  model functions and unlabelled test inputs, soft Frank-Wolfe's per-task losses."""
  needed = {i for n in config.static_methods for i in merging.get(n).inputs}
  inputs = {}
  if 'fisher' in config.static_methods:
    hp = config.fisher
    inputs['fishers'] = [fisher_lib.diagonal_fisher(
        apply_fn, e, _take(task.train, np.arange(min(hp.num_samples, task.train.size))),
        estimator=hp.estimator, batch_size=hp.batch_size,
        key=jax.random.key(config.seed + t)) for t, (e, task) in enumerate(zip(experts, data.tasks))]
  if 'loss_fn' in needed:
    inputs['proxy_loss'] = proxy_loss_fn(apply_fn, experts, data.heldout, mask)
  if 'grams' in needed:
    inputs['grams'] = gram_inputs(apply_fn, experts, data.heldout, mask)
  if 'apply_fn' in needed:
    inputs['apply_fns'] = [task_logits_fn(apply_fn, e, np.any(task.test.mask, axis=0), mask)
                           for e, task in zip(experts, data.tasks)]
  if 'test_inputs' in needed:
    inputs['test_inputs'] = [np.asarray(task.test.x) for task in data.tasks]
  if 'loss_fns' in needed:
    inputs['task_losses'] = [proxy_loss_fn(apply_fn, [e], [h], mask)
                             for e, h in zip(experts, data.heldout)]
  return inputs


def _static_results(config, data, apply_fn, base_params, experts, mask, evaluate,
                    expert_acc) -> dict:
  inputs = _merge_inputs(config, data, apply_fn, experts, mask)
  out = {}
  for name in tqdm.tqdm(config.static_methods, desc='static merges', leave=False):
    hp = dict(config.get(name) or {})
    started = time.time()
    merged = static_merge(name, base_params, experts, hparams=hp, exclude=config.exclude,
                          key=jax.random.key(config.seed), **inputs)
    if callable(merged):   # a per-task merge: task t's own model
      per_task = [evaluate(merged(t), t) for t in range(len(experts))]
    else:
      per_task = [evaluate(merged, t) for t in range(len(experts))]
    out[name] = dict(per_task=per_task, acc=float(np.mean(per_task)),
                     normalized_acc=_normalized(per_task, expert_acc), hparams=hp,
                     kind=merging.get(name).kind, wall_time_s=time.time() - started)
    logging.info('%s: acc %.2f%%, normalized %.2f%%', name, 100 * out[name]['acc'],
                 100 * out[name]['normalized_acc'])
  return out


def _orders(num_tasks: int, num_orders: int, seed: int) -> list:
  rng = np.random.default_rng([seed, 1])
  return [rng.permutation(num_tasks).tolist() for _ in range(num_orders)]


def _continual_results(config, workdir, base_params, experts, orders, evaluate,
                       expert_acc) -> dict:
  out = {}
  for name in config.continual_methods:
    hp = dict(config.get(name) or {})
    merge = continual_merge(name, hp, config.exclude)
    started = time.time()
    metas = [run_order(merge, base_params, experts, order,
                       directory=os.path.join(workdir, 'continual', name, f'order{k}'),
                       accuracy=evaluate)
             for k, order in enumerate(tqdm.tqdm(orders, desc=name, leave=False))]
    curves = np.asarray([m['seen_accuracy'] for m in metas])
    finals = []
    for m in metas:  # The accuracies after the last merge, back in task order.
      per_task = np.empty(len(m['order']))
      per_task[m['order']] = m['task_accuracy'][-1]
      finals.append(per_task)
    finals = np.asarray(finals)
    normalized = [_normalized(f, expert_acc) for f in finals]
    out[name] = dict(
        hparams=hp, orders=orders, seen_accuracy=curves.tolist(),
        task_accuracy=[m['task_accuracy'] for m in metas],
        mean_curve=curves.mean(0).tolist(), std_curve=curves.std(0).tolist(),
        final_per_task_mean=finals.mean(0).tolist(),
        final_acc_mean=float(finals.mean(1).mean()), final_acc_std=float(finals.mean(1).std()),
        final_normalized_mean=float(np.mean(normalized)),
        final_normalized_std=float(np.std(normalized)), wall_time_s=time.time() - started)
    logging.info('%s: final acc %.2f%% ± %.2f', name, 100 * out[name]['final_acc_mean'],
                 100 * out[name]['final_acc_std'])
  return out


def _reference_results(config, data, apply_fn, mesh, evaluator, base_params, probes, experts,
                       orders) -> dict:
  """The base on its pretraining test set, the zero-shot probes and the experts."""
  zero_shot = [evaluator.accuracy(p, t) for t, p in enumerate(probes)]
  expert_acc = [evaluator.accuracy(e, t) for t, e in enumerate(experts)]
  pretrain_eval = training.Evaluator(apply_fn, [data.pretrain_test],
                                     batch_size=config.eval_batch_size, mesh=mesh)
  return dict(
      base_pretrain_accuracy=pretrain_eval.accuracy(base_params, 0),
      zero_shot=dict(per_task=zero_shot, acc=float(np.mean(zero_shot)),
                     normalized_acc=_normalized(zero_shot, expert_acc)),
      experts=dict(per_task=expert_acc, acc=float(np.mean(expert_acc)), normalized_acc=1.0),
      continual_reference=dict(experts=_seen_reference(orders, expert_acc),
                               zero_shot=_seen_reference(orders, zero_shot)))


def _seen_reference(orders: Sequence[Sequence[int]], per_task: Sequence[float]) -> list:
  """Mean over orders of a reference's mean accuracy on the first j tasks, j = 1..T."""
  acc = np.asarray(per_task)
  return np.mean([[acc[o[:j]].mean() for j in range(1, len(o) + 1)] for o in orders], 0).tolist()


def _check_sizes(config: ml_collections.ConfigDict, data: MergeData) -> None:
  """Epochs and batch size against the data, before the workdir is claimed."""
  for phase in ('pretrain', 'probe', 'finetune'):
    checks.integer(f'{phase}.epochs', config[phase].epochs, minimum=1)
  smallest = min([data.pretrain.size] + [t.train.size for t in data.tasks])
  if config.batch_size > smallest:
    raise ValueError(f'batch_size={config.batch_size} exceeds the {smallest} training examples of '
                     'the smallest training set (the pretraining data or a task); lower it or '
                     'raise num_pretrain / max_train')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the merge experiment of ``config``; writes and returns its results.

  Args:
    config: a merge config (see experiments/configs/merge_digits.py for the keys).
    workdir: output directory: ``config.json``, ``models/`` (Orbax checkpoints of the base,
      probes and experts), ``continual/<method>/order<k>/`` (stage checkpoints), ``results.json``,
      ``summary.md``, ``summary.csv``, ``continual_accuracy.png``, ``static_accuracy.png``.

  Returns:
    The results dict, as written to ``results.json``.

  Raises:
    ValueError: an unknown method, hyperparameter, model, dataset or stream, a bad count, or a
      workdir holding a run of another config; raised before anything in the workdir is written.
    FileNotFoundError: a dataset file is missing.
    FloatingPointError: a training loss became NaN.
  """
  mesh = sharding.make_mesh(config.num_devices or None)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh)
  dataset = sources.load(config.dataset, data_dir=config.data_dir or None)
  module = models.make_model(config.model, num_outputs=int(dataset.num_classes),
                             **dict(config.model_kwargs))
  abstract = jax.eval_shape(lambda k: models.init_params(module, k, dataset.x_train.shape[1:]),
                            jax.random.key(0))
  _validate(config, abstract, models.linen_apply_fn(module), tuple(dataset.x_train.shape[1:]),
            int(dataset.num_classes))
  data = build_data(dataset, task_streams=[tuple(p) for p in config.task_streams],
                    stream_kwargs={k: dict(v) for k, v in config.stream_kwargs.items()},
                    num_pretrain=config.num_pretrain, max_train=config.max_train or None,
                    max_test=config.max_test or None, num_heldout=config.num_heldout,
                    seed=config.seed)
  _check_sizes(config, data)
  with workdir_lib.claim(workdir, continual_runner.config_dict(config),
                         primary=jax.process_index() == 0) as claim:
    # Recorded at once: the models/ checkpoints hold no config of their own to check a resume by.
    claim.record_config()
    return _run(config, workdir, mesh, dataset, module, abstract, data)


def _run(config, workdir, mesh, dataset, module, abstract, data) -> dict:
  """`run` after its checks, inside the workdir claim."""
  mask = merging.merge_mask(abstract, config.exclude)
  started = time.time()
  apply_fn, base_params, probes, experts = _train_models(config, data, module, mesh, workdir, mask)
  train_time = time.time() - started
  evaluator = training.Evaluator(apply_fn, [t.test for t in data.tasks],
                                 batch_size=config.eval_batch_size, mesh=mesh)
  eval_with_head = jax.jit(lambda params, donor: swap_excluded(params, donor, mask))

  def evaluate(params, t):  # Task t with expert t's head swapped in.
    return evaluator.accuracy(eval_with_head(params, experts[t]), t)

  orders = _orders(len(data.tasks), config.num_orders, config.seed)
  results = dict(name=config.name, dataset=dataset.name, tasks=[t.name for t in data.tasks],
                 num_orders=config.num_orders,
                 config=continual_runner.config_dict(config),
                 **_reference_results(config, data, apply_fn, mesh, evaluator, base_params, probes,
                                      experts, orders))
  expert_acc = results['experts']['per_task']
  started = time.time()
  results['static'] = _static_results(config, data, apply_fn, base_params, experts, mask,
                                      evaluate, expert_acc)
  static_time = time.time() - started
  started = time.time()
  results['continual'] = _continual_results(config, workdir, base_params, experts, orders,
                                            evaluate, expert_acc)
  results['wall_time_s'] = dict(training=train_time, static=static_time,
                                continual=time.time() - started)
  if jax.process_index() == 0:  # Only process 0 writes reports.
    write_reports(workdir, results,
                  title=f'{config.name}: merging {len(data.tasks)} experts on {dataset.name}')
  return results
