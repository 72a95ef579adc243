"""Tests for cljax.merge_io.mergekit_config and the library calls cljax.merge_io.recipes picks."""

from __future__ import annotations

import logging
import textwrap

import pytest

from cljax.merge_io import mergekit_config
from cljax.merge_io import recipes

parse = mergekit_config.parse_config

TIES = {
    'merge_method': 'ties',
    'base_model': 'base',
    'models': [{'model': 'base'},
               {'model': 'math', 'parameters': {'weight': 0.5, 'density': 0.3}},
               {'model': 'code', 'parameters': {'weight': 0.5}}],
    'parameters': {'lambda': 0.8, 'density': 0.7, 'int8_mask': True},
    'dtype': 'bfloat16',
}


def test_mergekit_ties_file(tmp_path):
  (tmp_path / 'merge.yml').write_text(textwrap.dedent("""\
      models:
        - model: base
          # no parameters necessary for base model
        - model: math
          parameters:
            weight: 0.5
            density: 0.3
        - model: code
          parameters:
            weight: 0.5
      merge_method: ties
      base_model: base
      parameters:
        lambda: 0.8
        density: 0.7
        int8_mask: true
      dtype: bfloat16
      """))
  config = mergekit_config.load_config(str(tmp_path / 'merge.yml'))
  assert config == parse(TIES)
  assert config.method == 'ties' and config.base_model == 'base'
  assert config.models == (mergekit_config.ModelSpec('math', 0.5, 0.3, 'models[1]'),  # no base
                           mergekit_config.ModelSpec('code', 0.5, 0.7, 'models[2]'))  # density:
                                                                                     # global
  assert (config.scaling, config.normalize, config.trim, config.dtype) == (
      0.8, True, 'per_tensor', 'bfloat16')


@pytest.mark.parametrize('method,normalize', [('linear', True), ('task_arithmetic', False),
                                              ('ties', True), ('dare_ties', False),
                                              ('dare_linear', False)])
def test_normalize_defaults_follow_mergekit(method, normalize):
  raw = {'merge_method': method, 'base_model': 'b', 'models': ['m1', 'm2']}
  assert parse(raw).normalize is normalize
  raw['parameters'] = {'normalize': not normalize}
  assert parse(raw).normalize is (not normalize)


def test_linear_without_base_averages_the_listed_models():
  config = parse({'merge_method': 'linear', 'models': [
      {'model': 'a', 'parameters': {'weight': 1}}, {'model': 'b', 'parameters': {'weight': 3}}],
      'out_dtype': 'float16', 'dtype': 'float32', 'exclude': 'lm_head\\..*'})
  assert config.base_model == 'a'
  assert [m.path for m in config.models] == ['a', 'b']
  assert config.dtype == 'float16' and config.exclude == ('lm_head\\..*',)


@pytest.mark.parametrize('edit,match', [
    (lambda r: r.update(slices=[]), 'slices: layer slices are not supported'),
    (lambda r: r.update(foo=1), 'foo: unknown key'),
    (lambda r: r.update(merge_method='slerp'), "merge_method: 'slerp' is not supported"),
    (lambda r: r.update(merge_method='karate'), 'merge_method: must be one of'),
    (lambda r: r.pop('base_model'), 'base_model: required by merge_method ties'),
    (lambda r: r.update(models=[{'model': 'base'}]), 'models: lists only the base model'),
    (lambda r: r.update(models=[]), 'models: must be a non-empty list'),
    (lambda r: r['models'][1]['parameters'].update(weight=[0, 0.5, 1]),
     r'models\[1\]\.parameters\.weight: gradients and filtered values'),
    (lambda r: r['models'][2]['parameters'].update(density=[{'filter': 'mlp', 'value': 0.5}]),
     r'models\[2\]\.parameters\.density: gradients'),
    (lambda r: r['models'][1]['parameters'].update(gamma=0.01),
     r'models\[1\]\.parameters\.gamma: unsupported per-model parameter'),
    (lambda r: r['models'][1]['parameters'].update(density=1.5),
     r'models\[1\]\.parameters\.density: must lie in \[0, 1\]'),
    (lambda r: r['models'][1].update(layer_range=[0, 4]), r'models\[1\]\.layer_range: unknown'),
    (lambda r: r['models'][1].update(model={'lora': 'x'}), r'models\[1\]\.model: must be a path'),
    (lambda r: r['parameters'].update(epsilon=0.1), 'parameters.epsilon: unsupported'),
    (lambda r: r['parameters'].update(normalize='yes'), 'parameters.normalize: must be true or'),
    (lambda r: r['parameters'].update(trim='both'), 'parameters.trim: must be one of'),
    (lambda r: r['parameters'].update(rescale=True), 'parameters.rescale: true is not supported'),
    (lambda r: r['parameters'].update(**{'lambda': float('nan')}), 'lambda: must be a finite'),
    (lambda r: r.update(dtype='int8'), 'dtype: must be one of float32, bfloat16, float16'),
    (lambda r: r.update(tokenizer_source='union'), 'tokenizer_source: only "base"'),
    (lambda r: r.update(exclude=[3]), 'exclude: must be a regex or a list'),
])
def test_errors_name_the_key(edit, match):
  raw = {k: v for k, v in TIES.items()}
  raw['models'] = [dict(m, parameters=dict(m.get('parameters', {}))) for m in TIES['models']]
  raw['parameters'] = dict(TIES['parameters'])
  edit(raw)
  with pytest.raises(ValueError, match=match):
    parse(raw, source='merge.yml')


