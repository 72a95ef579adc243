"""Run outputs: results.json, the accuracy-matrix heatmap, and the multi-method summary tables.

Every file is written through a temporary file and a rename, so a crash never leaves a
half-written result in place of a good one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Mapping, Sequence

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
