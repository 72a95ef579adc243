"""Writes tiny random-weight Hugging Face models and their PyTorch logits as test fixtures.

Not run by CI: it needs torch and transformers, which cljax does not depend on. Install them in a
separate environment (never the one cljax's tests run in), e.g.::

    python -m venv --system-site-packages /work/venv-torch
    /work/venv-torch/bin/pip install torch transformers
    /work/venv-torch/bin/python scripts/make_hf_fixtures.py            # writes tests/fixtures/hf/
    /work/venv-torch/bin/python scripts/make_hf_fixtures.py --verify   # cljax save -> torch load

For each model it writes ``tests/fixtures/hf/<name>/`` (``config.json`` + ``model.safetensors``,
transformers' own ``save_pretrained``) and ``tests/fixtures/hf/<name>.npz`` holding the fixed
inputs and transformers' float32 eval-mode logits on them. Weights are drawn from N(0, 0.2^2)
(norm weights 1 + N(0, 0.2^2)) rather than transformers' small initialisation, so that every
layer moves the logits and a wrong layout is visible at 1e-4. The models:

* ``qwen3``: ``Qwen3ForCausalLM``, 2 layers, 4 query / 2 key-value heads, head_dim 16 != hidden /
  heads, tied embeddings.
* ``llama``: ``LlamaForCausalLM``, 2 layers, 4 query heads / 1 key-value head, attention and MLP
  biases, an untied ``lm_head``, ``llama3`` RoPE scaling whose bands all occur at head_dim 8.
* ``vit``: ``ViTForImageClassification``, 8x8 RGB images, 4x4 patches, 2 layers, 5 labels.

``--verify`` (needs jax and cljax too) loads each fixture with ``cljax.models.from_pretrained``,
saves it with ``cljax.models.save_pretrained`` (also as several shards), loads what cljax wrote with
``transformers.AutoModelFor*.from_pretrained`` and checks its logits equal the fixture's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, '..', 'tests', 'fixtures', 'hf')
SEQ_LEN = 12


def _randomize(model: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.2
      is_norm = 'norm' in name and name.endswith('weight')
      p.copy_(1.0 + noise if is_norm else noise)


def _configs() -> dict:
  qwen3 = transformers.Qwen3Config(
      vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
      max_position_embeddings=64, rms_norm_eps=1e-6)
  qwen3.architectures = ['Qwen3ForCausalLM']
  llama = transformers.LlamaConfig(
      vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, head_dim=8, attention_bias=True,
      mlp_bias=True, tie_word_embeddings=False, max_position_embeddings=64, rms_norm_eps=1e-5,
      rope_scaling={'rope_type': 'llama3', 'factor': 4.0, 'low_freq_factor': 1.0,
                    'high_freq_factor': 4.0, 'original_max_position_embeddings': 8},
      rope_theta=10000.0)
  llama.architectures = ['LlamaForCausalLM']
  vit = transformers.ViTConfig(
      image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=64, num_labels=5, hidden_act='gelu',
      layer_norm_eps=1e-12, qkv_bias=True)
  vit.architectures = ['ViTForImageClassification']
  return {'qwen3': (qwen3, transformers.Qwen3ForCausalLM, 'input_ids'),
          'llama': (llama, transformers.LlamaForCausalLM, 'input_ids'),
          'vit': (vit, transformers.ViTForImageClassification, 'pixel_values')}


def _inputs(config, kind: str, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if kind == 'input_ids':
    return rng.integers(0, config.vocab_size, size=(2, SEQ_LEN)).astype(np.int64)
  return rng.normal(size=(2, config.num_channels, config.image_size,
                          config.image_size)).astype(np.float32)


def _logits(model, kind: str, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(**{kind: torch.from_numpy(x)}).logits.float().numpy()


def write(out: str) -> None:
  for seed, (name, (config, cls, kind)) in enumerate(_configs().items()):
    torch.manual_seed(seed)
    model = cls(config).eval()
    _randomize(model, seed)
    folder = os.path.join(out, name)
    model.save_pretrained(folder)
    x = _inputs(config, kind, seed)
    reloaded = cls.from_pretrained(folder).eval()
    logits = _logits(reloaded, kind, x)
    np.testing.assert_array_equal(logits, _logits(model, kind, x))
    np.savez(os.path.join(out, f'{name}.npz'), **{kind: x, 'logits': logits})
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f'{name}: {folder} ({size} bytes), logits {logits.shape}')


def verify(out: str) -> None:
  sys.path.insert(0, os.path.join(HERE, '..'))
  import jax.numpy as jnp   # pylint: disable=import-outside-toplevel
  from cljax import models  # pylint: disable=import-outside-toplevel
  for name, (_, cls, kind) in _configs().items():
    folder = os.path.join(out, name)
    fixture = np.load(os.path.join(out, f'{name}.npz'))
    apply_fn, params = models.from_pretrained(folder)
    x = fixture[kind]
    x = x.astype(np.int32) if kind == 'input_ids' else x.transpose(0, 2, 3, 1)
    ours = np.asarray(apply_fn(params, jnp.asarray(x)))
    print(f'{name}: cljax vs torch max |diff| {np.abs(ours - fixture["logits"]).max():.2e}')
    for shard_size in ('5GB', 20_000):
      with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, 'saved')
        models.save_pretrained(saved, params, like=folder, max_shard_size=shard_size)
        loaded = cls.from_pretrained(saved).eval()
        diff = np.abs(_logits(loaded, kind, fixture[kind]) - fixture['logits']).max()
        print(f'  cljax-saved ({sorted(os.listdir(saved))}) loaded by transformers '
              f'{cls.__name__}: max |diff| {diff:.2e}')
        assert diff == 0.0, diff
  _verify_fresh(models, cls_of={n: c for n, (_, c, _) in _configs().items()})


def _verify_fresh(models, cls_of) -> None:
  """Models built in cljax (no HF source) saved with config.json written by cljax."""
  import jax   # pylint: disable=import-outside-toplevel
  for name, kwargs, shape in (('qwen3', {}, (2, 9)), ('llama', {}, (2, 9)),
                              ('vit', {'patch_size': 4}, (2, 8, 8, 3))):
    module = models.make_model(name, num_outputs=11, **kwargs)
    x = np.random.default_rng(0).integers(0, 11, size=shape) if name != 'vit' else \
        np.random.default_rng(0).normal(size=shape).astype(np.float32)
    params = jax.jit(module.init)(jax.random.key(0), np.zeros((1, *shape[1:]), x.dtype))['params']
    ours = np.asarray(models.linen_apply_fn(module)(params, x))
    with tempfile.TemporaryDirectory() as tmp:
      models.save_pretrained(tmp + '/m', params, like=module)
      loaded = transformers.AutoConfig.from_pretrained(tmp + '/m')
      cls = cls_of[name]
      torch_x = x if name != 'vit' else x.transpose(0, 3, 1, 2)
      kind = 'input_ids' if name != 'vit' else 'pixel_values'
      theirs = _logits(cls.from_pretrained(tmp + '/m').eval(), kind, np.ascontiguousarray(torch_x))
    diff = np.abs(ours - theirs).max()
    print(f'fresh {name} ({type(loaded).__name__}) saved by cljax, run by transformers: '
          f'max |diff| {diff:.2e}')
    assert diff < 1e-4, diff


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=OUT)
  parser.add_argument('--verify', action='store_true',
                      help='check that transformers loads what cljax.models.save_pretrained writes')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.verify:
    verify(args.out)
  else:
    write(args.out)


if __name__ == '__main__':
  main()
