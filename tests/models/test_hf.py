"""Hugging Face folders in and out, against transformers' own logits and files.

The fixtures in tests/fixtures/hf/ were written by scripts/make_hf_fixtures.py with torch and
transformers (not installed here): tiny random-weight Qwen3ForCausalLM (tied embeddings, head_dim
!= hidden / heads, GQA), LlamaForCausalLM (MQA, biases, llama3 RoPE scaling, untied lm_head) and
ViTForImageClassification folders, with transformers' float32 logits on fixed inputs.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from cljax import models
from cljax.merge_io import safetensors_reader

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'fixtures', 'hf')
NAMES = ('qwen3', 'llama', 'vit')


def _folder(name):
  return os.path.join(FIXTURES, name)


def _inputs(name):
  fixture = np.load(os.path.join(FIXTURES, f'{name}.npz'))
  if 'input_ids' in fixture:
    return fixture['input_ids'].astype(np.int32), fixture['logits']
  return fixture['pixel_values'].transpose(0, 2, 3, 1), fixture['logits']   # NCHW -> NHWC


def _tensors(folder):
  """name -> array of every tensor in a folder's safetensors files (index or not)."""
  ckpt = safetensors_reader.open_checkpoint(folder)
  out = {}
  for name, info in ckpt.tensors.items():
    with safe_open(info.file, framework='numpy') as f:
      out[name] = f.get_tensor(name)
  return out


