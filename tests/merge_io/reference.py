"""Independent references shared by the checkpoint-merge tests: a safetensors reader and NumPy
versions of mergekit's formulas (float64), written from their definitions, not from cljax."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open


def read_folder(folder):
  """name -> array of a written output, via the index (or the single file), with safe_open."""
  index = os.path.join(folder, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    files = ['model.safetensors']
  out = {}
  for file in files:
    with safe_open(os.path.join(folder, file), framework='numpy') as f:
      for name in f.keys():
        out[name] = f.get_tensor(name)
  return out


def np_trim(tv, density):
  """TIES's trim: keep the round(density * size) largest magnitudes (and ties at the threshold)."""
  k = int(round(density * tv.size))
  if k >= tv.size:
    return tv
  if k == 0:
    return np.zeros_like(tv)
  t = np.sort(np.abs(tv).reshape(-1))[::-1][k - 1]
  return np.where(np.abs(tv) >= t, tv, 0)


def np_magnitude(tv, density):
  """mergekit's ``sparsify.magnitude``, transcribed: exactly k = int(density * size) entries of
  largest |tv| kept (density >= 1 keeps all), by an argsort of |tv| descending. mergekit's
  ``torch.argsort`` is not stable, so its order among equal magnitudes is unspecified; this
  reference (and cljax) keeps the lower row-major index first (a stable sort). mergekit stops on
  k = 0 (an assertion); this keeps nothing."""
  if density >= 1:
    return tv
  k = int(density * tv.size)
  keep = np.zeros(tv.size, bool)
  keep[np.argsort(-np.abs(tv).reshape(-1), kind='stable')[:k]] = True
  return np.where(keep.reshape(tv.shape), tv, np.zeros_like(tv))


def np_weighted_disjoint_mean(xs, weights):
  """mergekit's normalized sign consensus: sum of the agreeing w_i tau_i / sum of their w_i."""
  x = np.stack(xs)
  w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
  sign = np.sign(x.sum(0))
  agree = (np.sign(x) == sign) & (x != 0)
  den = (w * agree).sum(0)
  return (x * agree).sum(0) / np.where(den == 0, 1.0, den)   # mergekit: divisor 0 -> 1
