"""Value checks for hyperparameters and config values; each error names the key it checks.

``name`` is the config key (``'ewc.strength'``) or argument the user set, so that a bad value is
reported as the user wrote it. Checks run when a method or run is built, before anything is
trained or written. This module imports nothing of cljax.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _is_real(value: Any) -> bool:
  return (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
          and math.isfinite(value))


def non_negative(name: str, value: Any) -> None:
  """Raises ValueError unless ``value`` is a finite real number >= 0 (NaN and bools rejected)."""
  if not _is_real(value) or value < 0:
    raise ValueError(f'{name} must be a finite number >= 0, got {value!r}')


def positive(name: str, value: Any) -> None:
  """Raises ValueError unless ``value`` is a finite real number > 0."""
  if not _is_real(value) or value <= 0:
    raise ValueError(f'{name} must be a finite number > 0, got {value!r}')


def fraction(name: str, value: Any) -> None:
  """Raises ValueError unless ``value`` is a finite real number in [0, 1]."""
  if not _is_real(value) or not 0 <= value <= 1:
    raise ValueError(f'{name} must be a number in [0, 1], got {value!r}')


def integer(name: str, value: Any, *, minimum: int) -> None:
  """Raises ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}')


def boolean(name: str, value: Any) -> None:
  """Raises ValueError unless ``value`` is a bool."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f'{name} must be a bool, got {value!r}')


def one_of(name: str, value: Any, choices: Any) -> None:
  """Raises ValueError unless ``value`` is one of ``choices`` (listed in the message)."""
  if value not in choices:
    raise ValueError(f'{name} must be one of {tuple(choices)}, got {value!r}')
