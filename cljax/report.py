"""Run outputs: results.json, heatmaps, accuracy curves, summary tables and metric writers.

Every file except the metric logs is written through a temporary file and a rename, so a crash
never leaves a half-written result in place of a good one. `MetricWriter` appends as a run goes
(TensorBoard event files through tensorboardX, and CSV files a spreadsheet or pandas reads).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

SUMMARY_COLUMNS = ('method', 'acc', 'bwt', 'fwt', 'forgetting', 'wall_time_s')


def write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file and a rename."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON to ``path`` atomically."""
  write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode())


def plot_accuracy_matrix(path: str, accuracy_matrix: np.ndarray, *, title: str = '') -> None:
  """Saves a heatmap of R (rows: after training task i; columns: evaluated on task j), in %."""
  from matplotlib.figure import Figure  # No pyplot: no global figure state or GUI backend.

  r = 100.0 * np.asarray(accuracy_matrix, dtype=np.float64)
  t = r.shape[0]
  size = max(4.0, 0.6 * t + 2.0)
  fig = Figure(figsize=(size + 1.0, size))
  ax = fig.add_subplot()
  im = ax.imshow(r, vmin=0.0, vmax=100.0, cmap='viridis')
  fig.colorbar(im, ax=ax, label='test accuracy (%)')
  for i in range(t):
    for j in range(t):
      ax.text(j, i, f'{r[i, j]:.0f}', ha='center', va='center', fontsize=8,
              color='white' if r[i, j] < 60 else 'black')
  ax.set_xticks(range(t), [str(j + 1) for j in range(t)])
  ax.set_yticks(range(t), [str(i + 1) for i in range(t)])
  ax.set_xlabel('evaluated on task j')
  ax.set_ylabel('after training task i')
  ax.set_title(title or 'accuracy matrix R[i, j]')
  save_figure(path, fig)