@pytest.mark.parametrize('method', ['dare_ties', 'dare_linear'])
def test_dare_rescale_is_read(method):
  raw = {'merge_method': method, 'base_model': 'b', 'models': ['m']}
  assert parse(raw).rescale is True   # mergekit's default for DARE
  raw['parameters'] = {'rescale': False}
  assert parse(raw).rescale is False


def test_cljax_methods_unused_parameters_are_errors():
  with pytest.raises(ValueError, match=r'models\[0\]\.parameters\.density: not used by merge_'
                                       r'method magmax'):
    parse({'merge_method': 'magmax', 'base_model': 'b',
           'models': [{'model': 'm', 'parameters': {'density': 0.5}}]})
  with pytest.raises(ValueError, match='parameters.trim: continual_ties out of core supports'):
    parse({'merge_method': 'continual_ties', 'base_model': 'b', 'models': ['m'],
           'parameters': {'trim': 'global'}})


def test_parameters_mergekit_ignores_warn(caplog):
  raw = {'merge_method': 'linear', 'models': [
      {'model': 'a', 'parameters': {'weight': 0.5, 'density': 0.5}}, 'b']}
  with caplog.at_level(logging.WARNING, logger='cljax'):
    config = parse(raw, source='x.yml')
  assert 'x.yml: models[0].parameters.density is not used by merge_method linear' in caplog.text
  assert config.models[0] == mergekit_config.ModelSpec('a', 0.5, 0.5, 'models[0]')


def test_yaml_file_errors(tmp_path):
  (tmp_path / 'bad.yml').write_text('merge_method: [ties\n')
  with pytest.raises(ValueError, match='bad.yml: not valid YAML'):
    mergekit_config.load_config(str(tmp_path / 'bad.yml'))
  (tmp_path / 'empty.yml').write_text('')
  with pytest.raises(ValueError, match='empty.yml: empty config'):
    mergekit_config.load_config(str(tmp_path / 'empty.yml'))
  (tmp_path / 'list.yml').write_text('- a\n- b\n')
  with pytest.raises(ValueError, match='must be a mapping'):
    mergekit_config.load_config(str(tmp_path / 'list.yml'))


# ------------------------------------------------------------------------------------------
# Which library call a config resolves to
# ------------------------------------------------------------------------------------------


def _config(method, weights, densities=None, **params):
  models = [{'model': f'm{i}', 'parameters': {'weight': w, 'density': d}}
            for i, (w, d) in enumerate(zip(weights, densities or [1.0] * len(weights)))]
  return parse({'merge_method': method, 'base_model': 'b', 'models': models,
                'parameters': params})


