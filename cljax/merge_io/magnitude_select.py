"""The exact k-th largest magnitude of data streamed in blocks (TIES's trim threshold out of core).

Radix selection on float32 bit patterns, the method of `cljax.merging.static.kth_largest_magnitude`
in a form that never needs all the data at once: nonnegative floats order like their bit patterns,
so one pass histograms the high 16 bits of every |x| (2^15 bins: the sign bit is folded away) and
picks the bucket holding the k-th largest; a second pass histograms the low 16 bits of the
entries in that bucket and picks the exact value. Memory: two histograms, whatever the data size.
The result t satisfies ``#{|x| >= t} >= k > #{|x| > t}``, the same value the library computes,
so keeping ``|x| >= t`` keeps what `static.trim_task_vector` keeps.

References:
  Yadav et al., NeurIPS 2023, Sec. 3, "Trim" (keep the top-k% magnitudes).
"""

from __future__ import annotations

import sys
from typing import Iterable

import numpy as np

_BINS = 1 << 16        # low 16 bits
_HIGH_BINS = 1 << 15   # high 16 bits of a magnitude (sign bit cleared)


SELECTIONS = ('exact', 'threshold')


def keep_count(density: float, size: int, selection: str = 'threshold') -> int:
  """TIES's number of kept entries of ``size``.

  Args:
    density: the kept fraction, in [0, 1].
    size: the number of entries ranked.
    selection: 'threshold', ``round(density * size)`` (as `static.trim_task_vector`, the
      paper), or 'exact', ``int(density * size)`` (mergekit's ``sparsify.magnitude``: floor;
      density >= 1 keeps everything).

  Returns:
    The count k (the rank of the threshold).
  """
  if selection == 'exact':
    return size if density >= 1 else int(density * size)
  return int(round(density * size))


def _halves(x: np.ndarray) -> tuple:
  """The low and high 16 bits of the float32 bit pattern of every entry of ``x`` (flattened).

  The high half still holds the sign bit (bit 15); |x| is the pattern with it cleared.
  """
  bits = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
  if sys.byteorder == 'little':   # views, no arithmetic over the data
    halves = bits.view(np.uint16)
    return halves[0::2], halves[1::2]
  return (bits & 0xFFFF).astype(np.uint16), (bits >> 16).astype(np.uint16)


def _top_digit(counts: np.ndarray, k: int) -> tuple:
  """Largest digit d with #{digit >= d} >= k, and #{digit > d}."""
  at_or_above = np.cumsum(counts[::-1])[::-1]
  digit = int(np.flatnonzero(at_or_above >= k)[-1])
  above = int(at_or_above[digit + 1]) if digit + 1 < len(counts) else 0
  return digit, above


class KthLargestMagnitude:
  """Streaming exact k-th largest |x|: feed every block to `add_high`, call `finish_high`, feed
  every block again to `add_low`, read `threshold`.

  ``k <= 0`` gives +inf (nothing is kept) and ``k > size`` gives 0 (everything is kept), as the
  library's trim does; both need no pass (`needs_data` is False).

  Args:
    k: the rank (1 = the largest).
    size: the total number of entries that will be fed (to recognize ``k >= size``).
  """

  def __init__(self, k: int, size: int):
    self.k, self.size = int(k), int(size)
    self.needs_data = 0 < self.k <= self.size
    self._high = np.zeros(_HIGH_BINS, np.int64)
    self._low = np.zeros(_BINS, np.int64)
    self._digit = None
    self._rest = None
    self._above_high = 0

  def add_high(self, x: np.ndarray) -> None:
    """Pass 1: counts the high 16 bits of |x| for every entry of ``x``."""
    if self.needs_data:
      counts = np.bincount(_halves(x)[1], minlength=2 * _HIGH_BINS)
      self._high += counts[:_HIGH_BINS] + counts[_HIGH_BINS:]   # fold the sign bit away

  def finish_high(self) -> None:
    """Ends pass 1: picks the bucket of the k-th largest."""
    if self.needs_data:
      if self._high.sum() != self.size:
        raise ValueError(f'pass 1 saw {self._high.sum()} entries, expected {self.size}')
      self._digit, above = _top_digit(self._high, self.k)
      self._above_high = above
      self._rest = self.k - above

  def add_low(self, x: np.ndarray) -> None:
    """Pass 2: counts the low 16 bits of the entries of ``x`` in the selected bucket."""
    if self.needs_data:
      low, high = _halves(x)
      self._low += np.bincount(low[(high & (_HIGH_BINS - 1)) == self._digit], minlength=_BINS)

  def threshold(self) -> float:
    """The k-th largest |x| (float32 value as a Python float)."""
    if self.k <= 0:
      return float('inf')
    if self.k > self.size:
      return 0.0
    low, _ = _top_digit(self._low, self._rest)
    bits = np.array([(self._digit << 16) | low], np.uint32)
    return float(bits.view(np.float32)[0])


  def greater(self) -> int:
    """How many entries have a magnitude strictly above `threshold` (so that k - greater of
    those equal to it complete the top k). 0 for ``k <= 0``; ``size`` entries are kept whole
    for ``k > size`` (threshold 0), reported as 0 above it."""
    if not self.needs_data:
      return 0
    _, above_low = _top_digit(self._low, self._rest)
    return self._above_high + above_low


def kth_largest_magnitude(arrays: Iterable[np.ndarray], k: int) -> float:
  """The k-th largest |x| over all entries of in-memory ``arrays`` (both passes at once)."""
  arrays = list(arrays)
  select = KthLargestMagnitude(k, sum(a.size for a in arrays))
  for a in arrays:
    select.add_high(a)
  select.finish_high()
  for a in arrays:
    select.add_low(a)
  return select.threshold()