def save_figure(path: str, fig: Any) -> None:
  """Saves a matplotlib figure as PNG to ``path`` atomically."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100, bbox_inches='tight')
  write_bytes(path, buf.getvalue())


def summary_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict]:
  """One row per method with the columns of `SUMMARY_COLUMNS` (metrics in percentage points)."""
  rows = []
  for method, res in results.items():
    row = {'method': method}
    for key in ('acc', 'bwt', 'fwt', 'forgetting'):
      row[key] = round(100.0 * float(res[key]), 2)
    row['wall_time_s'] = round(float(res['wall_time_s']), 1)
    rows.append(row)
  return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = SUMMARY_COLUMNS) -> str:
  """A GitHub-flavoured markdown table of ``rows``."""
  head = '| ' + ' | '.join(columns) + ' |'
  rule = '|' + '|'.join('---' for _ in columns) + '|'
  body = ['| ' + ' | '.join(str(row[c]) for c in columns) + ' |' for row in rows]
  return '\n'.join([head, rule, *body]) + '\n'


def write_summary(workdir: str, results: Mapping[str, Mapping[str, Any]], *, title: str) -> list[dict]:
  """Writes ``summary.md`` and ``summary.csv`` comparing methods; returns the rows."""
  rows = summary_rows(results)
  text = (f'# {title}\n\nACC, BWT, FWT and forgetting in percentage points (GEM / Chaudhry '
          'definitions, see cljax.metrics); wall time in seconds.\n\n' + markdown_table(rows))
  write_bytes(os.path.join(workdir, 'summary.md'), text.encode())
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  write_bytes(os.path.join(workdir, 'summary.csv'), buf.getvalue().encode())
  return rows


# ------------------------------------------------------------------------------------------
# Accuracy curves and per-task heatmaps
# ------------------------------------------------------------------------------------------


def average_seen_accuracy(accuracy_matrix: np.ndarray) -> np.ndarray:
  """Average accuracy on the tasks seen so far after each task: ``a_t = mean_{j<=t} R[t, j]``.

  Args:
    accuracy_matrix: R, shape (T, T) (or (t, T) for a run stopped after t tasks), in [0, 1]:
      row i after training task i, column j evaluated on task j.

  Returns:
    float64 array of shape (t,); its last entry is GEM's ACC.

  References:
    Lopez-Paz & Ranzato 2017 (GEM), ACC, Sec. 5.
  """
  r = np.asarray(accuracy_matrix, dtype=np.float64)
  if r.ndim != 2 or r.shape[0] > r.shape[1]:
    raise ValueError(f'accuracy matrix must have shape (t, T) with t <= T; got {r.shape}')
  return np.array([r[t, : t + 1].mean() for t in range(r.shape[0])])


def accuracy_curves_figure(accuracy_matrices: Mapping[str, np.ndarray], *, title: str = '') -> Any:
  """A matplotlib Figure: `average_seen_accuracy` (%) vs tasks learned, one line per method.

  Args:
    accuracy_matrices: method name -> its accuracy matrix R, shape (t, T), in [0, 1].
    title: the axes' title.

  Returns:
    The Figure (``fig.axes[0].lines[k]`` is the k-th method's curve).
  """
  from matplotlib.figure import Figure  # No pyplot: no global figure state or GUI backend.

  if not accuracy_matrices:
    raise ValueError('no accuracy matrix to plot')
  fig = Figure(figsize=(6.5, 4.2))
  ax = fig.add_subplot()
  longest = 1
  for name, r in accuracy_matrices.items():
    curve = 100.0 * average_seen_accuracy(r)
    ax.plot(np.arange(1, curve.size + 1), curve, marker='o', label=name)
    longest = max(longest, curve.size)
  ax.set_xticks(range(1, longest + 1))
  ax.set_xlabel('tasks learned')
  ax.set_ylabel('average accuracy on the tasks seen so far (%)')
  ax.set_title(title or 'average accuracy on the tasks seen so far')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def plot_accuracy_curves(path: str, accuracy_matrices: Mapping[str, np.ndarray], *,
                         title: str = '') -> None:
  """Saves `accuracy_curves_figure` as PNG to ``path`` (``workdir/accuracy_curves.png``)."""
  save_figure(path, accuracy_curves_figure(accuracy_matrices, title=title))


def color_range(values_percent: np.ndarray) -> tuple[float, float]:
  """A heatmap's colour limits that show the spread of ``values_percent`` (within [0, 100]).

  The data's range widened by 5% of it (at least one point) on each side and rounded outwards to
  whole points, so that 73% and 99% get colours far apart instead of both near the top of 0-100.

  Args:
    values_percent: accuracies in percent, any shape; NaNs are ignored.

  Returns:
    (vmin, vmax) with vmin < vmax.
  """
  v = np.asarray(values_percent, dtype=np.float64)
  v = v[np.isfinite(v)]
  if not v.size:
    return 0.0, 100.0
  lo, hi = float(v.min()), float(v.max())
  pad = max(1.0, 0.05 * (hi - lo))
  return float(max(0.0, math.floor(lo - pad))), float(min(100.0, math.ceil(hi + pad)))


def per_task_heatmap_figure(values_percent: np.ndarray, *, row_labels: Sequence[str],
                            col_labels: Sequence[str], title: str = '') -> Any:
  """A matplotlib Figure: heatmap of per-task accuracies (%) coloured over `color_range`.

  Args:
    values_percent: shape (rows, tasks), accuracies in percent (e.g. one row per merge method).
    row_labels: one label per row.
    col_labels: one label per task.
    title: the axes' title.

  Returns:
    The Figure (its image is ``fig.axes[0].images[0]``).
  """
  from matplotlib.figure import Figure

  r = np.asarray(values_percent, dtype=np.float64)
  if r.ndim != 2 or r.shape != (len(row_labels), len(col_labels)):
    raise ValueError(f'values have shape {r.shape}; the labels say '
                     f'({len(row_labels)}, {len(col_labels)})')
  vmin, vmax = color_range(r)
  fig = Figure(figsize=(1.0 + 0.9 * r.shape[1], 1.0 + 0.45 * r.shape[0]))
  ax = fig.add_subplot()
  im = ax.imshow(r, vmin=vmin, vmax=vmax, cmap='viridis', aspect='auto')
  fig.colorbar(im, ax=ax, label='test accuracy (%)')
  middle = 0.5 * (vmin + vmax)
  for i in range(r.shape[0]):
    for j in range(r.shape[1]):
      ax.text(j, i, f'{r[i, j]:.0f}', ha='center', va='center', fontsize=8,
              color='white' if r[i, j] < middle else 'black')
  ax.set_xticks(range(r.shape[1]), list(col_labels), rotation=45, ha='right', fontsize=8)
  ax.set_yticks(range(r.shape[0]), list(row_labels), fontsize=8)
  ax.set_title(title or 'per-task accuracy (%)')
  return fig


def plot_per_task_heatmap(path: str, values_percent: np.ndarray, *, row_labels: Sequence[str],
                          col_labels: Sequence[str], title: str = '') -> None:
  """Saves `per_task_heatmap_figure` as PNG to ``path``."""
  save_figure(path, per_task_heatmap_figure(values_percent, row_labels=row_labels,
                                            col_labels=col_labels, title=title))


# ------------------------------------------------------------------------------------------
# Metric writers: TensorBoard event files and CSV
# ------------------------------------------------------------------------------------------


def _csv_group(tag: str) -> tuple[str, str]:
  """``'train/loss' -> ('train', 'loss')``; a tag without '/' goes to ``metrics.csv``."""
  group, _, column = tag.rpartition('/')
  return (group.replace('/', '_') or 'metrics'), column


class MetricWriter:
  """Writes scalars of a run as TensorBoard event files and CSV files in ``directory``.

  Tags are '/'-separated (``'train/loss'``, ``'accuracy/task_3'``). TensorBoard gets every tag
  (tensorboardX's ``SummaryWriter``, event files ``directory/events.out.tfevents.*``, so pointing
  TensorBoard at a workdir shows one run per method folder). Each tag prefix gets a CSV file with
  one row per step and one column per tag: ``train/loss`` goes to ``train.csv`` with columns
  ``step, loss``; the columns of a file are fixed by its first row.

  Resuming appends: when a step is written that the file already holds (a run killed after
  writing some rows of a task it then repeats), that file's rows from this step on are dropped
  first, so the CSV files hold each step once. If that happens on the first write of the writer,
  TensorBoard is also told to discard the run's older events from that step on (tensorboardX's
  ``purge_step``); a later repeated step shows in TensorBoard twice.

  Use as a context manager, or call `close`; rows are flushed as they are written. In a
  multi-process run, create it on process 0 only.
  """

  def __init__(self, directory: str):
    """Opens (creates) ``directory``; nothing is written before the first `write_scalars`."""
    self.directory = os.fspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    self._tb = None
    self._csv = {}   # group -> (file, csv.writer, columns)

  def _open_csv(self, group: str, columns: list[str], step: int):
    path = os.path.join(self.directory, f'{group}.csv')
    kept, purge = [], None
    if os.path.exists(path):
      with open(path, newline='') as f:
        rows = list(csv.reader(f))
      if rows:
        if rows[0] != ['step'] + columns:
          raise ValueError(f'{path} has columns {rows[0]}; this run writes {["step"] + columns}')
        kept = [row for row in rows[1:] if row and int(row[0]) < step]
        if len(kept) < len(rows) - 1:
          purge = step
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w', newline='') as f:
      csv.writer(f, lineterminator='\n').writerows([['step'] + columns] + kept)
    os.replace(tmp, path)
    f = open(path, 'a', newline='')
    self._csv[group] = (f, csv.writer(f, lineterminator='\n'), columns)
    return purge

  def _tensorboard(self, purge_step: Optional[int]):
    if self._tb is None:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(self.directory, purge_step=purge_step,
                                            flush_secs=10)
    return self._tb

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes ``scalars`` (tag -> number) at ``step`` to TensorBoard and to the CSV files.

    Args:
      step: an int (e.g. the global training step for losses, tasks learned for accuracies).
      scalars: tag -> Python or NumPy number.

    Raises:
      ValueError: a tag prefix whose CSV file has other columns (naming the file and columns).
    """
    step = int(step)
    groups = {}
    for tag, value in scalars.items():
      group, column = _csv_group(tag)
      groups.setdefault(group, {})[column] = float(value)
    purge = None
    for group, values in groups.items():
      if group not in self._csv:
        group_purge = self._open_csv(group, list(values), step)
        purge = group_purge if purge is None else purge
      f, writer, columns = self._csv[group]
      if sorted(values) != sorted(columns):
        raise ValueError(f'{f.name} has columns {columns}; got {sorted(values)} at step {step}')
      writer.writerow([step] + [repr(values[c]) for c in columns])
      f.flush()
    tb = self._tensorboard(purge)
    for tag, value in scalars.items():
      tb.add_scalar(tag, float(value), global_step=step)

  def flush(self) -> None:
    """Flushes the TensorBoard events (the CSV rows are flushed as written)."""
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes every file."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    for f, _, _ in self._csv.values():
      f.close()
    self._csv = {}

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def accuracy_row_scalars(row: Sequence[float]) -> dict[str, float]:
  """One accuracy-matrix row as `MetricWriter` scalars: ``{'accuracy/task_1': R[i, 0], ...}``.

  Args:
    row: R[i, :], accuracies in [0, 1] on every task (1-based names).

  Returns:
    tag -> accuracy, in task order.
  """
  return {f'accuracy/task_{j + 1}': float(a) for j, a in enumerate(row)}


def task_row_line(task: int, num_tasks: int, row: Sequence[float]) -> str:
  """The line a run prints after each task: that task's row of the accuracy matrix, in %.

  Args:
    task: the task just learned, 0-based.
    num_tasks: tasks in the stream.
    row: R[task, :], accuracies in [0, 1] on every task (only tasks 0..task are printed).

  Returns:
    e.g. ``'task 3/5: acc on tasks 1..3 = 97.2 91.0 98.1'``.
  """
  seen = ' '.join(f'{100.0 * float(a):.1f}' for a in list(row)[: task + 1])
  tasks = '1' if task == 0 else f'1..{task + 1}'
  return f'task {task + 1}/{num_tasks}: acc on tasks {tasks} = {seen}'