def _copy(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(_folder(name), dst)
  return dst


def _edit_config(folder, **changes):
  file = folder / 'config.json'
  config = json.loads(file.read_text())
  config.update(changes)
  file.write_text(json.dumps(config))


@pytest.mark.parametrize('name', NAMES)
def test_logits_equal_transformers(name):
  apply_fn, params = models.from_pretrained(_folder(name))
  x, expected = _inputs(name)
  logits = jax.jit(apply_fn)(params, jnp.asarray(x))
  assert logits.dtype == jnp.float32 and logits.shape == expected.shape
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


def test_lm_is_causal_and_vocab_sized():
  apply_fn, params = models.from_pretrained(_folder('llama'))
  x, _ = _inputs('llama')
  changed = x.copy()
  changed[:, 7] = (changed[:, 7] + 1) % 89
  a, b = (np.asarray(jax.jit(apply_fn)(params, jnp.asarray(v))) for v in (x, changed))
  np.testing.assert_array_equal(a[:, :7], b[:, :7])   # no position reads a later token
  assert np.abs(a[:, 7:] - b[:, 7:]).min(axis=-1).max() > 0


def test_tied_embeddings_have_no_head_and_untied_do():
  _, qwen3 = models.from_pretrained(_folder('qwen3'))
  _, llama = models.from_pretrained(_folder('llama'))
  assert 'head' not in qwen3 and llama['head']['kernel'].shape == (32, 89)
  stored = _tensors(_folder('llama'))
  np.testing.assert_array_equal(llama['head']['kernel'], stored['lm_head.weight'].T)
  np.testing.assert_array_equal(
      llama['model']['layers_1']['self_attn']['k_proj']['kernel'],
      stored['model.layers.1.self_attn.k_proj.weight'].T)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('shard_size', ['5GB', 20_000])
def test_load_save_round_trips_every_tensor_bitwise(name, shard_size, tmp_path):
  _, params = models.from_pretrained(_folder(name))
  out = tmp_path / 'saved'
  models.save_pretrained(out, params, like=_folder(name), max_shard_size=shard_size)
  source, saved = _tensors(_folder(name)), _tensors(out)
  assert list(saved) == list(source)   # same names, in the source's storage order
  for key, value in source.items():
    assert saved[key].dtype == value.dtype and saved[key].shape == value.shape, key
    assert saved[key].tobytes() == value.tobytes(), key
  with open(os.path.join(_folder(name), 'config.json'), 'rb') as f:
    assert (out / 'config.json').read_bytes() == f.read()   # copied verbatim
  with safe_open(str(next(out.glob('*.safetensors'))), framework='numpy') as f:
    assert f.metadata() == {'format': 'pt'}   # transformers refuses files without it


def test_sharded_save_writes_a_valid_index(tmp_path):
  _, params = models.from_pretrained(_folder('qwen3'))
  out = tmp_path / 'saved'
  plans = models.save_pretrained(out, params, like=_folder('qwen3'), max_shard_size=20_000)
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  shards = sorted(p.name for p in out.glob('*.safetensors'))
  assert len(plans) == len(shards) > 1
  assert shards == [f'model-{i:05d}-of-{len(shards):05d}.safetensors'
                    for i in range(1, len(shards) + 1)]
  source = _tensors(_folder('qwen3'))
  assert set(index['weight_map']) == set(source)
  assert index['metadata']['total_size'] == sum(v.nbytes for v in source.values())
  for tensor, shard in index['weight_map'].items():
    with safe_open(str(out / shard), framework='numpy') as f:
      assert tensor in f.keys()
  for shard in shards:   # no shard but a tensor larger than the limit exceeds it
    sizes = []
    with safe_open(str(out / shard), framework='numpy') as f:
      sizes = [f.get_tensor(k).nbytes for k in f.keys()]
    assert sum(sizes) <= 20_000 or len(sizes) == 1
  _, again = models.from_pretrained(out)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_bfloat16_checkpoint_loads_as_float32_and_saves_as_bfloat16(tmp_path):
  folder = _copy('vit', tmp_path)
  source = {k: v.astype(ml_dtypes.bfloat16) for k, v in _tensors(folder).items()}
  os.remove(folder / 'model.safetensors')
  save_file(source, str(folder / 'model.safetensors'), metadata={'format': 'pt'})
  _, params = models.from_pretrained(folder)
  cls = params['vit']['embeddings']['cls_token']
  assert cls.dtype == jnp.float32
  np.testing.assert_array_equal(cls, source['vit.embeddings.cls_token'].astype(np.float32))
  _, kept = models.from_pretrained(folder, param_dtype=None)
  assert kept['head']['kernel'].dtype == jnp.bfloat16
  models.save_pretrained(tmp_path / 'out', params, like=folder)
  saved = _tensors(tmp_path / 'out')
  for key, value in source.items():
    assert saved[key].dtype == ml_dtypes.bfloat16 and saved[key].tobytes() == value.tobytes(), key


def test_saved_params_after_an_update_are_what_transformers_would_read(tmp_path):
  _, params = models.from_pretrained(_folder('vit'))
  params = jax.tree.map(lambda p: p + 0.5, params)
  models.save_pretrained(tmp_path / 'out', params, like=_folder('vit'))
  saved = _tensors(tmp_path / 'out')
  source = _tensors(_folder('vit'))
  # HF layouts: Linear (out, in); Conv2d (out, in, kh, kw): the shift is layout-independent.
  for key in source:
    np.testing.assert_allclose(saved[key], source[key] + 0.5, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(
      saved['vit.embeddings.patch_embeddings.projection.weight'],
      np.asarray(params['vit']['embeddings']['patch_embeddings']['projection']['kernel'])
      .transpose(3, 2, 0, 1))


def test_unknown_architecture_names_file_and_key(tmp_path):
  folder = _copy('qwen3', tmp_path)
  _edit_config(folder, architectures=['MambaForCausalLM'])
  with pytest.raises(ValueError, match=r"config\.json: config key `architectures` is "
                                       r"\['MambaForCausalLM'\].*Qwen3ForCausalLM"):
    models.from_pretrained(folder)
  _edit_config(folder, architectures=None)
  with pytest.raises(ValueError, match='`architectures` is None'):
    models.from_pretrained(folder)


def test_missing_folder_or_config(tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a folder'):
    models.from_pretrained(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match=r'config\.json does not exist'):
    models.from_pretrained(tmp_path)


def test_unknown_override_is_refused():
  with pytest.raises(ValueError, match=r"override\(s\) \['rms_eps'\] are not keys of .*config"):
    models.from_pretrained(_folder('qwen3'), rms_eps=1e-5)


def test_override_replaces_a_config_value():
  apply_fn, params = models.from_pretrained(_folder('llama'), rms_norm_eps=10.0)
  x, expected = _inputs('llama')
  assert np.abs(np.asarray(jax.jit(apply_fn)(params, x)) - expected).max() > 1e-2


def test_renamed_tensor_names_file_and_tensor(tmp_path):
  folder = _copy('llama', tmp_path)
  tensors = _tensors(folder)
  tensors['model.layers.0.mlp.gate.weight'] = tensors.pop('model.layers.0.mlp.gate_proj.weight')
  save_file(tensors, str(folder / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' of "
                                       r"LlamaForCausalLM is missing"):
    models.from_pretrained(folder)
  tensors['model.layers.0.mlp.gate_proj.weight'] = tensors['model.layers.0.mlp.gate.weight']
  save_file(tensors, str(folder / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor "
                                       r"'model\.layers\.0\.mlp\.gate\.weight' is not a parameter"):
    models.from_pretrained(folder)


def test_shape_mismatch_names_file_tensor_and_shapes(tmp_path):
  folder = _copy('qwen3', tmp_path)
  _edit_config(folder, intermediate_size=50)
  # The first mismatch in storage order (transformers stores names sorted): down_proj.
  with pytest.raises(ValueError, match=r"qwen3/model\.safetensors: tensor "
                                       r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape "
                                       r"\(32, 64\), but Qwen3ForCausalLM as configured by "
                                       r"config\.json needs \(32, 50\)"):
    models.from_pretrained(folder)


def test_unsupported_configuration_names_the_key(tmp_path):
  folder = _copy('llama', tmp_path)
  _edit_config(folder, rope_parameters={'rope_type': 'yarn', 'factor': 2.0, 'rope_theta': 1e4})
  with pytest.raises(ValueError, match=r"`rope_scaling` / `rope_parameters` has rope_type 'yarn'"):
    models.from_pretrained(folder)
  _edit_config(folder, rope_parameters={'rope_type': 'default', 'rope_theta': 1e4},
               hidden_act='swish')
  with pytest.raises(ValueError, match=r"config key `hidden_act` is 'swish'"):
    models.from_pretrained(folder)


def test_save_refuses_wrong_params_and_writes_nothing(tmp_path):
  _, params = models.from_pretrained(_folder('qwen3'))
  out = tmp_path / 'out'
  missing = jax.tree.map(lambda x: x, params)
  del missing['model']['layers_1']['self_attn']['q_norm']
  with pytest.raises(ValueError, match=r"params has no leaf 'model/layers_1/self_attn/q_norm/"
                                       r"scale'"):
    models.save_pretrained(out, missing, like=_folder('qwen3'))
  extra = {**params, 'head': {'kernel': jnp.zeros((32, 97))}}
  with pytest.raises(ValueError, match=r"params leaf 'head/kernel' is not a parameter"):
    models.save_pretrained(out, extra, like=_folder('qwen3'))
  wrong = jax.tree.map(lambda x: x, params)
  wrong['model']['norm']['scale'] = jnp.ones(31)
  with pytest.raises(ValueError, match=r"params leaf 'model/norm/scale' has shape \(31,\); .* "
                                       r"needs \(32,\)"):
    models.save_pretrained(out, wrong, like=_folder('qwen3'))
  assert not out.exists()
  models.save_pretrained(out, params, like=_folder('qwen3'))
  with pytest.raises(FileExistsError, match='already holds a model'):
    models.save_pretrained(out, params, like=_folder('qwen3'))


@pytest.mark.parametrize('name', NAMES)
def test_written_config_agrees_with_transformers_config(name, tmp_path):
  """cljax's config.json for a module equals transformers' own on every key both write."""
  with open(os.path.join(_folder(name), 'config.json')) as f:
    theirs = json.load(f)
  _, params = models.from_pretrained(_folder(name))
  module = models.hf.ARCHITECTURES[theirs['architectures'][0]].build(theirs, 'fixture')
  ours = models.hf.TO_CONFIG[type(module)](module, params)
  # Not in transformers 5's file: the transformers-4 RoPE keys; ours has no length limit.
  skip = {'rope_theta', 'rope_scaling', 'max_position_embeddings'}
  shared = (set(ours) & set(theirs)) - skip
  assert {'architectures', 'hidden_size', 'num_hidden_layers', 'num_attention_heads'} <= shared
  assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
  missing = {k for k in theirs if k not in ours}
  # What transformers writes that cljax leaves to its defaults: ids, init and cache settings.
  assert missing <= {'bos_token_id', 'eos_token_id', 'pad_token_id', 'initializer_range',
                     'use_cache', 'transformers_version', 'pretraining_tp', 'layer_types',
                     'max_window_layers', 'sliding_window', 'encoder_stride', 'pooler_act',
                     'pooler_output_size'}, missing


@pytest.mark.parametrize('name,shape', [('qwen3', (2, 7)), ('llama', (2, 7)),
                                        ('vit', (2, 8, 8, 3))])
def test_fresh_model_saves_and_loads_back(name, shape, tmp_path):
  module = models.make_model(name, num_outputs=11, **({'patch_size': 4} if name == 'vit' else {}))
  rng = np.random.default_rng(0)
  x = (rng.integers(0, 11, size=shape).astype(np.int32) if name != 'vit'
       else rng.normal(size=shape).astype(np.float32))
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, *shape[1:]), x.dtype))['params']
  models.save_pretrained(tmp_path / 'm', params, like=module)
  config = json.loads((tmp_path / 'm' / 'config.json').read_text())
  assert config['architectures'] == [{'qwen3': 'Qwen3ForCausalLM', 'llama': 'LlamaForCausalLM',
                                      'vit': 'ViTForImageClassification'}[name]]
  apply_fn, loaded = models.from_pretrained(tmp_path / 'm')
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  np.testing.assert_array_equal(jax.jit(apply_fn)(loaded, x),
                                jax.jit(models.linen_apply_fn(module))(params, x))


def test_saving_a_module_without_hf_architecture_is_refused(tmp_path):
  module = models.make_model('mlp', num_outputs=3, hidden=(4,))
  with pytest.raises(ValueError, match=r"MLP has no Hugging Face architecture; cljax saves "
                                       r"\['CausalLM', 'ViTClassifier'\]"):
    models.save_pretrained(tmp_path / 'm', {}, like=module)
  assert not (tmp_path / 'm').exists()
