"""l2, ewc (Fisher estimators), online_ewc, si, mas and lwf against hand computations.

The model is a two-layer ReLU net written twice: in JAX (what the methods see) and in numpy
float64 with hand-written backpropagation (the reference), on a few random examples.
"""

from __future__ import annotations

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import core
from cljax import methods
from cljax import training
from cljax import tree as tree_lib
from cljax.methods import regularizers

D, H, K, N = 3, 4, 3, 6
KEY = jax.random.key(0)  # The loop's key; these methods draw nothing from it.


def apply_fn(params, x, *, train=False, rngs=None):
  del train, rngs
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params['dense0']['kernel'] + params['dense0']['bias'])
  return h @ params['head']['kernel'] + params['head']['bias']


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return {'dense0': {'kernel': jnp.asarray(rng.normal(size=(D, H)), jnp.float32),
                     'bias': jnp.asarray(rng.normal(size=(H,)) * 0.5, jnp.float32)},
          'head': {'kernel': jnp.asarray(rng.normal(size=(H, K)), jnp.float32),
                   'bias': jnp.asarray(rng.normal(size=(K,)) * 0.5, jnp.float32)}}


def make_data(seed=1, n=N, mask=None, labels=None):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D)).astype(np.float32)
  y = rng.integers(0, K, size=n).astype(np.int32) if labels is None else np.asarray(labels, np.int32)
  m = np.ones((n, K), bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), (n, K)).copy()
  return core.Batch(x, y, m)


# ---------------------------------------------------------------- numpy reference (float64)


