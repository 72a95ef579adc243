"""The merge registry: every entry runs on a tiny pytree, checks its hyperparameter names and
returns finite params shaped like the base; name and input errors."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import merging
from cljax.merging import registry


def _tree(rng, scale=1.0):
  return {'dense': {'kernel': jnp.asarray(scale * rng.normal(size=(4, 3)), jnp.float32),
                    'bias': jnp.asarray(scale * rng.normal(size=(3,)), jnp.float32)},
          'scale': jnp.asarray(1.0 + scale * rng.normal(), jnp.float32)}


def _apply(params, x):
  """The tiny tree as a model: logits (N, 3) = scale * (x @ kernel + bias), x (N, 4)."""
  return params['scale'] * (x @ params['dense']['kernel'] + params['dense']['bias'])


def _inputs(base, n):
  target = jax.tree.map(lambda x: x + 0.5, base)
  rng = np.random.default_rng(1)
  xs = [jnp.asarray(rng.normal(size=(8, 4)), jnp.float32) for _ in range(n)]
  labels = [jnp.asarray(rng.integers(0, 3, size=8)) for _ in range(n)]

  def task_loss(x, y):
    return lambda p: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(_apply(p, x)),
                                                   y[:, None], axis=1))

  return dict(key=jax.random.key(0),
              fishers=[jax.tree.map(lambda x, i=i: jnp.full_like(x, 1.0 + i), base)
                       for i in range(n)],
              loss_fn=lambda p: sum(jnp.sum((a - b) ** 2) for a, b in
                                    zip(jax.tree.leaves(p), jax.tree.leaves(target))),
              # RegMean: per model the (4, 4) Gram of its inputs to the (in 4, out 3) kernel.
              grams=[{'dense/kernel': x.T @ x / x.shape[0]} for x in xs],
              apply_fn=_apply, test_inputs=xs,
              loss_fns=[task_loss(x, y) for x, y in zip(xs, labels)])


def _check_like(merged, base):
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  for m, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
    assert m.shape == b.shape and m.dtype == b.dtype
    assert np.all(np.isfinite(np.asarray(m)))


# Required hyperparameters (no default in the signature) get these values.
_REQUIRED = {'scaling': 0.5, 'drop_rate': 0.3, 'density': 0.5, 'alpha': 0.9}
# Shorter optimisations than the papers' (the merges' own tests cover their defaults).
_FAST = {'adamerging': {'num_steps': 20}, 'wudi': {'num_steps': 20},
         'soft_frank_wolfe': {'num_iterations': 2, 'ada_steps': 10}}
# SLERP interpolates two models (or the base and one); NuSLERP takes exactly two.
_NUM_MODELS = {'slerp': 2, 'nuslerp': 2}


@pytest.mark.parametrize('name', sorted(merging.REGISTRY))
def test_every_entry_runs_and_checks_its_hyperparameter_names(name):
  entry = merging.REGISTRY[name]
  rng = np.random.default_rng(0)
  base = _tree(rng)
  n = _NUM_MODELS.get(name, 3)
  finetuned = [jax.tree.map(lambda b, d: b + d, base, _tree(rng, 0.1)) for _ in range(n)]
  hp = {k: _REQUIRED[k] for k, v in entry.hparams.items() if v is inspect.Parameter.empty}
  hp.update(_FAST.get(name, {}))
  signature = inspect.signature(entry.fn).parameters
  # Hyperparameters are exactly the keyword-only parameters but exclude and the data inputs.
  assert set(entry.hparams) == {k for k, p in signature.items() if p.kind == p.KEYWORD_ONLY} \
      - {'exclude', *entry.inputs}
  assert set(entry.inputs) <= set(registry.INPUTS)
  with pytest.raises(ValueError, match=rf'unknown hyperparameter\(s\) {name}\.bogus'):
    merging.check_names(name, {**hp, 'bogus': 1})
  if entry.kind == 'static':
    merged = merging.merge(name, base, finetuned, hparams=hp, inputs=_inputs(base, n))
    with pytest.raises(ValueError, match=rf'{name}\.bogus'):
      merging.merge(name, base, finetuned, hparams={**hp, 'bogus': 1}, inputs=_inputs(base, n))
    for missing in entry.required_inputs:   # each data input is needed, and named
      with pytest.raises(ValueError, match=rf"merge '{name}' needs input\(s\) {missing}"):
        merging.merge(name, base, finetuned, hparams=hp,
                      inputs={k: v for k, v in _inputs(base, n).items() if k != missing})
  elif entry.kind == 'per_task':
    task_model = merging.per_task_merge(name, base, finetuned, hparams=hp,
                                        inputs=_inputs(base, n))
    for t in range(1, n):
      _check_like(task_model(t), base)
    merged = task_model(0)
  else:
    merge = merging.continual_merge(name, hparams=hp)
    state = merge.init(base)
    for model in finetuned:
      state = merge.update(state, model)
    merged = merge.params(state)
  _check_like(merged, base)
  # Every method moves the merged leaves off the base (the task vectors are nonzero).
  assert not np.allclose(np.asarray(merged['dense']['kernel']), np.asarray(base['dense']['kernel']))


def test_average_through_the_registry_is_the_mean():
  base = {'w': jnp.zeros((2,))}
  models = [{'w': jnp.asarray([1.0, 2.0])}, {'w': jnp.asarray([3.0, -2.0])}]
  np.testing.assert_allclose(merging.merge('average', base, models)['w'], [2.0, 0.0])


def test_dare_variants_and_kinds():
  assert merging.REGISTRY['dare_task_arithmetic'].hparams.keys() == {'drop_rate', 'scaling'}
  assert merging.REGISTRY['dare_ties'].hparams.keys() == {'drop_rate', 'scaling', 'density',
                                                         'trim'}
  assert registry.names('continual') == ['continual_average', 'continual_task_arithmetic',
                                         'continual_ties', 'opcm']
  assert [n for n in registry.names('static') if not merging.REGISTRY[n].data_free] == \
      ['adamerging', 'fisher', 'frank_wolfe', 'regmean', 'soft_frank_wolfe']
  assert registry.names('per_task') == ['emr']
  # dare_task_arithmetic with drop_rate 0 is task arithmetic: base + 0.5 * (1 + 3).
  base = {'w': jnp.zeros((3,))}
  models = [{'w': jnp.ones((3,))}, {'w': jnp.full((3,), 3.0)}]
  out = merging.merge('dare_task_arithmetic', base, models,
                      hparams=dict(drop_rate=0.0, scaling=0.5), inputs={'key': jax.random.key(1)})
  np.testing.assert_allclose(out['w'], [2.0, 2.0, 2.0])


def test_unknown_names_and_missing_inputs_are_named():
  with pytest.raises(ValueError,
                     match=r"unknown static merge 'soup'; choose from \['adamerging', 'average'"):
    merging.get('soup', kind='static')
  with pytest.raises(ValueError, match="unknown continual merge 'ties'"):
    merging.continual_merge('ties')
  with pytest.raises(ValueError, match=r"unknown static merge 'opcm'"):
    merging.merge('opcm', {'w': jnp.zeros(2)}, [{'w': jnp.ones(2)}])
  with pytest.raises(ValueError, match=r"merge 'fisher' needs input\(s\) fishers"):
    merging.merge('fisher', {'w': jnp.zeros(2)}, [{'w': jnp.ones(2)}])
  with pytest.raises(ValueError, match=r"merge 'dare_ties' needs input\(s\) key"):
    merging.merge('dare_ties', {'w': jnp.zeros(2)}, [{'w': jnp.ones(2)}],
                  hparams=dict(drop_rate=0.1, scaling=1.0), inputs={'key': None})
  with pytest.raises(ValueError, match=r'ties\.key'):  # an input is not a hyperparameter
    merging.check_names('ties', {'key': 0})


def test_emr_through_the_registry_gives_each_task_its_hand_computed_model():
  # tau_1 = [1, -2], tau_2 = [3, 1]: elected signs [+, -], tau_uni = [3, -2]; masks [T, T] and
  # [T, F]; rescalers mean|tau_t| / mean|M_t tau_uni|: 1.5 / 2.5 = 0.6 and 2 / 1.5 = 4 / 3.
  base = {'w': jnp.asarray([1.0, 1.0])}
  models = [{'w': jnp.asarray([2.0, -1.0])}, {'w': jnp.asarray([4.0, 2.0])}]
  task_model = merging.per_task_merge('emr', base, models)
  np.testing.assert_allclose(task_model(0)['w'], [1.0 + 1.8, 1.0 - 1.2], rtol=1e-6)
  np.testing.assert_allclose(task_model(1)['w'], [1.0 + 4.0, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="unknown static merge 'emr'"):
    merging.merge('emr', base, models)


def test_blockwise_marks_exactly_the_elementwise_merges():
  assert {n for n, m in merging.REGISTRY.items() if m.blockwise} == {
      'average', 'task_arithmetic', 'ties', 'dare_task_arithmetic', 'dare_ties', 'fisher',
      'magmax', 'continual_average', 'continual_task_arithmetic'}
  # The deterministic elementwise ones merged in two row blocks equal the whole-tensor merge.
  rng = np.random.default_rng(3)
  base = rng.normal(size=(6, 4)).astype(np.float32)
  models = [base + 0.1 * rng.normal(size=(6, 4)).astype(np.float32) for _ in range(3)]
  fishers = [rng.uniform(0.5, 2.0, size=(6, 4)).astype(np.float32) for _ in range(3)]
  for name, hp in (('average', {}), ('task_arithmetic', {'scaling': 0.4}),
                   ('magmax', {'scaling': 0.5}), ('fisher', {})):
    def run(rows):
      return np.asarray(merging.merge(
          name, {'w': base[rows]}, [{'w': m[rows]} for m in models], hparams=hp,
          inputs={'fishers': [{'w': f[rows]} for f in fishers]})['w'])
    blocks = np.concatenate([run(slice(0, 2)), run(slice(2, 6))])
    np.testing.assert_allclose(blocks, run(slice(None)), rtol=1e-6, err_msg=name)
