"""ACC, BWT, FWT and forgetting against values computed by hand."""

import numpy as np
import pytest

from cljax import metrics

# R[i, j]: accuracy on task j after training task i.
R = np.array([
    [0.90, 0.20, 0.10],
    [0.60, 0.80, 0.30],
    [0.50, 0.70, 0.85],
])
B = np.array([0.10, 0.15, 0.05])  # random-init accuracy per task


def test_average_accuracy():
  assert metrics.average_accuracy(R) == pytest.approx((0.50 + 0.70 + 0.85) / 3)


def test_backward_transfer():
  # ((0.50 - 0.90) + (0.70 - 0.80)) / 2 = -0.25
  assert metrics.backward_transfer(R) == pytest.approx(-0.25)


def test_forward_transfer():
  # ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.20 - 0.15) + (0.30 - 0.05)) / 2 = 0.15
  assert metrics.forward_transfer(R, B) == pytest.approx(0.15)


def test_forgetting_uses_max_over_earlier_steps():
  # task 0: max(0.90, 0.60) - 0.50 = 0.40; task 1: max(0.20, 0.80) - 0.70 = 0.10
  assert metrics.forgetting(R) == pytest.approx(0.25)
  r = R.copy()
  r[1, 0] = 0.95  # the best earlier accuracy, not the one right after learning the task
  assert metrics.forgetting(r) == pytest.approx(((0.95 - 0.50) + 0.10) / 2)


def test_summarize_and_single_task():
  s = metrics.summarize(R, B)
  assert s.acc == pytest.approx(metrics.average_accuracy(R))
  one = metrics.summarize(np.array([[0.7]]), np.array([0.1]))
  assert one == metrics.Summary(acc=pytest.approx(0.7), bwt=0.0, fwt=0.0, forgetting=0.0)


@pytest.mark.parametrize('bad', [np.zeros((2, 3)), np.zeros((0, 0)), np.array([[np.nan]])])
def test_bad_matrix(bad):
  with pytest.raises(ValueError, match='accuracy_matrix'):
    metrics.average_accuracy(bad)


def test_bad_random_init_shape():
  with pytest.raises(ValueError, match='random_init_accuracy'):
    metrics.forward_transfer(R, B[:2])
