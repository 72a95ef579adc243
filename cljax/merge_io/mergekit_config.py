"""The merge configuration of `cljax-merge`: mergekit's common YAML subset, checked strictly.

A mergekit user can bring an existing file::

  merge_method: ties            # linear, task_arithmetic, ties, dare_ties, dare_linear, or cljax's
                                # magmax, continual_average, continual_task_arithmetic,
                                # continual_ties, opcm
  base_model: ./Llama-3-8B
  models:
    - model: ./Llama-3-8B       # the base may be listed (no parameters): it is skipped
    - model: ./llama-math
      parameters: {weight: 1.0, density: 0.5}
    - model: ./llama-code
      parameters: {weight: 1.0, density: 0.5}
  parameters: {lambda: 1.0, normalize: true}
  dtype: bfloat16

Accepted keys. Top level: ``merge_method``, ``base_model``, ``models``, ``parameters``, ``dtype``,
``out_dtype``, ``tokenizer_source: base`` (what cljax-merge does anyway) and cljax's ``exclude``
(regexes over tensor names, `re.fullmatch`; those tensors keep the base's values). Per model:
``model`` (a local Hugging Face folder, .safetensors file or Orbax checkpoint folder) and
``parameters`` with ``weight`` and ``density`` (each model may have its own, for TIES and DARE
alike). Global ``parameters``: ``lambda``, ``normalize``, ``weight`` and ``density`` (defaults
for every model, as in mergekit), ``int8_mask`` (a mergekit memory option; ignored), ``rescale``
(DARE: true, the default, divides the kept entries by the density, as the paper; ``l1`` scales
each model's dropped tensor back to the L1 norm of its task vector, as mergekit's current
``rescale``; false keeps them as they are; TIES: must stay false) and cljax's ``trim`` (``per_tensor`` as mergekit, or ``global`` as the
TIES paper), ``selection`` (TIES: ``exact``, mergekit's int(density * n) entries per tensor, the
default with per_tensor, or ``threshold``, the paper's round(density * n)-th magnitude with its
ties), ``reduce`` (continual_ties) and ``alpha`` (opcm).

Anything else is an error naming the key: mergekit's ``slices``/``modules``, gradients or filtered
lists as parameter values, methods cljax does not implement (slerp, della, ...), unknown keys.
A parameter mergekit would silently ignore for the chosen method (e.g. ``density`` with
``linear``) is ignored with a warning; for cljax's own methods an unused parameter is an error.

Defaults follow mergekit: ``weight`` 1 (mergekit requires it), ``density`` 1, ``lambda`` 1,
``normalize`` true for linear and ties, false for task_arithmetic, dare_ties and dare_linear,
``rescale`` true for DARE.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from typing import Any, Mapping, NamedTuple, Optional

import yaml

METHODS = ('linear', 'task_arithmetic', 'ties', 'dare_ties', 'dare_linear', 'magmax',
           'continual_average', 'continual_task_arithmetic', 'continual_ties', 'opcm')
MERGEKIT_METHODS = METHODS[:5]
CONTINUAL_METHODS = METHODS[6:]
DTYPES = ('float32', 'bfloat16', 'float16')
TRIM_MODES = ('per_tensor', 'global')
_MERGEKIT_ONLY_METHODS = ('slerp', 'nuslerp', 'multislerp', 'karcher', 'della', 'della_linear',
                          'breadcrumbs', 'breadcrumbs_ties', 'sce', 'ram', 'ramplus_tl',
                          'model_stock', 'nearswap', 'arcee_fusion', 'passthrough')
_TOP_KEYS = ('merge_method', 'base_model', 'models', 'parameters', 'dtype', 'out_dtype',
             'tokenizer_source', 'exclude')
_UNSUPPORTED_TOP_KEYS = {
    'slices': 'layer slices are not supported; cljax-merge merges whole models (use models:)',
    'modules': 'per-module configs are not supported; use models:',
    'tokenizer': 'tokenizer surgery is not supported; the base model\'s tokenizer is copied',
    'chat_template': 'chat templates are copied from the base model; setting one is not supported',
}
_MODEL_PARAMS = ('weight', 'density')
_GLOBAL_PARAMS = ('lambda', 'normalize', 'weight', 'density', 'int8_mask', 'rescale', 'trim',
                  'selection', 'reduce', 'alpha')
SELECTIONS = ('exact', 'threshold')
# The parameters each method reads (int8_mask is accepted everywhere and has no effect).
_USES = {
    'linear': {'weight', 'normalize'},
    'task_arithmetic': {'weight', 'normalize', 'lambda'},
    'ties': {'weight', 'density', 'normalize', 'lambda', 'trim', 'selection', 'rescale'},
    'dare_ties': {'weight', 'density', 'normalize', 'lambda', 'rescale'},
    'dare_linear': {'weight', 'density', 'normalize', 'lambda', 'rescale'},
    'magmax': {'lambda'},
    'continual_average': set(),
    'continual_task_arithmetic': {'lambda'},
    'continual_ties': {'lambda', 'density', 'trim', 'reduce'},
    'opcm': {'alpha'},
}
_NORMALIZE_DEFAULT = {'linear': True, 'ties': True}

_log = logging.getLogger(__name__)


class ModelSpec(NamedTuple):
  """One model to merge.

  Attributes:
    path: local Hugging Face folder, .safetensors file or Orbax checkpoint folder (as written in
      the config; relative paths are relative to the working directory, as in mergekit).
    weight: mergekit's per-model ``weight``.
    density: mergekit's per-model ``density`` (fraction kept by TIES's trim or DARE's drop).
    key: where it came from in the config, e.g. ``'models[2]'`` (for errors).
  """

  path: str
  weight: float = 1.0
  density: float = 1.0
  key: str = 'models[?]'


class MergeConfig(NamedTuple):
  """A checked merge configuration (see the module docstring for the YAML it comes from).

  Attributes:
    method: one of `METHODS`.
    base_model: the checkpoint task vectors are taken against, whose config and tokenizer files are
      copied; for ``linear`` without a base model, the first model.
    models: the `ModelSpec` s merged, in order (for task-vector methods the base is not among
      them; for ``linear`` a listed base is averaged like any model).
    scaling: mergekit's ``lambda``, applied to the merged task vector.
    normalize: mergekit's ``normalize``.
    trim: TIES trim ranking, 'per_tensor' (mergekit) or 'global' (the TIES paper).
    selection: TIES's kept entries per model, None for the default of the trim: 'exact' (the
      default with per_tensor, mergekit's
      ``sparsify.magnitude``: exactly int(density * n) per tensor, ties at the threshold kept
      in row-major order) or 'threshold' (the paper and `static.ties`: the round(density * n)-th
      largest magnitude and every entry tied with it; the only choice with trim: global).
    reduce: continual_ties's disjoint 'sum' or 'mean'.
    alpha: OPCM's protected share of singular-value mass.
    dtype: output dtype of floating tensors ('float32', 'bfloat16', 'float16'), or None to keep
      each tensor's dtype in the base model.
    exclude: regexes over tensor names whose tensors keep the base's values.
    rescale: DARE: True divides the entries it keeps by their model's density (Yu et al.
      2024); 'l1' scales each model's dropped task vector, per tensor, back to its L1 norm
      (mergekit's current ``rescale``: ``sparsify.rescaled_masked_tensor`` with
      ``RescaleNorm.l1``); False keeps them unscaled.
  """

  method: str
  base_model: str
  models: tuple
  scaling: float = 1.0
  normalize: bool = False
  trim: str = 'per_tensor'
  selection: Optional[str] = None
  reduce: str = 'sum'
  alpha: float = 0.5
  dtype: Optional[str] = None
  exclude: tuple = ()
  rescale: bool = True


def _error(source: str, key: str, message: str) -> ValueError:
  return ValueError(f'{source}: {key}: {message}')


def _number(value: Any, source: str, key: str) -> float:
  if isinstance(value, (list, tuple, dict)):
    raise _error(source, key, 'gradients and filtered values (lists) are not supported; give a '
                 f'single number (got {value!r})')
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise _error(source, key, f'must be a finite number; got {value!r}')
  return float(value)


def _flag(value: Any, source: str, key: str) -> bool:
  if not isinstance(value, bool):
    raise _error(source, key, f'must be true or false; got {value!r}')
  return value


def _choice(value: Any, choices: tuple, source: str, key: str) -> str:
  if value not in choices:
    raise _error(source, key, f'must be one of {", ".join(choices)}; got {value!r}')
  return value


def _mapping(value: Any, source: str, key: str) -> Mapping:
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    raise _error(source, key, f'must be a mapping; got {value!r}')
  return value


def _same_path(a: str, b: str) -> bool:
  return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


def _model_path(value: Any, source: str, key: str) -> str:
  if not isinstance(value, str) or not value:
    raise _error(source, key, 'must be a path (a local folder, .safetensors file or Orbax '
                 'checkpoint folder); LoRA references and model mappings are not supported '
                 f'(got {value!r})')
  return value


def _parse_models(raw: Any, defaults: Mapping, method: str, source: str) -> list:
  """[(ModelSpec, explicitly set parameter names)] of the ``models:`` list."""
  if not isinstance(raw, list) or not raw:
    raise _error(source, 'models', 'must be a non-empty list of {model: ..., parameters: ...}')
  specs = []
  for i, item in enumerate(raw):
    key = f'models[{i}]'
    if isinstance(item, str):
      item = {'model': item}
    item = _mapping(item, source, key)
    for k in item:
      if k not in ('model', 'parameters'):
        raise _error(source, f'{key}.{k}', 'unknown key (a model entry has model and parameters)')
    if 'model' not in item:
      raise _error(source, f'{key}.model', 'missing')
    path = _model_path(item['model'], source, f'{key}.model')
    params = _mapping(item.get('parameters'), source, f'{key}.parameters')
    values = dict(defaults)
    for k, v in params.items():
      if k not in _MODEL_PARAMS:
        raise _error(source, f'{key}.parameters.{k}',
                     f'unsupported per-model parameter (supported: {", ".join(_MODEL_PARAMS)})')
      values[k] = _number(v, source, f'{key}.parameters.{k}')
    density = values.get('density', 1.0)
    if not 0.0 <= density <= 1.0:
      raise _error(source, f'{key}.parameters.density', f'must lie in [0, 1]; got {density}')
    specs.append((ModelSpec(path, values.get('weight', 1.0), density, key), set(params)))
  return specs


def _check_used(method: str, given: Mapping, source: str) -> None:
  """Warns (mergekit methods) or raises (cljax methods) for parameters the method ignores."""
  for key, value in given.items():
    name = key.rsplit('.', 1)[-1]
    if name == 'int8_mask' or name in _USES[method]:
      continue
    if name == 'weight' and value == 1.0 or name == 'density' and value == 1.0:
      continue
    if method in MERGEKIT_METHODS:
      _log.warning('%s: %s is not used by merge_method %s (ignored, as mergekit does)', source,
                   key, method)
    else:
      raise _error(source, key, f'not used by merge_method {method}')


def _global_parameters(raw: Any, method: str, source: str) -> tuple:
  """(model defaults, method settings, {key: value} given) of the global ``parameters:``."""
  params = _mapping(raw, source, 'parameters')
  defaults, settings, given = {}, {}, {}
  for k, v in params.items():
    key = f'parameters.{k}'
    if k not in _GLOBAL_PARAMS:
      raise _error(source, key, f'unsupported parameter (supported: {", ".join(_GLOBAL_PARAMS)})')
    if k in ('weight', 'density'):
      defaults[k] = _number(v, source, key)
      given[key] = defaults[k]
    elif k == 'rescale' and v == 'l1':
      settings[k] = given[key] = 'l1'
    elif k in ('normalize', 'int8_mask', 'rescale'):
      settings[k] = given[key] = _flag(v, source, key)
    elif k == 'trim':
      settings[k] = given[key] = _choice(v, TRIM_MODES, source, key)
    elif k == 'selection':
      settings[k] = given[key] = _choice(v, SELECTIONS, source, key)
    elif k == 'reduce':
      settings[k] = given[key] = _choice(v, ('sum', 'mean'), source, key)
    else:   # lambda, alpha
      settings[k] = given[key] = _number(v, source, key)
  if 'alpha' in settings and not 0.0 < settings['alpha'] <= 1.0:
    raise _error(source, 'parameters.alpha', f'must lie in (0, 1]; got {settings["alpha"]}')
  if settings.get('rescale') == 'l1' and method not in ('dare_ties', 'dare_linear'):
    raise _error(source, 'parameters.rescale', f'l1 applies to dare_ties and dare_linear only; '
                 f'got merge_method {method}')
  if settings.get('rescale') is True and method == 'ties':
    raise _error(source, 'parameters.rescale', 'true is not supported for ties (mergekit\'s '
                 'L1 rescaling after the magnitude trim)')
  if settings.get('selection') == 'exact' and settings.get('trim') == 'global':
    raise _error(source, 'parameters.selection', 'exact (mergekit\'s per-tensor top k) needs '
                 'trim: per_tensor; trim: global ranks as the paper (selection: threshold)')
  if settings.get('trim') == 'global' and method == 'continual_ties':
    raise _error(source, 'parameters.trim', 'continual_ties out of core supports per_tensor only '
                 '(a global trim of the running merge needs the whole model at every step)')
  return defaults, settings, given


def _dtype(raw: Mapping, source: str) -> Optional[str]:
  value = raw.get('out_dtype', raw.get('dtype'))
  if value is None:
    return None
  key = 'out_dtype' if 'out_dtype' in raw else 'dtype'
  return _choice(value, DTYPES, source, key)


def _exclude(value: Any, source: str) -> tuple:
  if value is None:
    return ()
  patterns = [value] if isinstance(value, str) else value
  if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
    raise _error(source, 'exclude', f'must be a regex or a list of regexes; got {value!r}')
  return tuple(patterns)


def parse_config(raw: Any, *, source: str = '<config>') -> MergeConfig:
  """Checks a mergekit-style config mapping (e.g. parsed YAML) and returns a `MergeConfig`.

  Args:
    raw: the mapping.
    source: how to name the config in errors (e.g. its file name).

  Returns:
    A `MergeConfig`.

  Raises:
    ValueError: naming the offending key: unknown or unsupported keys, methods or parameter
      values, gradients/filters, a missing base model for a task-vector method, no model left to
      merge, weights summing to 0 under ``normalize`` (linear, task_arithmetic, dare_linear),
      ``rescale: true`` for ties (see the README's "Differences from mergekit").
  """
  raw = _mapping(raw, source, '<top level>')
  for k in raw:
    if k in _UNSUPPORTED_TOP_KEYS:
      raise _error(source, k, _UNSUPPORTED_TOP_KEYS[k])
    if k not in _TOP_KEYS:
      raise _error(source, k, f'unknown key (supported: {", ".join(_TOP_KEYS)})')
  method = raw.get('merge_method')
  if method in _MERGEKIT_ONLY_METHODS:
    raise _error(source, 'merge_method', f'{method!r} is not supported by cljax-merge '
                 f'(supported: {", ".join(METHODS)})')
  method = _choice(method, METHODS, source, 'merge_method')
  if raw.get('tokenizer_source') not in (None, 'base'):
    raise _error(source, 'tokenizer_source', 'only "base" is supported (the base model\'s '
                 f'tokenizer files are copied); got {raw["tokenizer_source"]!r}')
  defaults, settings, given = _global_parameters(raw.get('parameters'), method, source)
  entries = _parse_models(raw.get('models'), defaults, method, source)
  base = raw.get('base_model')
  if base is not None:
    base = _model_path(base, source, 'base_model')
  if method != 'linear':
    if base is None:
      raise _error(source, 'base_model', f'required by merge_method {method} (task vectors are '
                   'taken against it)')
    entries = [(m, keys) for m, keys in entries if not _same_path(m.path, base)]
    if not entries:
      raise _error(source, 'models', 'lists only the base model; nothing to merge')
  for m, keys in entries:
    given.update({f'{m.key}.parameters.{k}': getattr(m, k) for k in keys})
  _check_used(method, given, source)
  models = tuple(m for m, _ in entries)
  normalize = settings.get('normalize', _NORMALIZE_DEFAULT.get(method, False))
  if normalize and method in ('linear', 'task_arithmetic', 'dare_linear') and \
      abs(sum(m.weight for m in models)) < 1e-8:
    raise _error(source, 'parameters.normalize', 'the models\' weights sum to 0, so they cannot '
                 'be normalized')
  return MergeConfig(
      method=method, base_model=base if base is not None else models[0].path, models=models,
      scaling=settings.get('lambda', 1.0), normalize=normalize,
      trim=settings.get('trim', 'per_tensor'),
      selection=settings.get('selection'),
      reduce=settings.get('reduce', 'sum'),
      alpha=settings.get('alpha', 0.5), dtype=_dtype(raw, source),
      exclude=_exclude(raw.get('exclude'), source), rescale=settings.get('rescale', True))


def load_config(path: str) -> MergeConfig:
  """Reads and checks a YAML merge config (see `parse_config`).

  Raises:
    FileNotFoundError: no such file.
    ValueError: invalid YAML or config, naming the file and the key.
  """
  with open(path) as f:
    text = f.read()
  try:
    raw = yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise ValueError(f'{path}: not valid YAML: {e}') from e
  if raw is None:
    raise ValueError(f'{path}: empty config')
  return parse_config(raw, source=path)
