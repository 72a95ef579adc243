"""Tests for cljax.subspace against hand-computed cases and NumPy references."""

from __future__ import annotations


from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import subspace


def _compact(basis):
  """The nonzero columns of a padded basis (a test helper: the library keeps padded bases)."""
  return basis[:, :int(subspace.basis_rank(basis))]


def _energy_basis(matrix, threshold):
  """GPM's first basis (Eq. 5): `grow_basis_padded` from the empty basis, compact."""
  return _compact(subspace.grow_basis_padded(None, matrix, threshold))


def _grow_basis(basis, matrix, threshold):
  """GPM's basis growth (Eq. 8-9), compact."""
  return _compact(subspace.grow_basis_padded(basis, matrix, threshold))


def _pad(basis):
  """A (d, k) basis padded with zero columns to (d, d)."""
  return jnp.pad(basis, ((0, 0), (0, basis.shape[0] - basis.shape[1])))


def _spectrum_matrix(rng, d, n, sq_values):
  """A (d, n) matrix with the given squared singular values and random singular vectors."""
  u, _ = np.linalg.qr(rng.normal(size=(d, d)))
  v, _ = np.linalg.qr(rng.normal(size=(n, n)))
  s = np.sqrt(np.asarray(sq_values, np.float64))
  return (u[:, :len(s)] * s) @ v[:, :len(s)].T, u[:, :len(s)]


def _numpy_energy_k(matrix, threshold):
  s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
  ratio = np.cumsum(s**2) / np.sum(s**2)
  return int(np.argmax(ratio >= threshold - 1e-12)) + 1


def _numpy_gpm_grow(basis, matrix, threshold):
  """GPM's update written independently in float64 NumPy (Saha et al. 2021, Eq. 8-9)."""
  r = np.asarray(matrix, np.float64)
  b = np.zeros((r.shape[0], 0)) if basis is None else np.asarray(basis, np.float64)
  total = np.sum(r**2)
  residual = r - b @ (b.T @ r)
  u, s, _ = np.linalg.svd(residual, full_matrices=False)
  accumulated = (total - np.sum(s**2)) / total
  added = 0
  for value in s**2 / total:
    if accumulated >= threshold:
      break
    accumulated += value
    added += 1
  return np.concatenate([b, u[:, :added]], axis=1)[:, :r.shape[0]]


def _projector(basis):
  b = np.asarray(basis, np.float64)
  return b @ b.T


def _assert_orthonormal(basis, atol=1e-5):
  b = np.asarray(basis, np.float64)
  np.testing.assert_allclose(b.T @ b, np.eye(b.shape[1]), atol=atol)