def np_params(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def np_forward(p, x):
  z1 = x.astype(np.float64) @ p['dense0']['kernel'] + p['dense0']['bias']
  h = np.maximum(z1, 0.0)
  return z1, h, h @ p['head']['kernel'] + p['head']['bias']


def np_example_grad(p, x, dlogits):
  """d(dlogits . logits)/d params for one example x (D,), by backpropagation."""
  z1, h, _ = np_forward(p, x[None])
  z1, h = z1[0], h[0]
  dh = p['head']['kernel'] @ dlogits
  dz1 = dh * (z1 > 0)
  return {'dense0': {'kernel': np.outer(x, dz1), 'bias': dz1},
          'head': {'kernel': np.outer(h, dlogits), 'bias': dlogits}}


def np_softmax(z, axis=-1):
  e = np.exp(z - z.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_masked_probs(p, data):
  _, _, logits = np_forward(p, data.x)
  return np_softmax(np.where(data.mask, logits, -np.inf))


def np_tree_sum(trees):
  return jax.tree.map(lambda *a: np.sum(a, axis=0), *trees)


def np_ce_grad(p, data):
  """Gradient of the mean masked cross-entropy."""
  probs = np_masked_probs(p, data)
  onehot = np.eye(K)[data.y]
  grads = [np_example_grad(p, data.x[i], (probs[i] - onehot[i]) / data.size) for i in range(data.size)]
  return np_tree_sum(grads)


def np_fisher(p, data, estimator):
  probs = np_masked_probs(p, data)
  per_example = []
  for i in range(data.size):
    def score_sq(c):  # (d log p_c / d theta)^2
      return jax.tree.map(np.square, np_example_grad(p, data.x[i], np.eye(K)[c] - probs[i]))
    if estimator == 'exact':
      per_example.append(np_tree_sum([jax.tree.map(lambda s: probs[i, c] * s, score_sq(c))
                                      for c in range(K) if data.mask[i, c]]))
    else:
      per_example.append(score_sq(data.y[i]))
  return jax.tree.map(lambda s: s / data.size, np_tree_sum(per_example))


def assert_tree_close(actual, expected, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(jax.tree.map(lambda a: np.asarray(a, np.float64), actual),
                              expected, rtol=rtol, atol=atol)


def penalty(method, params, state):
  """A penalty method's term: it reads neither the batch, the logits nor the key."""
  return method.loss(params, state, None, logits=None, apply_fn=apply_fn, key=None)


def shifted(params, scale=0.3, seed=5):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: a + jnp.asarray(scale * rng.normal(size=a.shape), a.dtype), params)


# ------------------------------------------------------------------------ parameter paths


def test_param_paths_and_regex_selection():
  params = make_params()
  paths = tree_lib.path_tree(params)
  assert paths == {'dense0': {'kernel': 'dense0/kernel', 'bias': 'dense0/bias'},
                   'head': {'kernel': 'head/kernel', 'bias': 'head/bias'}}
  selected = regularizers.select_params(params, '.*/kernel', name='x')
  assert selected == {'dense0': {'kernel': True, 'bias': False}, 'head': {'kernel': True, 'bias': False}}
  # Lists and tuples name their indices.
  assert jax.tree.leaves(tree_lib.path_tree({'layers': [jnp.ones(1), (jnp.ones(1),)]})) == [
      'layers/0', 'layers/1/0']


# ------------------------------------------------------------------------------------- l2


class L2Test(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_penalty_value_and_gradient_by_hand(self):
    anchor, params = make_params(), shifted(make_params())
    method = regularizers.l2(strength=3.0, param_regex='dense0/.*')
    state = method.init(anchor)
    loss = self.variant(lambda p, s: penalty(method, p, s))
    np.testing.assert_allclose(loss(params, state), 0.0)  # No previous task yet.
    state = method.end_task(anchor, state, None, apply_fn=apply_fn, key=KEY)
    a, t = np_params(anchor), np_params(params)
    expected = 0.5 * 3.0 * sum(np.sum((t['dense0'][k] - a['dense0'][k]) ** 2) for k in ('kernel', 'bias'))
    np.testing.assert_allclose(loss(params, state), expected, rtol=1e-5)
    grads = self.variant(jax.grad(lambda p, s: penalty(method, p, s)))(params, state)
    expected_grads = {'dense0': jax.tree.map(lambda x, y: 3.0 * (x - y), t['dense0'], a['dense0']),
                      'head': jax.tree.map(np.zeros_like, t['head'])}
    assert_tree_close(grads, expected_grads)

  def test_anchor_is_the_latest_task(self):
    method = regularizers.l2(strength=2.0)
    p0, p1, p2 = make_params(0), make_params(1), make_params(2)
    state = method.end_task(p0, method.init(p0), None, apply_fn=apply_fn, key=KEY)
    state = method.end_task(p1, state, None, apply_fn=apply_fn, key=KEY)
    chex.assert_trees_all_close(state.anchor, p1)
    expected = 0.5 * 2.0 * sum(np.sum((a - b) ** 2) for a, b in zip(
        jax.tree.leaves(np_params(p2)), jax.tree.leaves(np_params(p1))))
    np.testing.assert_allclose(penalty(method, p2, state), expected, rtol=1e-5)


# ------------------------------------------------------------------ ewc: Fisher estimators


@pytest.mark.parametrize('estimator', ['exact', 'empirical'])
def test_ewc_end_task_fisher_matches_hand_computation(estimator):
  params, data = make_params(), make_data(mask=[True, False, True], labels=[0, 2, 2, 0, 0, 2])
  method = regularizers.ewc(strength=2.0, fisher_estimator=estimator, num_samples=100)
  state = method.end_task(params, method.init(params), data, apply_fn=apply_fn, key=KEY)
  assert_tree_close(state.fisher, np_fisher(np_params(params), data, estimator), rtol=1e-4, atol=1e-7)
  # Outputs outside the mask carry no Fisher in the head.
  np.testing.assert_allclose(state.fisher['head']['bias'][1], 0.0, atol=1e-12)


def test_ewc_sampled_fisher_averages_to_the_exact_one():
  """One example repeated: the sampled-label Fisher's mean converges to the exact expectation."""
  params, one = make_params(), make_data(n=1)
  reps = 4000
  data = jax.tree.map(lambda a: np.repeat(a, reps, axis=0), one)
  method = regularizers.ewc(fisher_estimator='sampled', num_samples=reps, fisher_batch_size=500)
  sampled = method.end_task(params, method.init(params), data, apply_fn=apply_fn, key=KEY).fisher
  p = np_params(params)
  exact = np_fisher(p, one, 'exact')
  probs = np_masked_probs(p, one)[0]
  # Per-label squared scores: the sampled estimate is their empirical mean; bound it by 5 sigma.
  per_label = [jax.tree.map(np.square, np_example_grad(p, one.x[0], np.eye(K)[c] - probs)) for c in range(K)]
  var = jax.tree.map(lambda e, *s: sum(pc * (sc - e) ** 2 for pc, sc in zip(probs, s)), exact, *per_label)
  for got, want, v in zip(jax.tree.leaves(sampled), jax.tree.leaves(exact), jax.tree.leaves(var)):
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 5 * np.sqrt(v / reps) + 1e-6)


# ----------------------------------------------------------------------------- online ewc


class OnlineEWCTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_running_fisher_and_last_anchor(self):
    p1, p2, theta = make_params(0), make_params(1), make_params(2)
    d1, d2 = make_data(seed=3), make_data(seed=4)
    method = regularizers.online_ewc(strength=5.0, gamma=0.7, num_samples=100)
    state = method.end_task(p1, method.init(p1), d1, apply_fn=apply_fn, key=KEY)
    state = method.end_task(p2, state, d2, apply_fn=apply_fn, key=KEY)
    f = jax.tree.map(lambda a, b: 0.7 * a + b, np_fisher(np_params(p1), d1, 'exact'),
                     np_fisher(np_params(p2), d2, 'exact'))
    assert_tree_close(state.fisher, f, rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(state.anchor, p2)
    expected = 0.5 * 5.0 * sum(np.sum(fl * (t - a) ** 2) for fl, t, a in zip(
        jax.tree.leaves(f), jax.tree.leaves(np_params(theta)), jax.tree.leaves(np_params(p2))))
    loss = self.variant(lambda p, s: penalty(method, p, s))(theta, state)
    np.testing.assert_allclose(loss, expected, rtol=1e-4)


# ------------------------------------------------------------------------------------- si


class SITest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_path_integral_importance_and_penalty(self):
    c, xi = 0.5, 0.1
    method = regularizers.si(strength=c, damping=xi)
    theta0 = make_params(0)
    state = method.init(theta0)
    trajectory = [theta0, shifted(theta0, 0.1, 1), shifted(theta0, 0.2, 2)]
    grads = [shifted(jax.tree.map(jnp.zeros_like, theta0), 1.0, s) for s in (3, 4)]
    update = self.variant(lambda s, p, u, g: method.update(s, p, u, g, key=KEY))
    for old, new, g in zip(trajectory, trajectory[1:], grads):
      state = update(state, old, jax.tree.map(jnp.subtract, new, old), g)
    t = [np_params(p) for p in trajectory]
    g = [np_params(x) for x in grads]
    omega = jax.tree.map(lambda t0, t1, t2, g0, g1: -g0 * (t1 - t0) - g1 * (t2 - t1), *t, *g)
    assert_tree_close(state.omega, omega)
    state = method.end_task(trajectory[-1], state, None, apply_fn=apply_fn, key=KEY)
    importance = jax.tree.map(lambda w, t0, t2: w / ((t2 - t0) ** 2 + xi), omega, t[0], t[2])
    assert_tree_close(state.importance, importance, rtol=1e-4)
    assert_tree_close(state.omega, jax.tree.map(np.zeros_like, omega))
    chex.assert_trees_all_close(state.anchor, trajectory[-1])
    theta = make_params(7)
    expected = c * sum(np.sum(w * (x - a) ** 2) for w, x, a in zip(
        jax.tree.leaves(importance), jax.tree.leaves(np_params(theta)), jax.tree.leaves(t[2])))
    loss = self.variant(lambda p, s: penalty(method, p, s))(theta, state)
    np.testing.assert_allclose(loss, expected, rtol=1e-4)

  def test_training_loop_feeds_the_unregularized_gradient(self):
    """Three full-batch SGD steps through `training.fit_task`, re-simulated in numpy."""
    c, xi, lr = 0.5, 0.1, 0.1
    method = regularizers.si(strength=c, damping=xi)
    theta0, data = make_params(0), make_data()
    importance = jax.tree.map(lambda a: jnp.abs(a) + 0.5, shifted(jax.tree.map(jnp.zeros_like, theta0)))
    anchor = shifted(theta0, 0.2, 9)
    state = regularizers.SIState(jax.tree.map(jnp.zeros_like, theta0), importance, anchor)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
    result = training.fit_task(apply_fn, method, optax.sgd(lr), theta0, state, data, epochs=3,
                               batch_size=N, seed=0, mesh=mesh)
    theta, omega = np_params(theta0), jax.tree.map(np.zeros_like, np_params(theta0))
    big, a = np_params(importance), np_params(anchor)
    for _ in range(3):
      g = np_ce_grad(theta, data)
      new = jax.tree.map(lambda t, gg, w, aa: t - lr * (gg + 2 * c * w * (t - aa)), theta, g, big, a)
      omega = jax.tree.map(lambda w, gg, t1, t0: w - gg * (t1 - t0), omega, g, new, theta)
      theta = new
    assert_tree_close(result.params, theta, rtol=1e-4, atol=1e-5)
    assert_tree_close(result.method_state.omega, omega, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------ mas


def np_mas_importance(p, data):
  per_example = []
  for i in range(data.size):
    _, _, logits = np_forward(p, data.x[i:i + 1])
    f = np.where(data.mask[i], logits[0], 0.0)
    per_example.append(jax.tree.map(np.abs, np_example_grad(p, data.x[i], 2.0 * f)))
  return jax.tree.map(lambda s: s / data.size, np_tree_sum(per_example))


class MASTest(chex.TestCase):

  def test_importance_is_mean_of_per_example_absolute_gradients(self):
    params, data = make_params(), make_data(mask=[True, True, False])
    got = regularizers.mas_importance(apply_fn, params, data, batch_size=4)  # Two chunks, one padded.
    want = np_mas_importance(np_params(params), data)
    assert_tree_close(got, want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got['head']['bias'][2], 0.0)  # Outside the head: no importance.
    # Not the absolute value of the mean gradient (examples' signs do not cancel).
    mean_first = jax.tree.map(np.abs, jax.tree.map(lambda s: s / N, np_tree_sum([
        np_example_grad(np_params(params), data.x[i],
                        2.0 * np.where(data.mask[i], np_forward(np_params(params), data.x[i:i + 1])[2][0], 0))
        for i in range(N)])))
    assert np.sum(want['dense0']['kernel']) > np.sum(mean_first['dense0']['kernel']) + 1e-3

  @chex.variants(with_jit=True, without_jit=True)
  def test_importance_accumulates_and_penalizes(self):
    p1, p2, theta = make_params(0), make_params(1), make_params(2)
    d1, d2 = make_data(seed=3), make_data(seed=4)
    method = regularizers.mas(strength=0.7, num_samples=100)
    state = method.end_task(p1, method.init(p1), d1, apply_fn=apply_fn, key=KEY)
    state = method.end_task(p2, state, d2, apply_fn=apply_fn, key=KEY)
    omega = jax.tree.map(np.add, np_mas_importance(np_params(p1), d1), np_mas_importance(np_params(p2), d2))
    assert_tree_close(state.importance, omega, rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(state.anchor, p2)
    expected = 0.7 * sum(np.sum(w * (t - a) ** 2) for w, t, a in zip(
        jax.tree.leaves(omega), jax.tree.leaves(np_params(theta)), jax.tree.leaves(np_params(p2))))
    loss = self.variant(lambda p, s: penalty(method, p, s))(theta, state)
    np.testing.assert_allclose(loss, expected, rtol=1e-4)


# ------------------------------------------------------------------------------------ lwf


def np_kd(logits, old_logits, groups, temperature):
  """-sum over groups of sum p_old log q, each group its own softmax; mean over the batch."""
  total = np.zeros(logits.shape[0])
  for g in groups:
    q = np_softmax(logits[:, g] / temperature)
    p = np_softmax(old_logits[:, g] / temperature)
    total -= np.sum(p * np.log(q), axis=-1)
  return total.mean()


class LwFTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_distillation_value_and_gradient_by_hand(self):
    rng = np.random.default_rng(0)
    logits, old = rng.normal(size=(5, 6)) * 2, rng.normal(size=(5, 6)) * 2
    old_outputs = np.array([True, True, False, True, True, True])
    groups = np.array([0, 0, 0, 1, 1, -1], np.int32)  # Output 5 is old but in no group: skipped.
    kd = self.variant(lambda z, o: regularizers.lwf_distillation(
        z, o, jnp.asarray(old_outputs), jnp.asarray(groups), temperature=2.0))
    np.testing.assert_allclose(kd(logits, old), np_kd(logits, old, [[0, 1], [3, 4]], 2.0), rtol=1e-5)
    # d/dz of the distillation: (q - p) / T per group, / B for the batch mean; 0 elsewhere.
    grad = self.variant(jax.grad(lambda z, o: regularizers.lwf_distillation(
        z, o, jnp.asarray(old_outputs), jnp.asarray(groups), temperature=2.0)))(
            jnp.asarray(logits, jnp.float32), jnp.asarray(old, jnp.float32))
    want = np.zeros_like(logits)
    for g in ([0, 1], [3, 4]):
      want[:, g] = (np_softmax(logits[:, g] / 2) - np_softmax(old[:, g] / 2)) / 2 / 5
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)

  @parameterized.parameters(np.inf, -np.inf, np.nan)
  def test_outputs_not_distilled_cannot_poison_the_loss(self, bad):
    # Output 3 is not distilled (no group): whatever it holds, the loss and gradient are those
    # of the other outputs.
    rng = np.random.default_rng(5)
    z, z_old = rng.normal(size=(2, 3, 4)).astype(np.float32)
    old_outputs = jnp.asarray([True, True, True, False])
    groups = jnp.asarray([0, 0, 1, -1], jnp.int32)
    kd = lambda a, b: regularizers.lwf_distillation(a, b, old_outputs, groups, temperature=2.0)
    want = kd(jnp.asarray(z), jnp.asarray(z_old))
    z_bad, z_old_bad = z.copy(), z_old.copy()
    z_bad[:, 3] = bad
    z_old_bad[:, 3] = bad
    np.testing.assert_allclose(kd(jnp.asarray(z_bad), jnp.asarray(z_old_bad)), want, rtol=1e-6)
    grad = jax.grad(kd)(jnp.asarray(z_bad), jnp.asarray(z_old_bad))
    np.testing.assert_allclose(grad, jax.grad(kd)(jnp.asarray(z), jnp.asarray(z_old)), atol=1e-7)
    np.testing.assert_array_equal(grad[:, 3], 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('domain', 'class', 'task')
  def test_old_outputs_per_scenario(self, scenario):
    """Task 0 then task 1 on a 4-output head; task 2's loss distills the right outputs."""
    k = 4
    rng = np.random.default_rng(1)

    def task(labels, mask):
      x = rng.normal(size=(len(labels), D)).astype(np.float32)
      return core.Batch(x, np.asarray(labels, np.int32), np.broadcast_to(mask, (len(labels), k)).copy())

    everything = np.ones(k, bool)
    if scenario == 'domain':  # Every task uses every class.
      tasks, expected_groups = [task([0, 1, 2, 3], everything)] * 3, [[0, 1, 2, 3]]
    elif scenario == 'class':  # New classes per task on a shared head.
      tasks = [task([0, 0], everything), task([1, 1], everything), task([2, 3], everything)]
      expected_groups = [[0, 1]]
    else:  # One head per task: outputs {0, 1}, {2}, {3}.
      tasks = [task([0, 1], [True, True, False, False]), task([2, 2], [False, False, True, False]),
               task([3, 3], [False, False, False, True])]
      expected_groups = [[0, 1], [2]]
    rng_p = np.random.default_rng(2)
    params = [{'dense0': {'kernel': jnp.asarray(rng_p.normal(size=(D, H)), jnp.float32),
                          'bias': jnp.zeros((H,), jnp.float32)},
               'head': {'kernel': jnp.asarray(rng_p.normal(size=(H, k)), jnp.float32),
                        'bias': jnp.zeros((k,), jnp.float32)}} for _ in range(3)]
    method = regularizers.lwf(strength=1.5, temperature=2.0)
    state = method.init(params[0])
    self.assertEqual(state.old_outputs.shape, (k,))
    distill = lambda p, s, b: method.loss(p, s, b, logits=apply_fn(p, b.x, train=True),
                                          apply_fn=apply_fn, key=KEY)
    np.testing.assert_allclose(distill(params[0], state, tasks[0]), 0.0)  # Task 0.
    for t in range(2):
      state = method.end_task(params[t], state, tasks[t], apply_fn=apply_fn, key=KEY)
    z = np_forward(np_params(params[2]), tasks[2].x)[2]
    z_old = np_forward(np_params(params[1]), tasks[2].x)[2]
    expected = 1.5 * np_kd(z, z_old, expected_groups, 2.0)
    # Without recorded responses the old model runs on the batch; with them (prepare_task, as
    # the training loop calls it before the task) they are the old model's outputs.
    np.testing.assert_allclose(self.variant(distill)(params[2], state, tasks[2]), expected,
                               rtol=1e-5)
    prepared = method.prepare_task(params[2], state, tasks[2], seen=tasks, apply_fn=apply_fn,
                                   key=KEY)
    np.testing.assert_allclose(prepared.aux[regularizers.TEACHER_LOGITS], z_old, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(prepared.x, tasks[2].x)
    np.testing.assert_allclose(self.variant(distill)(params[2], state, prepared), expected,
                               rtol=1e-5)
    # The term acts through the loop's logits only (LwF's weight-space term was 0 in the old
    # contract): with the logits fixed, its gradient in the parameters is 0, so the step's one
    # backward pass does not count the distillation twice.
    fixed = jnp.asarray(z, jnp.float32)
    grads = jax.grad(lambda p: method.loss(p, state, prepared, logits=fixed, apply_fn=apply_fn,
                                           key=KEY))(params[2])
    assert_tree_close(grads, jax.tree.map(np.zeros_like, np_params(params[2])), atol=0.0)


# -------------------------------------------------------------------- shared: state, errors


def _consolidate_twice(method, params, data):
  state = method.init(params)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  for seed in (3, 4):
    state = method.end_task(shifted(params, 0.1, seed), state, data, apply_fn=apply_fn, key=KEY)
  return shapes, jax.tree.map(lambda a: (a.shape, a.dtype), state)


@pytest.mark.parametrize('name', ['l2', 'ewc', 'online_ewc', 'si', 'mas', 'lwf'])
def test_state_shapes_do_not_change_between_tasks(name):
  before, after = _consolidate_twice(methods.get(name, {}), make_params(), make_data())
  assert before == after


@pytest.mark.parametrize('name, hparams, match', [
    ('l2', {'strength': -1.0}, 'l2.strength'),
    ('l2', {'strength': float('nan')}, 'l2.strength'),
    ('l2', {'param_regex': '('}, 'l2.param_regex'),
    ('online_ewc', {'strength': float('nan')}, 'online_ewc.strength'),
    ('online_ewc', {'gamma': 1.5}, 'online_ewc.gamma'),
    ('online_ewc', {'fisher_estimator': 'kfac'}, 'online_ewc.fisher_estimator'),
    ('si', {'strength': -0.1}, 'si.strength'),
    ('si', {'damping': 0.0}, 'si.damping'),
    ('mas', {'strength': float('inf')}, 'mas.strength'),
    ('mas', {'num_samples': 0}, 'mas.num_samples'),
    ('lwf', {'strength': -2.0}, 'lwf.strength'),
    ('lwf', {'temperature': 0.0}, 'lwf.temperature'),
    ('lwf', {'temperature': -1.0}, 'lwf.temperature'),
    ('lwf', {'temperature': float('nan')}, 'lwf.temperature'),
    ('ewc', {'strength': -1.0}, 'ewc.strength'),
    ('l2', {'lambda': 1.0}, 'l2.lambda'),
])
def test_bad_hyperparameters_name_the_config_key(name, hparams, match):
  with pytest.raises(ValueError, match=match):
    methods.get(name, hparams)


def test_regex_matching_no_parameter_raises_in_init():
  method = regularizers.l2(param_regex='encoder/.*')  # Valid regex, checked against params at init.
  with pytest.raises(ValueError, match=r'l2.param_regex.*matches no parameter'):
    method.init(make_params())


def test_lwf_without_a_head_needs_num_outputs():
  params = {'w': jnp.ones((2, 5))}
  with pytest.raises(ValueError, match='lwf.num_outputs'):
    regularizers.lwf().init(params)
  assert regularizers.lwf(num_outputs=5).init(params).groups.shape == (5,)
