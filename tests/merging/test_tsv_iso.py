"""Tests for cljax.merging.tsv and cljax.merging.iso against float64 NumPy transcriptions of the
authors' procedures (PyTorch (out, in) layout, zero-padded buffers as in their code)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cljax.merging import iso
from cljax.merging import tsv


def np_polar(x):
  u, _, vt = np.linalg.svd(x, full_matrices=False)
  return u @ vt


def np_tsv(tvs, fraction):
  """The authors' compute_and_sum_svd_mem_reduction for one (out, in) key."""
  r = min(tvs[0].shape)
  k = int(r * fraction)
  sum_u = np.zeros((tvs[0].shape[0], r))
  sum_s = np.zeros(r)
  sum_v = np.zeros((r, tvs[0].shape[1]))
  for i, tv in enumerate(tvs):
    u, s, v = np.linalg.svd(tv, full_matrices=False)
    sum_u[:, i * k:(i + 1) * k] = u[:, :k]
    sum_s[i * k:(i + 1) * k] = s[:k]
    sum_v[i * k:(i + 1) * k] = v[:k]
  return np_polar(sum_u) @ np.diag(sum_s) @ np_polar(sum_v)


def np_iso_c(tvs):
  u, s, v = np.linalg.svd(sum(tvs), full_matrices=False)
  return s.mean() * u @ v


def np_iso_cts(tvs, fraction):
  """The authors' iso_cts for one (out, in) key."""
  shape = tvs[0].shape
  r, t = min(shape), len(tvs)
  c = int(r * fraction)
  c = r - round((r - c) / t) * t
  u, s, v = np.linalg.svd(sum(tvs), full_matrices=False)
  cu, cs, cv = u[:, :c], s[:c], v[:c]
  n = int((r - c) / t)
  bu, bs, bv = np.zeros((shape[0], r)), np.zeros(r), np.zeros((r, shape[1]))
  for i, w in enumerate(tvs):
    ut, st, vt = np.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
    bu[:, i * n:(i + 1) * n] = ut[:, :n]
    bs[i * n:(i + 1) * n] = st[:n]
    bv[i * n:(i + 1) * n] = vt[:n]
  bu[:, t * n:t * n + c] = cu
  bs[t * n:t * n + c] = cs
  bv[t * n:t * n + c] = cv
  return bs.mean() * np_polar(bu) @ np_polar(bv)


def _models(n, seed=0, shape=(8, 6)):
  rng = np.random.default_rng(seed)
  base = {'kernel': rng.normal(size=shape), 'bias': rng.normal(size=shape[1])}
  models = [{k: v + rng.normal(size=v.shape) for k, v in base.items()} for _ in range(n)]
  j = lambda t: {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}
  return base, models, j(base), [j(m) for m in models]


def test_tsv_orthogonal_rank_one_tasks_add_up():
  base = {'w': jnp.zeros((2, 2))}
  models = [{'w': jnp.array([[3.0, 0.0], [0.0, 0.0]])}, {'w': jnp.array([[0.0, 0.0], [0.0, 2.0]])}]
  np.testing.assert_allclose(tsv.tsv(base, models)['w'], [[3.0, 0.0], [0.0, 2.0]], atol=1e-6)


@pytest.mark.parametrize('n,fraction', [(3, None), (2, 0.25)])
def test_tsv_matches_authors_procedure(n, fraction):
  base, models, jb, jm = _models(n)
  out = tsv.tsv(jb, jm, scaling=0.8, sv_fraction=fraction)
  tvs = [(m['kernel'] - base['kernel']).T for m in models]   # (in, out) -> authors' (out, in)
  expected = base['kernel'] + 0.8 * np_tsv(tvs, 1 / n if fraction is None else fraction).T
  np.testing.assert_allclose(out['kernel'], expected, rtol=1e-4, atol=1e-4)
  mean_bias = np.mean([m['bias'] - base['bias'] for m in models], axis=0)
  np.testing.assert_allclose(out['bias'], base['bias'] + 0.8 * mean_bias, rtol=1e-5, atol=1e-5)


def test_tsv_refuses_too_small_leaf_and_average_only_rescues_it():
  base, models, jb, jm = _models(4, shape=(3, 2))   # r = 2 < 4 tasks
  with pytest.raises(ValueError, match="'kernel'.*too few for 4 tasks"):
    tsv.tsv(jb, jm)
  out = tsv.tsv(jb, jm, average_only='kernel')
  mean_k = np.mean([m['kernel'] - base['kernel'] for m in models], axis=0)
  np.testing.assert_allclose(out['kernel'], base['kernel'] + mean_k, rtol=1e-5, atol=1e-5)


def test_iso_c_matches_authors_and_flattens_the_spectrum():
  base, models, jb, jm = _models(3, seed=1)
  out = iso.iso_c(jb, jm, scaling=1.3)
  tvs = [m['kernel'] - base['kernel'] for m in models]
  expected = base['kernel'] + 1.3 * np_iso_c(tvs)
  np.testing.assert_allclose(out['kernel'], expected, rtol=1e-4, atol=1e-4)
  s = np.linalg.svd((np.asarray(out['kernel'], np.float64) - base['kernel']) / 1.3,
                    compute_uv=False)
  np.testing.assert_allclose(s, np.full(6, np.linalg.svd(sum(tvs), compute_uv=False).mean()),
                             rtol=1e-4)
  mean_bias = np.mean([m['bias'] - base['bias'] for m in models], axis=0)
  np.testing.assert_allclose(out['bias'], base['bias'] + 1.3 * mean_bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('layout', ['in_out', 'out_in'])
@pytest.mark.parametrize('fraction', [0.8, 0.5])
def test_iso_cts_matches_authors(layout, fraction):
  base, models, jb, jm = _models(3, seed=2, shape=(9, 7))
  out = iso.iso_cts(jb, jm, common_space_fraction=fraction, kernel_layout=layout)
  tvs = [m['kernel'] - base['kernel'] for m in models]
  if layout == 'in_out':
    expected = np_iso_cts([t.T for t in tvs], fraction).T
  else:
    expected = np_iso_cts(tvs, fraction)
  np.testing.assert_allclose(out['kernel'], base['kernel'] + expected, rtol=1e-4, atol=1e-4)


def test_iso_cts_sizes_follow_the_authors_rounding():
  assert iso.iso_cts_sizes((9, 7), 3, 0.8) == (4, 1)    # c0 = 5, round(2 / 3) * 3 = 3
  assert iso.iso_cts_sizes((10, 10), 4, 0.8) == (10, 0)  # round(0.5) = 0 (half to even)
  with pytest.raises(ValueError, match='fewer than'):
    iso.iso_cts_sizes((5, 5), 3, 0.0)                   # round(5 / 3) * 3 = 6 > 5
