"""Hugging Face model folders in and out: ``config.json`` + safetensors <-> ``(apply_fn, params)``.

`from_pretrained` reads the architecture from ``config.json`` (``architectures``), builds the
matching Linen module (``ARCHITECTURES``: Qwen3 / Llama causal LMs in `cljax.models.lm`, ViT in
`cljax.models.vit`), checks that the checkpoint holds exactly the tensors that module needs with
the shapes it needs, and reads them into a params pytree (HF ``(out, in)`` Linear weights become
``(in, out)`` kernels, conv weights ``(out, in, kh, kw)`` become ``(kh, kw, in, out)``).
`save_pretrained` is the inverse: the same names and layouts, the dtypes of the checkpoint it was
loaded from, written by cljax's streaming safetensors writer (shards + index as transformers
writes them) next to a copy of that checkpoint's ``config.json``, so
``transformers.AutoModelFor*.from_pretrained`` and ``cljax-merge`` read the result. A model
built in cljax (`cljax.models.make_model`: 'qwen3', 'llama', 'vit') is saved with a
``config.json`` written from its module (``TO_CONFIG``).

A new architecture is a module file with an ``hf_tensors`` name map plus one `Architecture` line.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cljax import tree as tree_lib
from cljax.merge_io import safetensors_reader
from cljax.merge_io import safetensors_writer
from cljax.models import linen
from cljax.models import lm
from cljax.models import vit

CONFIG_NAME = 'config.json'
# Files besides the weights that describe the model or its inputs; copied by `save_pretrained`.
SIDE_FILES = ('generation_config.json', 'preprocessor_config.json', 'tokenizer.json',
              'tokenizer_config.json', 'special_tokens_map.json', 'vocab.json', 'merges.txt',
              'tokenizer.model', 'added_tokens.json', 'chat_template.jinja')


class Architecture(NamedTuple):
  """How to build one HF architecture.

  Attributes:
    build: ``(config_json, source) -> module`` (``source`` is the config file, for errors).
    tensors: ``module -> [(hf_name, path, layout)]`` for every parameter.
    example: ``config_json -> ShapeDtypeStruct`` of a one-example input batch, for
      ``module.init`` under ``eval_shape``.
  """

  build: Callable[[dict, str], nn.Module]
  tensors: Callable[[nn.Module], list]
  example: Callable[[dict], jax.ShapeDtypeStruct]


def _lm(qk_norm: bool) -> Architecture:
  return Architecture(
      build=lambda cfg, src: lm.CausalLM(lm.config_from_hf(cfg, qk_norm=qk_norm, source=src)),
      tensors=lambda module: lm.hf_tensors(module.config),
      example=lambda cfg: jax.ShapeDtypeStruct((1, 1), jnp.int32))


def _vit_example(cfg: dict) -> jax.ShapeDtypeStruct:
  size = int(cfg.get('image_size', 224))
  return jax.ShapeDtypeStruct((1, size, size, int(cfg.get('num_channels', 3))), jnp.float32)


ARCHITECTURES: dict = {
    'Qwen3ForCausalLM': _lm(qk_norm=True),
    'LlamaForCausalLM': _lm(qk_norm=False),
    'ViTForImageClassification': Architecture(
        build=lambda cfg, src: vit.module_from_hf(cfg, source=src),
        tensors=vit.hf_tensors, example=_vit_example),
}


# Module class -> ``(module, params) -> config.json`` dict, for saving models built in cljax.
TO_CONFIG: dict = {
    lm.CausalLM: lambda module, params: lm.config_to_hf(module.config),
    vit.ViTClassifier: vit.config_to_hf,
}


class _Resolved(NamedTuple):
  folder: str
  config: dict
  architecture: str
  module: nn.Module
  tensors: list              # (hf_name, path, layout), in HF module order
  shapes: dict               # hf_name -> the shape the checkpoint must hold
  param_shapes: dict         # '/'-joined cljax path -> the parameter's shape


def _read_config(folder: str) -> dict:
  file = os.path.join(folder, CONFIG_NAME)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'{folder} is not a folder (a Hugging Face model folder with '
                            f'{CONFIG_NAME} and safetensors weights; download Hub models first)')
  try:
    with open(file) as f:
      config = json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{file} does not exist: {folder} is not a Hugging Face model '
                            f'folder') from e
  except ValueError as e:
    raise ValueError(f'{file} is not valid JSON: {e}') from e
  if not isinstance(config, dict):
    raise ValueError(f'{file} does not hold a JSON object')
  return config


def hf_shape(shape: tuple, layout: str) -> tuple:
  """The HF tensor shape of a cljax parameter of ``shape`` stored with ``layout``."""
  if layout == 'linear':
    return tuple(shape[::-1])
  if layout == 'conv':
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  return tuple(shape)


def to_hf(x: np.ndarray, layout: str) -> np.ndarray:
  """A cljax parameter as the HF tensor (``(in, out) -> (out, in)``, conv ``HWIO -> OIHW``)."""
  if layout == 'linear':
    return x.T
  if layout == 'conv':
    return x.transpose(3, 2, 0, 1)
  return x


def from_hf(x: np.ndarray, layout: str) -> np.ndarray:
  """The inverse of `to_hf`."""
  if layout == 'linear':
    return x.T
  if layout == 'conv':
    return x.transpose(2, 3, 1, 0)
  return x


def _build(config: dict, source: str) -> tuple:
  """(architecture name, module) for a parsed ``config.json``."""
  names = config.get('architectures')
  known = [a for a in (names or []) if a in ARCHITECTURES] if isinstance(names, list) else []
  if len(known) != 1:
    raise ValueError(f'{source}: config key `architectures` is {names!r}; cljax loads exactly one '
                     f'of {sorted(ARCHITECTURES)}')
  return known[0], ARCHITECTURES[known[0]].build(config, source)


def _layout(folder: str, config: dict, name: str, module: nn.Module) -> _Resolved:
  """The tensor map and every tensor's shape for a built module."""
  arch = ARCHITECTURES[name]
  example = arch.example(config)
  abstract = jax.eval_shape(lambda k: module.init(k, jnp.zeros(example.shape, example.dtype)),
                            jax.random.key(0))['params']
  leaves = {tuple(tree_lib.key_name(k) for k in p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  tensors = arch.tensors(module)
  mapped = {path for _, path, _ in tensors}
  if mapped != set(leaves) or len(mapped) != len(tensors):   # a bug in an `hf_tensors` map
    raise AssertionError(f'{name}: the HF name map and the module disagree on '
                         f'{sorted(mapped ^ set(leaves))[:3]}')
  shapes = {hf: hf_shape(leaves[path].shape, layout) for hf, path, layout in tensors}
  param_shapes = {'/'.join(p): tuple(leaf.shape) for p, leaf in leaves.items()}
  return _Resolved(folder, config, name, module, tensors, shapes, param_shapes)


def _resolve(folder: str, overrides: dict) -> _Resolved:
  folder = os.path.abspath(os.path.expanduser(folder))
  config = _read_config(folder)
  source = os.path.join(folder, CONFIG_NAME)
  unknown = sorted(set(overrides) - set(config))
  if unknown:
    raise ValueError(f'override(s) {unknown} are not keys of {source} (overrides replace '
                     f'config.json values)')
  config = {**config, **overrides}
  name, module = _build(config, source)
  return _layout(folder, config, name, module)


def _check_checkpoint(r: _Resolved) -> safetensors_reader.Checkpoint:
  """Opens the folder's safetensors and checks its names and shapes against the module."""
  ckpt = safetensors_reader.open_checkpoint(r.folder)
  if isinstance(ckpt, safetensors_reader.OrbaxCheckpoint):
    raise ValueError(f'{r.folder} holds an Orbax checkpoint, not Hugging Face safetensors')
  for name in r.shapes:
    if name not in ckpt.tensors:
      raise ValueError(f'{r.folder}: tensor {name!r} of {r.architecture} is missing from the '
                       f'checkpoint (it holds {len(ckpt.tensors)} tensors, e.g. '
                       f'{next(iter(ckpt.tensors), None)!r})')
  for name, info in ckpt.tensors.items():
    if name not in r.shapes:
      raise ValueError(f'{info.file}: tensor {name!r} is not a parameter of {r.architecture} as '
                       f'configured by {os.path.join(r.folder, CONFIG_NAME)}')
    if tuple(info.shape) != r.shapes[name]:
      raise ValueError(f'{info.file}: tensor {name!r} has shape {tuple(info.shape)}, but '
                       f'{r.architecture} as configured by {CONFIG_NAME} needs '
                       f'{r.shapes[name]}')
    if not safetensors_reader.is_floating(info.dtype):
      raise ValueError(f'{info.file}: tensor {name!r} has dtype {info.dtype}, not a float')
  return ckpt


def _nest(items: list) -> dict:
  tree: dict = {}
  for path, value in items:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def from_pretrained(path: str, *, param_dtype: Optional[Any] = jnp.float32,
                    **overrides: Any) -> tuple:
  """Loads a local Hugging Face model folder as cljax's ``(apply_fn, params)``.

  Args:
    path: a folder with ``config.json`` (whose ``architectures`` names one of
      ``ARCHITECTURES``) and ``model.safetensors`` or shards with
      ``model.safetensors.index.json``.
    param_dtype: dtype of the returned params (float32 by default, the master copy training
      updates); None keeps each tensor's stored dtype.
    **overrides: ``config.json`` values to replace (e.g. ``rms_norm_eps=1e-5``); every key must
      exist in the file.

  Returns:
    ``(apply_fn, params)``: ``apply_fn(params, x, *, train=False, rngs=None)`` takes int token
    ids ``(B, L)`` and returns logits ``(B, L, vocab_size)`` for causal LMs, or NHWC float
    images ``(B, H, W, C)`` and returns ``(B, num_labels)`` for image classifiers. ``params`` is
    a nested dict of arrays (paths in `cljax.models.lm` / `cljax.models.vit`).

  Raises:
    FileNotFoundError: no such folder, or no ``config.json`` in it.
    ValueError: ``architectures`` missing or not exactly one known architecture, an override
      that is not a config key, an unsupported configuration (naming the key), a tensor missing
      from the checkpoint, one the module has no parameter for, one of the wrong shape or a
      non-float dtype (naming the file and tensor).
  """
  r = _resolve(path, overrides)
  ckpt = _check_checkpoint(r)
  items = []
  for name, p, layout in r.tensors:
    value = from_hf(ckpt.read(name), layout)
    if param_dtype is not None:
      value = value.astype(param_dtype)
    items.append((p, jnp.asarray(value)))
  return linen.linen_apply_fn(r.module), _nest(items)


def save_pretrained(path: str, params: Any, *, like: 'str | nn.Module',
                    max_shard_size: 'str | int' = '5GB') -> list:
  """Writes params as a Hugging Face model folder that transformers and cljax-merge read.

  With ``like`` a folder (the one the params were loaded from), tensor names, layouts, dtypes
  and storage order are that checkpoint's (float32 params saved over a bfloat16 checkpoint are
  rounded to bfloat16), and ``config.json`` and the side files (``SIDE_FILES``: generation
  config, tokenizer) are copied unchanged, so overrides given to `from_pretrained` are not
  recorded. With ``like`` a module built in cljax (a `cljax.models.CausalLM` or
  `cljax.models.ViTClassifier`, e.g. from `make_model`), ``config.json`` is written from the
  module (``TO_CONFIG``) and every tensor keeps its params dtype.

  Args:
    path: the output folder; created if missing, and it must not already hold a
      ``config.json`` or safetensors files.
    params: the model's pytree (the paths and shapes `from_pretrained` returns for ``like``).
    like: the Hugging Face folder the params were loaded from, or the module they belong to.
    max_shard_size: bytes or e.g. '5GB'; larger checkpoints are split into
      ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``.

  Returns:
    The list of `cljax.merge_io.safetensors_writer.ShardPlan` written.

  Raises:
    FileExistsError: ``path`` already holds a model.
    ValueError: ``like`` is not loadable (as in `from_pretrained`) or a module with no HF
      architecture, or a parameter path is missing from ``params``, extra, or of the wrong
      shape (naming the pytree path). Nothing is written when any check fails.
  """
  leaves = {tree_lib.path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  if isinstance(like, nn.Module):
    if type(like) not in TO_CONFIG:
      raise ValueError(f'{type(like).__name__} has no Hugging Face architecture; cljax saves '
                       f'{sorted(t.__name__ for t in TO_CONFIG)}')
    config = TO_CONFIG[type(like)](like, params)
    r = _layout('', config, *_build(config, f'the config of {type(like).__name__}'))
    source, ckpt = type(like).__name__, None
  else:
    r = _resolve(like, {})
    source, ckpt = like, _check_checkpoint(r)
  by_path = {'/'.join(p): (name, layout) for name, p, layout in r.tensors}
  for key in by_path:
    if key not in leaves:
      raise ValueError(f'params has no leaf {key!r}, which {r.architecture} ({source}) needs')
  for key, leaf in leaves.items():
    if key not in by_path:
      raise ValueError(f'params leaf {key!r} is not a parameter of {r.architecture} ({source})')
    if tuple(np.shape(leaf)) != r.param_shapes[key]:
      raise ValueError(f'params leaf {key!r} has shape {tuple(np.shape(leaf))}; {r.architecture} '
                       f'({source}) needs {r.param_shapes[key]}')
  out = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(out):
    taken = [f for f in os.listdir(out) if f == CONFIG_NAME or f.endswith('.safetensors')
             or f == safetensors_writer.INDEX_NAME]
    if taken:
      raise FileExistsError(f'{out} already holds a model ({taken[0]}); save to a new folder')
  tensor_of = {name: leaves['/'.join(p)] for name, p, _ in r.tensors}
  layout_of = {name: layout for name, _, layout in r.tensors}
  if ckpt is not None:
    dtype_of = {name: info.dtype for name, info in ckpt.tensors.items()}
  else:
    dtype_of = {name: np.dtype(tensor_of[name].dtype) for name, _, _ in r.tensors}
  specs = [safetensors_writer.TensorSpec(name, dtype, r.shapes[name])
           for name, dtype in dtype_of.items()]

  def produce(name: str) -> np.ndarray:
    value = to_hf(np.asarray(jax.device_get(tensor_of[name])), layout_of[name])
    return np.ascontiguousarray(value.astype(dtype_of[name]))

  os.makedirs(out, exist_ok=True)
  plans = safetensors_writer.write_checkpoint(out, specs, produce, max_shard_size=max_shard_size)
  if ckpt is None:
    with open(os.path.join(out, CONFIG_NAME), 'x') as f:
      json.dump(r.config, f, indent=2, sort_keys=True)
      f.write('\n')
  for file in () if ckpt is None else (CONFIG_NAME,) + SIDE_FILES:
    if os.path.isfile(os.path.join(r.folder, file)):
      shutil.copyfile(os.path.join(r.folder, file), os.path.join(out, file))
  return plans