class EnergyBasisTest(chex.TestCase):

  # Squared singular values summing to 100: cumulative energy .40 .65 .80 .90 .95 .98 1.0.
  SQ = [40., 25., 15., 10., 5., 3., 2.]

  @parameterized.parameters((0.3, 1), (0.5, 2), (0.65, 2), (0.85, 4), (0.96, 6), (1.0, 7))
  def test_hand_computed_rank(self, threshold, expected_k):
    matrix, u = _spectrum_matrix(np.random.default_rng(0), 10, 12, self.SQ)
    basis = _energy_basis(jnp.asarray(matrix, jnp.float32), threshold)
    self.assertEqual(basis.shape, (10, expected_k))
    _assert_orthonormal(basis)
    np.testing.assert_allclose(_projector(basis), _projector(u[:, :expected_k]), atol=1e-5)

  @parameterized.parameters((16, 40), (40, 16), (24, 24))
  def test_matches_numpy_svd_and_energy_is_minimal(self, d, n):
    rng = np.random.default_rng(d * n)
    matrix = rng.normal(size=(d, n)) * np.linspace(3.0, 0.1, d)[:, None]
    u_np, _, _ = np.linalg.svd(matrix)
    total = np.sum(matrix**2)
    for threshold in (0.5, 0.8, 0.95, 0.999):
      basis = np.asarray(_energy_basis(jnp.asarray(matrix, jnp.float32), threshold))
      k = basis.shape[1]
      self.assertEqual(k, _numpy_energy_k(matrix, threshold))
      _assert_orthonormal(basis)
      # Same singular vectors up to sign.
      np.testing.assert_allclose(np.abs(np.sum(basis * u_np[:, :k], axis=0)), 1.0, atol=1e-4)
      captured = np.sum((basis.T @ matrix)**2)
      self.assertGreaterEqual(captured, threshold * total * (1 - 1e-5))
      self.assertLess(np.sum((basis[:, :k - 1].T @ matrix)**2), threshold * total)

  @chex.variants(with_jit=True, without_jit=True)
  def test_padded_first_basis_under_jit(self):
    matrix, u = _spectrum_matrix(np.random.default_rng(1), 9, 14, self.SQ)
    matrix = jnp.asarray(matrix, jnp.float32)
    padded_fn = self.variant(lambda m, t: subspace.grow_basis_padded(None, m, t))
    padded = padded_fn(matrix, 0.85)   # the threshold is traced under jit
    self.assertEqual(padded.shape, (9, 9))
    self.assertEqual(int(subspace.basis_rank(padded)), 4)
    np.testing.assert_array_equal(np.asarray(padded)[:, 4:], 0.0)
    np.testing.assert_allclose(_projector(padded), _projector(u[:, :4]), atol=1e-5)
    narrow = subspace.grow_basis_padded(None, matrix, 0.85, width=3)
    self.assertEqual(narrow.shape, (9, 3))
    self.assertEqual(int(subspace.basis_rank(narrow)), 3)

  def test_zero_and_rank_deficient_matrices(self):
    self.assertEqual(_energy_basis(jnp.zeros((5, 3)), 0.9).shape, (5, 0))
    matrix, u = _spectrum_matrix(np.random.default_rng(2), 8, 8, [4.0, 1.0])
    basis = _energy_basis(jnp.asarray(matrix, jnp.float32), 1.0)
    self.assertEqual(basis.shape, (8, 2))   # threshold 1 selects no noise directions
    np.testing.assert_allclose(_projector(basis), _projector(u), atol=1e-5)

  def test_truncated_svd(self):
    rng = np.random.default_rng(3)
    matrix = rng.normal(size=(12, 7)) * np.linspace(2.0, 0.2, 7)
    u_np, s_np, vt_np = np.linalg.svd(matrix, full_matrices=False)
    svd = subspace.truncated_svd(jnp.asarray(matrix, jnp.float32), 3)
    self.assertEqual((svd.u.shape, svd.s.shape, svd.v.shape), ((12, 3), (3,), (7, 3)))
    np.testing.assert_allclose(svd.s, s_np[:3], rtol=1e-5)
    signs = np.sign(np.sum(np.asarray(svd.u) * u_np[:, :3], axis=0))
    np.testing.assert_allclose(np.asarray(svd.u) * signs, u_np[:, :3], atol=1e-5)
    np.testing.assert_allclose(np.asarray(svd.v) * signs, vt_np[:3].T, atol=1e-5)
    jitted = jax.jit(subspace.truncated_svd, static_argnums=1)(jnp.asarray(matrix), 3)
    np.testing.assert_allclose(jitted.s, s_np[:3], rtol=1e-5)



