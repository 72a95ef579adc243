"""Conventions every baseline merge shares (one test per method): excluded leaves keep the base,
bf16 inputs give bf16 outputs, 0-D leaves merge, a NaN in an input is refused naming the model
and path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.merging import adamerging
from cljax.merging import consensus
from cljax.merging import emr
from cljax.merging import iso
from cljax.merging import model_stock
from cljax.merging import regmean
from cljax.merging import slerp
from cljax.merging import sparsify
from cljax.merging import tsv
from cljax.merging import wudi


def _apply(params, x):
  return x @ params['dense']['kernel'] + params['dense']['bias']


def _regmean(b, m, exclude):
  grams = [{'dense/kernel': jnp.eye(6) * (i + 1)} for i in range(len(m))]
  return regmean.regmean(b, m, grams=grams, alpha=0.9, exclude=exclude)


METHODS = {
    'slerp': lambda b, m, e: slerp.slerp(b, m[:1], t=0.4, exclude=e),
    'nuslerp': lambda b, m, e: slerp.nuslerp(b, m[:2], exclude=e),
    'multislerp': lambda b, m, e: slerp.multislerp(b, m, exclude=e),
    'model_stock': lambda b, m, e: model_stock.model_stock(b, m, exclude=e),
    'breadcrumbs': lambda b, m, e: sparsify.breadcrumbs(b, m, density=0.5, scaling=0.5,
                                                        exclude=e),
    'della': lambda b, m, e: sparsify.della(b, m, key=jax.random.key(0), density=0.5,
                                            epsilon=0.1, scaling=0.5, exclude=e),
    'tsv': lambda b, m, e: tsv.tsv(b, m, exclude=e),
    'iso_c': lambda b, m, e: iso.iso_c(b, m, exclude=e),
    'iso_cts': lambda b, m, e: iso.iso_cts(b, m, exclude=e),
    'consensus': lambda b, m, e: consensus.consensus(b, m, scaling=0.5, lambdas=0.4, exclude=e),
    'emr_task0': lambda b, m, e: emr.emr_task_model(b, emr.emr(b, m, exclude=e), 0),
    'wudi': lambda b, m, e: wudi.wudi(b, m, num_steps=2, exclude=e),
    'regmean': _regmean,
    'adamerging': lambda b, m, e: adamerging.adamerging(
        b, m, apply_fn=_apply, test_inputs=[jnp.ones((2, 6), b['dense']['kernel'].dtype)] * len(m),
        num_steps=2, exclude=e),
}


def _models(dtype=jnp.float32, n=3):
  rng = np.random.default_rng(0)
  tree = lambda: {'dense': {'kernel': rng.normal(size=(6, 4)), 'bias': rng.normal(size=4)},
                  'scale': rng.normal(), 'head': {'kernel': rng.normal(size=(4, 2))}}
  base = jax.tree.map(lambda x: jnp.asarray(x, dtype), tree())
  models = [jax.tree.map(lambda b, d: (b + jnp.asarray(d, dtype)).astype(dtype), base, tree())
            for _ in range(n)]
  return base, models


@pytest.mark.parametrize('name', sorted(METHODS))
def test_exclude_keeps_base_and_bf16_round_trips(name):
  base, models = _models(jnp.bfloat16)
  out = METHODS[name](base, models, 'head/.*')
  np.testing.assert_array_equal(np.asarray(out['head']['kernel'], np.float32),
                                np.asarray(base['head']['kernel'], np.float32))
  for leaf, ref in zip(jax.tree.leaves(out), jax.tree.leaves(base)):
    assert leaf.dtype == ref.dtype and leaf.shape == ref.shape
    assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))
  # The merged leaves moved away from the base (the method did something).
  assert not np.array_equal(np.asarray(out['dense']['kernel'], np.float32),
                            np.asarray(base['dense']['kernel'], np.float32))


@pytest.mark.parametrize('name', sorted(METHODS))
def test_nan_input_is_named(name):
  base, models = _models()
  models[0] = jax.tree.map(lambda x: x, models[0])
  models[0]['dense']['bias'] = models[0]['dense']['bias'].at[1].set(jnp.nan)
  with pytest.raises(ValueError, match=r"finetuned\[0\].*'dense'.*'bias'"):
    METHODS[name](base, models, None)


# Every merge also runs under an outer jax.jit (checks of values are skipped there, as in
# cljax.merging.static) and gives the eager result.
@pytest.mark.parametrize('name', sorted(METHODS))
def test_runs_under_jit_with_the_same_result(name):
  base, models = _models()
  eager = METHODS[name](base, models, 'head/.*')
  jitted = jax.jit(lambda b, m: METHODS[name](b, m, 'head/.*'))(base, models)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
