"""Continual-learning metrics from the accuracy matrix.

The accuracy matrix ``R`` is (T, T): ``R[i, j]`` is the test accuracy (a fraction in [0, 1]) on
task ``j`` after training on tasks ``0..i``. ``b[j]`` is the accuracy on task ``j`` of the model
at random initialisation, before any training (needed for FWT).

References:
  Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, Sec. 4
  (ACC, BWT, FWT). Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018, Eq. 5-6
  (forgetting).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def _check_matrix(accuracy_matrix: np.ndarray) -> np.ndarray:
  r = np.asarray(accuracy_matrix, dtype=np.float64)
  if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
    raise ValueError(f'accuracy_matrix must be a non-empty square (T, T) array, got shape {r.shape}')
  if np.isnan(r).any():
    raise ValueError('accuracy_matrix has NaN entries: every task must be evaluated after every task')
  return r


def average_accuracy(accuracy_matrix: np.ndarray) -> float:
  """ACC = (1/T) sum_j R[T-1, j]: mean final accuracy over all tasks (GEM, Eq. 2)."""
  r = _check_matrix(accuracy_matrix)
  return float(r[-1].mean())


def backward_transfer(accuracy_matrix: np.ndarray) -> float:
  """BWT = 1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j]) (GEM, Eq. 3); negative means forgetting.

  Returns 0.0 for a single task (nothing to transfer backwards to).
  """
  r = _check_matrix(accuracy_matrix)
  t = r.shape[0]
  if t == 1:
    return 0.0
  return float(np.mean(r[-1, :-1] - np.diag(r)[:-1]))


def forward_transfer(accuracy_matrix: np.ndarray, random_init_accuracy: np.ndarray) -> float:
  """FWT = 1/(T-1) sum_{j>=1} (R[j-1, j] - b[j]) (GEM, Eq. 4).

  Args:
    accuracy_matrix: (T, T) fractions.
    random_init_accuracy: (T,) fractions ``b``: each task's accuracy at random initialisation.

  Raises:
    ValueError: if ``b`` does not have T entries.
  """
  r = _check_matrix(accuracy_matrix)
  b = np.asarray(random_init_accuracy, dtype=np.float64)
  t = r.shape[0]
  if b.shape != (t,):
    raise ValueError(f'random_init_accuracy must have shape ({t},), got {b.shape}')
  if t == 1:
    return 0.0
  return float(np.mean(np.diag(r, k=1) - b[1:]))


def forgetting(accuracy_matrix: np.ndarray) -> float:
  """Average forgetting (Chaudhry et al. 2018, Eq. 5-6).

  f_j = max_{l < T-1} R[l, j] - R[T-1, j] for each task j < T-1 (tasks not yet learned at step l
  contribute their then accuracy, as in the paper's max over all earlier steps), averaged over
  j < T-1. Returns 0.0 for a single task.
  """
  r = _check_matrix(accuracy_matrix)
  t = r.shape[0]
  if t == 1:
    return 0.0
  best_before = r[:-1, :-1].max(axis=0)
  return float(np.mean(best_before - r[-1, :-1]))


class Summary(NamedTuple):
  """The standard metrics of one accuracy matrix, as fractions (multiply by 100 for points)."""

  acc: float
  bwt: float
  fwt: float
  forgetting: float


def summarize(accuracy_matrix: np.ndarray, random_init_accuracy: np.ndarray) -> Summary:
  """ACC, BWT, FWT and forgetting of one run."""
  return Summary(
      acc=average_accuracy(accuracy_matrix),
      bwt=backward_transfer(accuracy_matrix),
      fwt=forward_transfer(accuracy_matrix, random_init_accuracy),
      forgetting=forgetting(accuracy_matrix),
  )