class GrowBasisTest(chex.TestCase):

  def test_hand_made_case(self):
    e = np.eye(4, dtype=np.float32)
    basis = jnp.asarray(e[:, :1])
    # Columns 3 e1, 2 e2, 1 e3: energy 9 + 4 + 1 = 14; e1 already captures 9/14 = 0.643.
    matrix = jnp.asarray(np.stack([3 * e[0], 2 * e[1], 1 * e[2]], axis=1))
    self.assertEqual(_grow_basis(basis, matrix, 0.6).shape, (4, 1))  # nothing to add
    grown = _grow_basis(basis, matrix, 0.9)      # 13/14 = 0.929 >= 0.9: add e2 only
    self.assertEqual(grown.shape, (4, 2))
    np.testing.assert_array_equal(grown[:, 0], e[0])
    np.testing.assert_allclose(np.abs(grown[:, 1]), e[1], atol=1e-6)
    grown = _grow_basis(basis, matrix, 0.95)     # needs 14/14: add e2 and e3
    np.testing.assert_allclose(_projector(grown), _projector(e[:, :3]), atol=1e-6)
    # GPM example from the brief: basis e1, new data spanning e1 and e2.
    matrix = jnp.asarray(np.stack([e[0], e[1], e[0] + e[1]], axis=1))
    grown = _grow_basis(basis, matrix, 0.99)
    np.testing.assert_allclose(_projector(grown), _projector(e[:, :2]), atol=1e-6)

  def test_matches_numpy_gpm_over_tasks(self):
    rng = np.random.default_rng(4)
    d = 20
    mixing = rng.normal(size=(d, d))
    basis, reference = None, None
    for task, threshold in enumerate((0.9, 0.95, 0.97, 0.99)):
      # Each task's inputs live mostly in a few task-specific directions.
      directions = mixing[:, 4 * task:4 * task + 6]
      matrix = directions @ rng.normal(size=(6, 30)) + 0.05 * rng.normal(size=(d, 30))
      basis = _grow_basis(basis, jnp.asarray(matrix, jnp.float32), threshold)
      reference = _numpy_gpm_grow(reference, matrix, threshold)
      self.assertEqual(basis.shape, reference.shape, f'task {task}')
      _assert_orthonormal(basis)
      np.testing.assert_allclose(_projector(basis), _projector(reference), atol=2e-4)
      # Energy accounting (Eq. 9): enough captured, and one direction fewer would not do.
      total = np.sum(matrix**2)
      b = np.asarray(basis, np.float64)
      self.assertGreaterEqual(np.sum((b.T @ matrix)**2), threshold * total * (1 - 1e-5))

  def test_energy_is_minimal_when_directions_are_added(self):
    rng = np.random.default_rng(5)
    old = _energy_basis(jnp.asarray(rng.normal(size=(10, 3))), 1.0)   # rank 3
    matrix = rng.normal(size=(10, 25)) * np.linspace(2.0, 0.1, 10)[:, None]
    for threshold in (0.7, 0.9, 0.99):
      grown = np.asarray(_grow_basis(old, jnp.asarray(matrix, jnp.float32), threshold))
      total = np.sum(matrix**2)
      self.assertGreater(grown.shape[1], 3)
      self.assertGreaterEqual(np.sum((grown.T @ matrix)**2), threshold * total * (1 - 1e-5))
      self.assertLess(np.sum((grown[:, :-1].T @ matrix)**2), threshold * total)

  def test_dimension_cap(self):
    rng = np.random.default_rng(6)
    e = np.eye(3, dtype=np.float32)
    matrix = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
    grown = _grow_basis(jnp.asarray(e[:, :2]), matrix, 1.0)
    self.assertEqual(grown.shape, (3, 3))
    np.testing.assert_array_equal(grown[:, :2], e[:, :2])
    _assert_orthonormal(grown)
    full = _grow_basis(jnp.asarray(e), matrix, 1.0)
    np.testing.assert_array_equal(full, e)
    # A padded basis of static width 3 in dimension 6 is capped at 3 directions.
    e6 = np.eye(6, dtype=np.float32)
    matrix = jnp.asarray(e6[:, 1:5] * np.array([4.0, 3.0, 2.0, 1.0]))
    capped = subspace.grow_basis_padded(jnp.asarray(e6[:, :1]), matrix, 1.0, width=3)
    self.assertEqual(capped.shape, (6, 3))
    np.testing.assert_allclose(_projector(capped), _projector(e6[:, :3]), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_padded_growth_keeps_shape_and_matches_eager(self):
    rng = np.random.default_rng(7)
    grow = self.variant(lambda b, m, t: subspace.grow_basis_padded(b, m, t))
    padded = jnp.zeros((12, 12))
    compact = None
    for threshold in (0.8, 0.9, 0.97):
      matrix = jnp.asarray(rng.normal(size=(12, 5)) @ rng.normal(size=(5, 20)), jnp.float32)
      padded = grow(padded, matrix, threshold)
      compact = _grow_basis(compact, matrix, threshold)
      self.assertEqual(padded.shape, (12, 12))
      k = int(subspace.basis_rank(padded))
      self.assertEqual(k, compact.shape[1])
      np.testing.assert_array_equal(np.asarray(padded)[:, k:], 0.0)
      _assert_orthonormal(np.asarray(padded)[:, :k])
      np.testing.assert_allclose(_projector(padded), _projector(compact), atol=1e-5)
    np.testing.assert_array_equal(_compact(padded).shape, (12, k))
    np.testing.assert_array_equal(_pad(compact).shape, (12, 12))

  def test_many_small_tasks_stay_orthonormal(self):
    rng = np.random.default_rng(8)
    basis = None
    for _ in range(12):
      basis = subspace.grow_basis_padded(
          basis, jnp.asarray(rng.normal(size=(30, 4)) * 1e3, jnp.float32), 0.99)
    k = int(subspace.basis_rank(basis))
    self.assertEqual(k, 30)
    _assert_orthonormal(basis)


class ProjectionTest(chex.TestCase):

  def _basis(self, rng, d, k):
    return jnp.asarray(np.linalg.qr(rng.normal(size=(d, k)))[0], jnp.float32)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dense_conv_and_vector_against_numpy(self):
    rng = np.random.default_rng(10)
    cases = [((8, 5), 3), ((3, 3, 2, 4), 7), ((6,), 2)]
    off_fn = self.variant(subspace.project_off)
    for shape, k in cases:
      x = jnp.asarray(rng.normal(size=shape), jnp.float32)
      d = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
      basis = self._basis(rng, d, k)
      p = _projector(basis)
      matrix = np.asarray(x, np.float64).reshape(d, -1)
      off = off_fn(x, basis)
      self.assertEqual(off.shape, shape)
      np.testing.assert_allclose(np.asarray(off).reshape(d, -1), matrix - p @ matrix, atol=1e-5)
      chex.assert_trees_all_close(off_fn(off, basis), off, atol=1e-5)          # idempotent
      np.testing.assert_allclose(np.asarray(basis).T @ np.asarray(off).reshape(d, -1), 0.0,
                                 atol=1e-5)

  def test_two_sided_projection(self):
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    b, c = self._basis(rng, 7, 2), self._basis(rng, 5, 3)
    off = subspace.project_off(x, b, c)
    pb, pc = _projector(b), _projector(c)
    expected = (np.eye(7) - pb) @ np.asarray(x, np.float64) @ (np.eye(5) - pc)
    np.testing.assert_allclose(off, expected, atol=1e-5)
    chex.assert_trees_all_close(subspace.project_off(off, b, c), off, atol=1e-5)
    only_output = subspace.project_off(x, None, c)
    np.testing.assert_allclose(only_output, np.asarray(x, np.float64) @ (np.eye(5) - pc),
                               atol=1e-5)

  def test_pytree_with_unprotected_leaves_and_padded_bases(self):
    rng = np.random.default_rng(12)
    tree = {'dense': {'kernel': jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
                      'bias': jnp.asarray(rng.normal(size=(3,)), jnp.float32)}}
    compact = self._basis(rng, 6, 2)
    bases = {'dense': {'kernel': _pad(compact), 'bias': None}}
    off = subspace.project_off(tree, bases)
    chex.assert_trees_all_equal(off['dense']['bias'], tree['dense']['bias'])
    np.testing.assert_allclose(off['dense']['kernel'],
                               subspace.project_off(tree['dense']['kernel'], compact), atol=1e-6)
    chex.assert_trees_all_equal(subspace.project_off(tree, None), tree)

  def test_bfloat16_gradients_keep_dtype(self):
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16)
    off = subspace.project_off(x, self._basis(rng, 8, 3))
    self.assertEqual(off.dtype, jnp.bfloat16)


class ProjectGradientsTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(14)
    self.params = {'params': {
        'Conv_0': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                   'bias': jnp.zeros((4,))},
        'Dense_0': {'kernel': jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
                    'bias': jnp.zeros((5,))}}}
    self.grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                              self.params)
    self.conv_basis = _pad(
        jnp.asarray(np.linalg.qr(rng.normal(size=(18, 5)))[0], jnp.float32))
    self.dense_basis = _pad(
        jnp.asarray(np.linalg.qr(rng.normal(size=(8, 3)))[0], jnp.float32))
    self.bases = {'params': {'Conv_0': {'kernel': self.conv_basis, 'bias': None},
                             'Dense_0': {'kernel': self.dense_basis, 'bias': None}}}

  def test_projected_step_under_jit_is_orthogonal_to_protected_subspace(self):
    tx = optax.chain(subspace.project_gradients(self.bases, include='.*/kernel'), optax.sgd(0.5))
    traces = []

    @jax.jit
    def step(params, opt_state, grads):
      traces.append(1)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), updates

    opt_state = tx.init(self.params)
    new_params, updates = step(self.params, opt_state, self.grads)
    conv_update = np.asarray(updates['params']['Conv_0']['kernel']).reshape(18, 4)
    dense_update = np.asarray(updates['params']['Dense_0']['kernel'])
    np.testing.assert_allclose(np.asarray(self.conv_basis).T @ conv_update, 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(self.dense_basis).T @ dense_update, 0.0, atol=1e-5)
    np.testing.assert_allclose(updates['params']['Dense_0']['bias'],
                               -0.5 * self.grads['params']['Dense_0']['bias'], rtol=1e-6)
    # The update is the projected gradient, not just any orthogonal vector.
    expected = -0.5 * (np.eye(8) - _projector(self.dense_basis)) @ np.asarray(
        self.grads['params']['Dense_0']['kernel'])
    np.testing.assert_allclose(dense_update, expected, atol=1e-5)
    chex.assert_trees_all_close(
        new_params, optax.apply_updates(self.params, updates), atol=1e-6)

    # Bases are state (traced arguments): new bases of the same shapes reuse the compiled step.
    other = jax.tree.map(lambda b: jnp.roll(b, 1, axis=0), self.bases)
    other_state = optax.chain(subspace.project_gradients(other, include='.*/kernel'),
                              optax.sgd(0.5)).init(self.params)
    _, other_updates = step(self.params, other_state, self.grads)
    self.assertLen(traces, 1)
    other_dense = np.asarray(other_updates['params']['Dense_0']['kernel'])
    np.testing.assert_allclose(np.asarray(other['params']['Dense_0']['kernel']).T @ other_dense,
                               0.0, atol=1e-5)
    self.assertGreater(np.abs(other_dense - dense_update).max(), 1e-2)

  def test_state_holds_the_bases_and_include_filters_them(self):
    state = subspace.project_gradients(self.bases, include='.*Dense_0/kernel').init(self.params)
    self.assertIsInstance(state, subspace.ProjectionState)
    self.assertIsNone(state.bases['params']['Conv_0']['kernel'])
    np.testing.assert_array_equal(state.bases['params']['Dense_0']['kernel'], self.dense_basis)
    updates, _ = subspace.project_gradients(self.bases, include='.*Dense_0/kernel').update(
        self.grads, state)
    chex.assert_trees_all_equal(updates['params']['Conv_0'], self.grads['params']['Conv_0'])

  def test_dense_layer_outputs_on_old_inputs_are_unchanged(self):
    # GPM's premise: with inputs of old tasks in span(B), W' x = W x after a projected update.
    rng = np.random.default_rng(15)
    model = nn.Dense(4)
    old_x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 10))    # rank-3 inputs in R^10
    params = model.init(jax.random.key(0), jnp.zeros((1, 10)))
    basis = _energy_basis(jnp.asarray(old_x.T, jnp.float32), 1.0)
    self.assertEqual(basis.shape, (10, 3))
    bases = {'params': {'kernel': basis, 'bias': None}}
    tx = optax.chain(subspace.project_gradients(bases, include='.*/kernel'), optax.sgd(1.0))
    new_x = jnp.asarray(rng.normal(size=(20, 10)), jnp.float32)
    loss = lambda p: jnp.sum(jnp.square(model.apply(p, new_x) - 1.0))
    updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
    new_params = optax.apply_updates(params, updates)
    delta_out = (model.apply(new_params, jnp.asarray(old_x, jnp.float32))
                 - model.apply(params, jnp.asarray(old_x, jnp.float32)))
    bias_change = new_params['params']['bias'] - params['params']['bias']
    np.testing.assert_allclose(delta_out - bias_change, 0.0, atol=1e-4)
    self.assertGreater(float(jnp.abs(new_params['params']['kernel']
                                     - params['params']['kernel']).max()), 1e-2)

  def test_conv_layer_outputs_on_old_inputs_are_unchanged(self):
    rng = np.random.default_rng(16)
    model = nn.Conv(3, (3, 3), padding='SAME', use_bias=False)
    old_x = np.zeros((4, 6, 6, 2), np.float32)
    old_x[..., 0] = rng.normal(size=(4, 6, 6))      # channel 1 is always 0 in old tasks
    params = model.init(jax.random.key(1), jnp.zeros((1, 6, 6, 2)))
    rep = subspace.conv_representation(jnp.asarray(old_x), (3, 3), padding='SAME')
    basis = _energy_basis(rep, 1.0)
    self.assertEqual(basis.shape, (18, 9))
    tx = subspace.project_gradients({'params': {'kernel': basis}})
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new_params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(model.apply(new_params, jnp.asarray(old_x)),
                               model.apply(params, jnp.asarray(old_x)), atol=1e-4)


