"""cljax.report: metric writers (event files read back record by record, CSV), curves, heatmaps."""

import csv
import glob
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from cljax import report


def read_events(directory):
  """(tag, step, value) of every scalar in the event files, parsed from the TFRecord framing
  (uint64 length, uint32 CRC, data, uint32 CRC) with tensorboardX's Event protobuf."""
  out, purges = [], []
  for path in sorted(glob.glob(os.path.join(directory, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField('session_log'):
        purges.append(event.step)
      for v in event.summary.value:
        out.append((v.tag, event.step, v.simple_value))
  return out, purges


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.reader(f))


def test_metric_writer_writes_event_files_and_one_csv_per_prefix(tmp_path):
  with report.MetricWriter(str(tmp_path / 'ewc')) as w:
    w.write_scalars(10, {'train/loss': 0.75})
    w.write_scalars(20, {'train/loss': np.float32(0.5)})
    w.write_scalars(1, report.accuracy_row_scalars([0.9, 0.125]))
  events, purges = read_events(str(tmp_path / 'ewc'))
  assert events == [('train/loss', 10, 0.75), ('train/loss', 20, 0.5),
                    ('accuracy/task_1', 1, pytest.approx(0.9, abs=1e-7)),
                    ('accuracy/task_2', 1, 0.125)]
  assert purges == []
  assert read_csv(tmp_path / 'ewc' / 'train.csv') == [['step', 'loss'], ['10', '0.75'],
                                                      ['20', '0.5']]
  assert read_csv(tmp_path / 'ewc' / 'accuracy.csv') == [['step', 'task_1', 'task_2'],
                                                         ['1', '0.9', '0.125']]


def test_metric_writer_resume_drops_repeated_steps(tmp_path):
  d = str(tmp_path / 'm')
  with report.MetricWriter(d) as w:
    for step, loss in ((1, 4.0), (2, 3.0), (3, 2.0)):
      w.write_scalars(step, {'train/loss': loss})
  with report.MetricWriter(d) as w:   # a resume repeating steps 2.. of a killed task
    w.write_scalars(2, {'train/loss': 2.5})
    w.write_scalars(3, {'train/loss': 1.5})
  assert read_csv(os.path.join(d, 'train.csv')) == [['step', 'loss'], ['1', '4.0'], ['2', '2.5'],
                                                    ['3', '1.5']]
  _, purges = read_events(d)
  assert purges == [2]   # TensorBoard discards the first file's events from step 2 on


def test_metric_writer_refuses_changed_columns(tmp_path):
  with report.MetricWriter(str(tmp_path)) as w:
    w.write_scalars(1, {'accuracy/task_1': 0.5, 'accuracy/task_2': 0.5})
    with pytest.raises(ValueError, match=r'accuracy\.csv has columns'):
      w.write_scalars(2, {'accuracy/task_1': 0.5})


def test_average_seen_accuracy_by_hand():
  r = np.array([[0.9, 0.1, 0.2],
                [0.7, 0.8, 0.1],
                [0.6, 0.5, 1.0]])
  np.testing.assert_allclose(report.average_seen_accuracy(r), [0.9, 0.75, 0.7])
  np.testing.assert_allclose(report.average_seen_accuracy(r[:2]), [0.9, 0.75])   # stopped early
  with pytest.raises(ValueError, match='shape'):
    report.average_seen_accuracy(np.zeros((3, 2)))


def test_accuracy_curves_one_line_per_method(tmp_path):
  matrices = {'finetune': [[1.0, 0.0], [0.5, 1.0]], 'ewc': [[0.8, 0.1], [0.8, 0.9]]}
  fig = report.accuracy_curves_figure(matrices)
  lines = fig.axes[0].lines
  assert [line.get_label() for line in lines] == ['finetune', 'ewc']
  np.testing.assert_allclose(lines[0].get_ydata(), [100.0, 75.0])
  np.testing.assert_allclose(lines[1].get_ydata(), [80.0, 85.0])
  np.testing.assert_array_equal(lines[1].get_xdata(), [1, 2])
  report.plot_accuracy_curves(str(tmp_path / 'accuracy_curves.png'), matrices)
  with open(tmp_path / 'accuracy_curves.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_color_range_shows_the_spread():
  assert report.color_range(np.array([[73.0, 99.0], [85.0, 90.0]])) == (71.0, 100.0)
  assert report.color_range(np.array([40.0, 60.0])) == (39.0, 61.0)
  assert report.color_range(np.array([0.5, np.nan])) == (0.0, 2.0)
  assert report.color_range(np.array([np.nan])) == (0.0, 100.0)


def test_per_task_heatmap_colours_73_and_99_far_apart(tmp_path):
  values = np.array([[73.0, 99.0], [85.0, 90.0]])
  fig = report.per_task_heatmap_figure(values, row_labels=['a', 'b'], col_labels=['t1', 't2'])
  im = fig.axes[0].images[0]
  low, high = im.norm(73.0), im.norm(99.0)
  assert low == pytest.approx(2 / 29) and high == pytest.approx(28 / 29)
  with pytest.raises(ValueError, match='labels'):
    report.per_task_heatmap_figure(values, row_labels=['a'], col_labels=['t1', 't2'])
  report.plot_per_task_heatmap(str(tmp_path / 'h.png'), values, row_labels=['a', 'b'],
                               col_labels=['t1', 't2'])
  assert (tmp_path / 'h.png').stat().st_size > 0


def test_task_row_line():
  assert (report.task_row_line(2, 5, [0.972, 0.91, 0.9814, 0.1, 0.1])
          == 'task 3/5: acc on tasks 1..3 = 97.2 91.0 98.1')
  assert report.task_row_line(0, 2, [0.5, 0.25]) == 'task 1/2: acc on tasks 1 = 50.0'
