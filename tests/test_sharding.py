"""Data-parallel and rule-sharded training on 8 simulated CPU devices (in a subprocess, since
XLA_FLAGS must be set before JAX starts), plus mesh/rule/batch errors in this process."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from cljax import sharding
from cljax import tree as tree_lib
from conftest import ROOT

_SCRIPT = textwrap.dedent('''
    import jax, numpy as np, optax
    assert len(jax.devices()) == 8, jax.devices()
    from cljax import continual, models, sharding, training
    from cljax.data import sources, streams
    from cljax.methods import projection, regularizers

    ds = sources.subsample(sources.digits(), max_train=400, max_test=200)
    stream = streams.permuted(ds, num_tasks=2, seed=0)
    module = models.make_model('mlp', num_outputs=10, hidden=(32, 32))
    apply_fn = models.linen_apply_fn(module)
    params0 = models.init_params(module, jax.random.key(0), stream.input_shape)
    method = regularizers.ewc(strength=10.0, num_samples=64)

    def run(mesh, rules=(), method=method):
      r = continual.run_stream(apply_fn, params0, method, optax.sgd(0.05), stream, epochs=2,
                               batch_size=40, seed=0, mesh=mesh, param_rules=rules)
      return r.state.params, r.accuracy_matrix

    p1, r1 = run(sharding.make_mesh(1))
    p8, r8 = run(sharding.make_mesh(8))
    leaf = jax.tree.leaves(p8)[0]
    assert len(leaf.sharding.device_set) == 8, leaf.sharding
    np.testing.assert_allclose(r8, r1, atol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)

    # FSDP-style: the hidden kernels split over a 4-way model axis, batch over 2-way data.
    mesh = sharding.make_mesh(8, model=4)
    rules = [('dense[01]/kernel', (None, 'model'))]
    p4, r4 = run(mesh, rules)
    spec = p4['dense0']['kernel'].sharding.spec
    assert tuple(spec) == (None, 'model'), spec
    shard_shape = p4['dense0']['kernel'].addressable_shards[0].data.shape
    assert shard_shape == (64, 8), shard_shape
    np.testing.assert_allclose(r4, r1, atol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)

    # GPM projecting inside the backward pass, with the first layer's inputs projected once per
    # task (Batch.aux['projected_inputs'] travels with the sharded batches).
    gpm = projection.gpm(threshold=0.97, num_samples=64)
    g1, q1 = run(sharding.make_mesh(1), method=gpm)
    g8, q8 = run(sharding.make_mesh(8), method=gpm)
    g4, q4 = run(sharding.make_mesh(8, model=4), rules, method=gpm)
    for q, g in ((q8, g8), (q4, g4)):
      np.testing.assert_allclose(q, q1, atol=1e-5)
      for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)

    # The global batch is split as expected: 40 rows over 8 devices = 5 each.
    x = sharding.shard_batch(sharding.make_mesh(8), np.arange(40 * 3).reshape(40, 3), axis=0)
    assert sorted(s.data.shape for s in x.addressable_shards) == [(5, 3)] * 8

    # Merges of leaves sharded over the 8 devices equal the unsharded merges.
    from jax.sharding import NamedSharding, PartitionSpec as P
    from cljax import merging
    rng = np.random.default_rng(0)
    shapes = {'a': {'kernel': (64, 24)}, 'b': {'kernel': (32, 16), 'bias': (16,)}}
    make = lambda: jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                                is_leaf=lambda s: isinstance(s, tuple))
    base, models_ = make(), [make() for _ in range(4)]
    mesh = sharding.make_mesh(8)
    split = lambda t: jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, P('data') if x.shape[0] % 8 == 0 else P())), t)
    for merge in (lambda b, f: merging.task_arithmetic(b, f, scaling=0.3),
                  lambda b, f: merging.ties(b, f, density=0.3, scaling=1.0)):
      want, got = merge(base, models_), merge(split(base), [split(m) for m in models_])
      for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
    cm = merging.opcm(alpha=0.5)
    s1, s8 = cm.init(base), cm.init(split(base))
    for m in models_:
      s1, s8 = cm.update(s1, m), cm.update(s8, split(m))
    for w, g in zip(jax.tree.leaves(cm.params(s1)), jax.tree.leaves(cm.params(s8))):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4)
    print('MULTIDEVICE OK')
''')


def test_one_and_eight_devices_agree():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, '-c', _SCRIPT], env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0 and 'MULTIDEVICE OK' in proc.stdout, proc.stderr[-4000:]


def test_path_str_and_rules_errors():
  params = {'dense0': {'kernel': np.zeros((4, 6)), 'bias': np.zeros(6)}, 'head': {'kernel': np.zeros((6, 3))}}
  assert tree_lib.leaf_paths(params) == ['dense0/bias', 'dense0/kernel', 'head/kernel']
  mesh = sharding.make_mesh(1)
  shardings = sharding.param_shardings(params, mesh, [('dense0/kernel', (None, 'model'))])
  assert tuple(shardings['dense0']['kernel'].spec) == (None, 'model')
  assert tuple(shardings['head']['kernel'].spec) == ()
  with pytest.raises(ValueError, match=r"sharding_rules='conv.\*' matches no parameter"):
    sharding.param_shardings(params, mesh, [('conv.*', (None, 'model'))])
  with pytest.raises(ValueError, match=r"'dense0/bias' has 1 entries|for 'dense0/bias'"):
    sharding.param_shardings(params, mesh, [('dense0/bias', (None, 'model'))])


def test_mesh_errors():
  n = len(jax.devices())
  with pytest.raises(ValueError, match='device'):
    sharding.make_mesh(n + 1)
  with pytest.raises(ValueError, match='model axis size'):
    sharding.make_mesh(1, model=2)