@pytest.mark.parametrize('config,description', [
    (_config('linear', [2, 2]), 'static.average'),
    (_config('task_arithmetic', [0.5, 0.5], **{'lambda': 0.8}),
     'static.task_arithmetic(scaling=0.4)'),
    (_config('task_arithmetic', [1, 1, 2], normalize=True), 'base + 1 * sum_i c_i tau_i, c = '
                                                            '[0.25, 0.25, 0.5]'),
    (_config('dare_linear', [1, 1], [0.3, 0.3], normalize=True),
     "static.dare(drop_rate=0.7, merge='task_arithmetic', scaling=0.5)"),
    (_config('dare_ties', [0.4, 0.4], [0.5, 0.5], normalize=True),
     "static.dare(drop_rate=0.5, merge='ties', scaling=1)"),
    (_config('dare_ties', [0.4, 0.3], [0.5, 0.5]),
     'static.dare_task_vectors(drop_rate=0.5), disjoint sum, weighted, scaling 1'),
    (_config('ties', [0.5, 0.5], [0.2, 0.4], **{'lambda': 2.0, 'normalize': False}),
     "TIES: per_tensor trim (densities [0.2, 0.4], exactly int(density n) kept), "
     "static.ties_task_vectors(reduce='sum'), scaling 1"),
    (_config('ties', [0.5, 0.5], [0.2, 0.4], selection='threshold', **{'normalize': False}),
     "TIES: per_tensor trim (densities [0.2, 0.4], round(density n)-th magnitude and its ties "
     "kept), static.ties_task_vectors(reduce='sum'), scaling 0.5"),
    (_config('magmax', [1, 1]), 'static.magmax(scaling=1)'),
])
def test_recipe_resolution(config, description):
  assert recipes.make_recipe(config).description == description


@pytest.mark.parametrize('config,description', [
    (parse(dict(TIES, models=[{'model': 'base'}, {'model': 'a', 'parameters': {'weight': 1.0}},
                              {'model': 'c', 'parameters': {'weight': 2.0}}])),
     'TIES: per_tensor trim (densities [0.7, 0.7], exactly int(density n) kept), weighted '
     'disjoint mean (sum_i w_i tau_i / '
     'sum_i w_i over agreeing entries, w = [1.0, 2.0]), scaling 0.8'),
    (_config('dare_linear', [1, 1, 1], [0.5, 0.5, 0.75]),
     'DARE drop per model (densities [0.5, 0.5, 0.75], rescaled by 1 / density), sum, scaling 1'),
    (_config('dare_linear', [1, 2], [0.5, 0.5], rescale=False),
     'DARE drop per model (densities [0.5, 0.5], not rescaled), sum, weighted, scaling 1'),
    (_config('dare_ties', [1, 2], [0.5, 0.5], normalize=True),
     'static.dare_task_vectors(drop_rate=0.5), weighted disjoint mean, scaling 1'),
    (_config('dare_ties', [1, 1], [0.5, 0.25], normalize=True),
     'DARE drop per model (densities [0.5, 0.25], rescaled by 1 / density), disjoint mean, '
     'scaling 1'),
])
def test_per_model_values_resolve_to_composed_merges(config, description):
  assert recipes.make_recipe(config).description == description


def test_continual_ties_needs_one_density():
  with pytest.raises(ValueError, match=r'continual_ties uses one density for all models: '
                                       r'models\[1\]\.parameters\.density = 0.7'):
    recipes.make_recipe(_config('continual_ties', [1, 1], [0.5, 0.7]))


def test_ties_selection_defaults_and_errors():
  assert recipes.make_recipe(_config('ties', [1, 1], [0.5, 0.5])).selection == 'exact'
  assert recipes.make_recipe(_config('ties', [1, 1], [0.5, 0.5], trim='global')).selection == \
      'threshold'
  assert recipes.make_recipe(_config('ties', [1, 1], [0.5, 0.5],
                                     selection='threshold')).selection == 'threshold'
  with pytest.raises(ValueError, match=r'parameters\.selection: exact .* needs trim: per_tensor'):
    _config('ties', [1, 1], [0.5, 0.5], trim='global', selection='exact')
  with pytest.raises(ValueError, match=r'parameters\.selection: must be one of exact, threshold'):
    _config('ties', [1, 1], [0.5, 0.5], selection='top')


def test_dare_l1_rescale_is_read_and_refused_elsewhere():
  config = _config('dare_linear', [1, 1], [0.5, 0.25], rescale='l1')
  assert config.rescale == 'l1'
  assert 'rescaled to the L1 norm of tau_i per tensor' in recipes.make_recipe(config).description
  assert recipes.make_recipe(config).l1_sums is not None
  with pytest.raises(ValueError, match=r'parameters\.rescale: l1 applies to dare_ties and '
                                       r'dare_linear only; got merge_method ties'):
    _config('ties', [1, 1], [0.5, 0.5], rescale='l1')
  with pytest.raises(ValueError, match=r'parameters\.rescale: must be true or false'):
    _config('dare_linear', [1, 1], [0.5, 0.5], rescale='l2')