class ConvPatchesTest(parameterized.TestCase):

  def _numpy_patches(self, x, kernel, strides, pads, dilation):
    x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    n, h, w, c = x.shape
    kh, kw = kernel
    span_h, span_w = (kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1
    out_h, out_w = (h - span_h) // strides[0] + 1, (w - span_w) // strides[1] + 1
    out = np.zeros((n, out_h, out_w, kh * kw * c))
    for b in range(n):
      for i in range(out_h):
        for j in range(out_w):
          rows = []
          for a in range(kh):              # kernel-row order: (kh, kw, cin)
            for e in range(kw):
              rows.append(x[b, i * strides[0] + a * dilation[0], j * strides[1] + e * dilation[1]])
          out[b, i, j] = np.concatenate(rows)
    return out

  @parameterized.parameters(
      ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
      ((2, 3), (2, 1), ((0, 1), (2, 0)), (1, 1)),
      ((3, 2), (1, 2), ((0, 0), (0, 0)), (2, 1)))
  def test_against_numpy(self, kernel, strides, pads, dilation):
    x = np.random.default_rng(17).normal(size=(2, 7, 6, 3)).astype(np.float32)
    patches = subspace.conv_patches(jnp.asarray(x), kernel, strides=strides, padding=pads,
                                    kernel_dilation=dilation)
    np.testing.assert_allclose(patches, self._numpy_patches(x, kernel, strides, pads, dilation),
                               atol=1e-6)
    rep = subspace.conv_representation(jnp.asarray(x), kernel, strides=strides, padding=pads,
                                       kernel_dilation=dilation)
    self.assertEqual(rep.shape, (patches.shape[-1], int(np.prod(patches.shape[:-1]))))

  @parameterized.parameters(('SAME', 1), ('SAME', 2), ('VALID', 1), ('VALID', 2))
  def test_flax_conv_equals_patches_times_kernel_matrix(self, padding, stride):
    rng = np.random.default_rng(18)
    x = jnp.asarray(rng.normal(size=(2, 8, 7, 3)), jnp.float32)
    model = nn.Conv(5, (3, 3), strides=stride, padding=padding, use_bias=False)
    params = model.init(jax.random.key(2), x)
    kernel = params['params']['kernel']
    patches = subspace.conv_patches(x, (3, 3), strides=stride, padding=padding)
    np.testing.assert_allclose(patches @ subspace.as_matrix(kernel), model.apply(params, x),
                               atol=1e-4)

  def test_dense_representation(self):
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)      # (batch, sequence, features)
    rep = subspace.dense_representation(jnp.asarray(x))
    self.assertEqual(rep.shape, (4, 6))
    np.testing.assert_array_equal(rep[:, 4], x[1, 1])

  def test_one_dimensional_conv(self):
    rng = np.random.default_rng(19)
    x = jnp.asarray(rng.normal(size=(2, 9, 3)), jnp.float32)
    model = nn.Conv(4, (3,), padding='VALID', use_bias=False)
    params = model.init(jax.random.key(3), x)
    patches = subspace.conv_patches(x, (3,), padding='VALID')
    np.testing.assert_allclose(patches @ subspace.as_matrix(params['params']['kernel']),
                               model.apply(params, x), atol=1e-4)


class FrequentDirectionsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_covariance_error_bound(self):
    rng = np.random.default_rng(20)
    n, d, ell = 240, 24, 8
    a = rng.normal(size=(n, d)) * np.geomspace(5.0, 0.1, d)
    update = self.variant(subspace.frequent_directions_update)
    state = subspace.frequent_directions_init(d, ell=ell)
    for start in range(0, n, 7):
      state = update(state, jnp.asarray(a[start:start + 7], jnp.float32))
    b = np.asarray(state.sketch, np.float64)
    self.assertEqual(b.shape, (ell, d))
    error = a.T @ a - b.T @ b
    eigenvalues = np.linalg.eigvalsh(error)
    spectral = np.abs(eigenvalues).max()
    scale = np.sum(a**2)
    self.assertGreaterEqual(eigenvalues.min(), -1e-5 * scale)     # AᵀA - BᵀB is PSD
    self.assertLessEqual(spectral, float(state.shrinkage) * (1 + 1e-4) + 1e-5 * scale)
    s = np.linalg.svd(a, compute_uv=False)
    for k in range(ell):
      tail = np.sum(s[k:]**2)                                    # ||A - A_k||_F²
      self.assertLessEqual(spectral, tail / (ell - k) * (1 + 1e-4), f'k={k}')
      self.assertLessEqual(float(state.shrinkage), tail / (ell - k) * (1 + 1e-4), f'k={k}')
    # The sketch's leading direction is A's.
    top = np.linalg.svd(a)[2][0]
    sketch_top = np.linalg.svd(b)[2][0]
    self.assertGreater(abs(top @ sketch_top), 0.99)

  def test_exact_when_rows_fit_and_basis_from_sketch(self):
    rng = np.random.default_rng(21)
    a = rng.normal(size=(5, 3)) @ rng.normal(size=(3, 12))     # rank 3 <= ell
    state = subspace.frequent_directions_init(12, ell=4)
    state = subspace.frequent_directions_update(state, jnp.asarray(a[:2], jnp.float32))
    state = subspace.frequent_directions_update(state, jnp.asarray(a[2], jnp.float32))
    state = subspace.frequent_directions_update(state, jnp.asarray(a[3:], jnp.float32))
    b = np.asarray(state.sketch, np.float64)
    np.testing.assert_allclose(b.T @ b, a.T @ a, atol=1e-3 * np.abs(a.T @ a).max())
    self.assertLess(float(state.shrinkage), 1e-3)
    basis = _energy_basis(state.sketch.T, 0.999)
    self.assertEqual(basis.shape, (12, 3))
    np.testing.assert_allclose(_projector(basis), _projector(np.linalg.svd(a)[2][:3].T),
                               atol=1e-4)


