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


def _inputs(base, n):
  target = jax.tree.map(lambda x: x + 0.5, base)
  return dict(key=jax.random.key(0),
              fishers=[jax.tree.map(lambda x, i=i: jnp.full_like(x, 1.0 + i), base)
                       for i in range(n)],
              loss_fn=lambda p: sum(jnp.sum((a - b) ** 2) for a, b in
                                    zip(jax.tree.leaves(p), jax.tree.leaves(target))))


def _check_like(merged, base):
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  for m, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
    assert m.shape == b.shape and m.dtype == b.dtype
    assert np.all(np.isfinite(np.asarray(m)))


# Required hyperparameters (no default in the signature) get these values.
_REQUIRED = {'scaling': 0.5, 'drop_rate': 0.3}


@pytest.mark.parametrize('name', sorted(merging.REGISTRY))
def test_every_entry_runs_and_checks_its_hyperparameter_names(name):
  entry = merging.REGISTRY[name]
  rng = np.random.default_rng(0)
  base = _tree(rng)
  finetuned = [jax.tree.map(lambda b, d: b + d, base, _tree(rng, 0.1)) for _ in range(3)]
  hp = {k: _REQUIRED[k] for k, v in entry.hparams.items() if v is inspect.Parameter.empty}
  signature = inspect.signature(entry.fn).parameters
  # Hyperparameters are exactly the keyword-only parameters but exclude and the data inputs.
  assert set(entry.hparams) == {k for k, p in signature.items() if p.kind == p.KEYWORD_ONLY} \
      - {'exclude', *entry.inputs}
  assert set(entry.inputs) <= set(registry.INPUTS)
  with pytest.raises(ValueError, match=rf'unknown hyperparameter\(s\) {name}\.bogus'):
    merging.check_names(name, {**hp, 'bogus': 1})
  if entry.kind == 'static':
    merged = merging.merge(name, base, finetuned, hparams=hp, inputs=_inputs(base, 3))
    with pytest.raises(ValueError, match=rf'{name}\.bogus'):
      merging.merge(name, base, finetuned, hparams={**hp, 'bogus': 1}, inputs=_inputs(base, 3))
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
      ['fisher', 'frank_wolfe']
  # dare_task_arithmetic with drop_rate 0 is task arithmetic: base + 0.5 * (1 + 3).
  base = {'w': jnp.zeros((3,))}
  models = [{'w': jnp.ones((3,))}, {'w': jnp.full((3,), 3.0)}]
  out = merging.merge('dare_task_arithmetic', base, models,
                      hparams=dict(drop_rate=0.0, scaling=0.5), inputs={'key': jax.random.key(1)})
  np.testing.assert_allclose(out['w'], [2.0, 2.0, 2.0])


def test_unknown_names_and_missing_inputs_are_named():
  with pytest.raises(ValueError, match=r"unknown static merge 'soup'; choose from \['average'"):
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