class ErrorTest(parameterized.TestCase):

  @parameterized.parameters(0.0, -0.1, 1.5, float('nan'), True, 'high')
  def test_threshold_outside_unit_interval(self, threshold):
    matrix = jnp.ones((4, 3))
    with self.assertRaisesRegex(ValueError, 'threshold'):
      _energy_basis(matrix, threshold)
    with self.assertRaisesRegex(ValueError, 'threshold'):
      _grow_basis(jnp.eye(4)[:, :1], matrix, threshold)

  def test_projection_dimension_mismatch(self):
    grads = {'Dense_0': {'kernel': jnp.ones((8, 5)), 'bias': jnp.ones((5,))}}
    with self.assertRaisesRegex(ValueError, r"\['Dense_0'\]\['kernel'\].*dimension 7.*8"):
      subspace.project_off(grads, {'Dense_0': {'kernel': jnp.eye(7)[:, :2], 'bias': None}})
    with self.assertRaisesRegex(ValueError, r"\['Dense_0'\]\['kernel'\].*output"):
      subspace.project_off(grads, {'Dense_0': {'kernel': None, 'bias': None}},
                           {'Dense_0': {'kernel': jnp.eye(4)[:, :1], 'bias': None}})
    with self.assertRaisesRegex(ValueError, r"\['Dense_0'\]\['bias'\].*no output axis"):
      subspace.project_off(grads, None, {'Dense_0': {'kernel': None, 'bias': jnp.eye(5)}})
    with self.assertRaisesRegex(ValueError, 'the array.*dimension 3'):
      subspace.project_off(jnp.ones((3, 3, 2, 4)), jnp.eye(3))
    with self.assertRaisesRegex(ValueError, '2-D'):
      subspace.project_off(jnp.ones((4, 2)), jnp.ones((4,)))
    with self.assertRaisesRegex(ValueError, 'bases does not match'):
      subspace.project_off(grads, {'Dense_0': jnp.eye(8)})

  def test_project_gradients_init_errors(self):
    params = {'params': {'Dense_0': {'kernel': jnp.ones((8, 5)), 'bias': jnp.ones((5,))}}}
    wrong_dim = {'params': {'Dense_0': {'kernel': jnp.eye(6), 'bias': None}}}
    with self.assertRaisesRegex(ValueError, r"\['params'\]\['Dense_0'\]\['kernel'\].*6.*8"):
      subspace.project_gradients(wrong_dim).init(params)
    skewed = {'params': {'Dense_0': {'kernel': jnp.ones((8, 2)), 'bias': None}}}
    with self.assertRaisesRegex(ValueError, r"\['params'\]\['Dense_0'\]\['kernel'\].*orthonormal"):
      subspace.project_gradients(skewed).init(params)
    gap = {'params': {'Dense_0': {'kernel': jnp.eye(8)[:, [0, 1]] * jnp.array([0.0, 1.0]),
                                  'bias': None}}}
    with self.assertRaisesRegex(ValueError, 'zero column before a nonzero'):
      subspace.project_gradients(gap).init(params)
    good = {'params': {'Dense_0': {'kernel': jnp.eye(8)[:, :2], 'bias': None}}}
    with self.assertRaisesRegex(ValueError, r"'Conv_\.\*' matches no parameter.*params/Dense_0"):
      subspace.project_gradients(good, include='Conv_.*').init(params)
    with self.assertRaisesRegex(ValueError, 'not a valid regex'):
      subspace.project_gradients(good, include='(')
    with self.assertRaisesRegex(ValueError, 'bases does not match'):
      subspace.project_gradients({'params': {'Dense_1': None}}).init(params)
    # A None subtree leaves everything below it unprotected.
    state = subspace.project_gradients({'params': None}).init(params)
    self.assertEqual(jax.tree.leaves(state), [])

  def test_other_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, 'nonempty 2-D'):
      _energy_basis(jnp.ones((4,)), 0.9)
    with self.assertRaisesRegex(ValueError, 'nonempty 2-D'):
      _grow_basis(None, jnp.ones((4, 0)), 0.9)
    with self.assertRaisesRegex(ValueError, 'dimension 3.*4'):
      _grow_basis(jnp.eye(3), jnp.ones((4, 2)), 0.9)
    with self.assertRaisesRegex(ValueError, 'more than width'):
      subspace.grow_basis_padded(jnp.eye(4), jnp.ones((4, 2)), 0.9, width=2)
    with self.assertRaisesRegex(ValueError, 'rank must be'):
      subspace.truncated_svd(jnp.ones((4, 3)), 4)
    with self.assertRaisesRegex(ValueError, 'does not fit kernel_size'):
      subspace.conv_patches(jnp.ones((2, 5, 5, 3)), (3,))
    with self.assertRaisesRegex(ValueError, 'padding'):
      subspace.conv_patches(jnp.ones((2, 5, 5, 3)), (3, 3), padding=[(1, 1)])
    with self.assertRaisesRegex(ValueError, 'strides'):
      subspace.conv_patches(jnp.ones((2, 5, 5, 3)), (3, 3), strides=(1, 1, 1))
    with self.assertRaisesRegex(ValueError, 'ell must be'):
      subspace.frequent_directions_init(5, ell=0)
    with self.assertRaisesRegex(ValueError, r'rows must be \(b, 5\)'):
      subspace.frequent_directions_update(subspace.frequent_directions_init(5, ell=2),
                                          jnp.ones((3, 4)))
    with self.assertRaisesRegex(ValueError, 'scalar'):
      subspace.as_matrix(jnp.ones(()))


if __name__ == '__main__':
  absltest.main()
