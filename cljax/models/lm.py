"""Decoder-only causal LMs of the Llama / Qwen3 family as Flax Linen modules with HF tensor names.

One module covers Hugging Face's ``LlamaForCausalLM`` and ``Qwen3ForCausalLM``: pre-norm decoder
layers (RMSNorm -> grouped-query self-attention with rotary position embeddings -> residual,
RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and an output layer (its own ``head`` or the
transposed input embedding when ``tie_word_embeddings``). Qwen3 adds an RMSNorm over each
query/key head before the rotation (``qk_norm``). Every projection is a 2-D ``Dense`` kernel
``(in, out)`` (the transpose of the HF ``(out, in)`` weight), so GPM / OSFT / CoSO see the true
matrix of each layer. `hf_tensors` lists the HF name and layout of every parameter.

Parameter paths (Linen names): ``model/embed_tokens/embedding``,
``model/layers_<i>/{input_layernorm,post_attention_layernorm}/scale``,
``model/layers_<i>/self_attn/{q,k,v,o}_proj/kernel`` (``/bias`` with ``attention_bias``),
``model/layers_<i>/self_attn/{q,k}_norm/scale`` (Qwen3), ``model/layers_<i>/mlp/{gate,up,down}_proj/
kernel``, ``model/norm/scale``, ``head/kernel`` (untied only; cljax names every output layer
``head``).

References:
  Touvron et al., LLaMA (arXiv:2302.13971); Grattafiori et al., The Llama 3 Herd of Models
  (arXiv:2407.21783, the ``llama3`` RoPE frequency scaling); Yang et al., Qwen3 Technical Report
  (arXiv:2505.09388, QK-norm); Su et al., RoFormer (arXiv:2104.09864, rotary embeddings, in HF's
  rotate-half layout); Zhang & Sennrich, RMSNorm (2019); Shazeer, GLU Variants (arXiv:2002.05202).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = {'silu': nn.silu, 'gelu': lambda x: nn.gelu(x, approximate=False),
               'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True), 'relu': nn.relu}


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """The architecture of a decoder-only LM (HF ``config.json`` field names).

  Attributes:
    vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
      num_key_value_heads, head_dim: sizes (``head_dim`` defaults to hidden / heads in HF).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base.
    rope_scaling: None (plain RoPE) or the ``llama3`` parameters as a sorted tuple of
      ``(key, value)`` pairs: ``factor``, ``low_freq_factor``, ``high_freq_factor``,
      ``original_max_position_embeddings``.
    tie_word_embeddings: logits from the transposed input embedding (no ``head``).
    qk_norm: RMSNorm over each query / key head before RoPE (Qwen3).
    attention_bias: biases on q/k/v/o projections.
    mlp_bias: biases on the MLP projections (Llama's ``mlp_bias``).
    hidden_act: the MLP's gate activation (a key of ``ACTIVATIONS``).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[tuple] = None
  tie_word_embeddings: bool = False
  qk_norm: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = 'silu'


def rope_inv_freq(config: LMConfig) -> np.ndarray:
  """RoPE inverse frequencies (head_dim / 2,), float32, as transformers computes them.

  ``1 / theta ** (2i / head_dim)``; with ``llama3`` scaling, wavelengths longer than
  ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, those shorter
  than ``... / high_freq_factor`` kept, and the band between interpolated (Llama 3 paper, Sec. 3;
  transformers' ``_compute_llama3_parameters``).
  """
  dim = config.head_dim
  inv_freq = 1.0 / (np.float32(config.rope_theta) **
                    (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)))
  inv_freq = inv_freq.astype(np.float32)
  if config.rope_scaling is None:
    return inv_freq
  s = dict(config.rope_scaling)
  factor, low, high = s['factor'], s['low_freq_factor'], s['high_freq_factor']
  old_len = s['original_max_position_embeddings']
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class RMSNorm(nn.Module):
  """``scale * x / sqrt(mean(x^2) + eps)`` over the last axis, computed in float32."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale * y.astype(x.dtype)


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE (HF ``LlamaAttention`` / ``Qwen3Attention``)."""

  config: LMConfig

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    c = self.config
    b, length, _ = x.shape
    h, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    dense = lambda n, name: nn.Dense(n, use_bias=c.attention_bias, name=name)
    q = dense(h * d, 'q_proj')(x).reshape(b, length, h, d)
    k = dense(kv * d, 'k_proj')(x).reshape(b, length, kv, d)
    v = dense(kv * d, 'v_proj')(x).reshape(b, length, kv, d)
    if c.qk_norm:
      q = RMSNorm(c.rms_norm_eps, name='q_norm')(q)
      k = RMSNorm(c.rms_norm_eps, name='k_norm')(k)
    cos, sin = cos[None, :, None, :].astype(q.dtype), sin[None, :, None, :].astype(q.dtype)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k = jnp.repeat(k, h // kv, axis=2)   # query head i reads key/value head i // (h / kv)
    v = jnp.repeat(v, h // kv, axis=2)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) * (d ** -0.5)
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, length, h * d)
    return dense(c.hidden_size, 'o_proj')(out)


class MLP(nn.Module):
  """SwiGLU feed-forward: ``down(act(gate(x)) * up(x))``."""

  config: LMConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dense = lambda n, name: nn.Dense(n, use_bias=c.mlp_bias, name=name)
    act = ACTIVATIONS[c.hidden_act]
    return dense(c.hidden_size, 'down_proj')(
        act(dense(c.intermediate_size, 'gate_proj')(x)) * dense(c.intermediate_size, 'up_proj')(x))


class DecoderLayer(nn.Module):
  """Pre-norm block: attention and MLP, each with a residual connection."""

  config: LMConfig

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    eps = self.config.rms_norm_eps
    x = x + Attention(self.config, name='self_attn')(RMSNorm(eps, name='input_layernorm')(x),
                                                     cos, sin)
    return x + MLP(self.config, name='mlp')(RMSNorm(eps, name='post_attention_layernorm')(x))


class DecoderModel(nn.Module):
  """Embedding, decoder layers and the final norm (HF ``LlamaModel`` / ``Qwen3Model``)."""

  config: LMConfig

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size,
                                 embedding_init=nn.initializers.normal(0.02))
    self.layers = [DecoderLayer(c) for _ in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    positions = jnp.arange(input_ids.shape[1], dtype=jnp.float32)
    freqs = positions[:, None] * jnp.asarray(rope_inv_freq(self.config))[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x = self.embed_tokens(input_ids)
    for layer in self.layers:
      x = layer(x, cos, sin)
    return self.norm(x)

  def attend(self, x: jax.Array) -> jax.Array:
    return self.embed_tokens.attend(x)


class CausalLM(nn.Module):
  """Token ids (B, L) int -> next-token logits (B, L, vocab_size).

  Attributes:
    config: the `LMConfig`.

  ``train`` is accepted for the model contract and unused: HF's Llama / Qwen3 default to no
  dropout (``attention_dropout=0``). Attention is causal over all L positions (no padding mask:
  padded positions are left out of the loss by per-token weights). Float inputs are cast to
  int32, so `cljax.models.init_params(module, key, (L,))` initialises an LM like any model.
  """

  config: LMConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      input_ids = input_ids.astype(jnp.int32)
    model = DecoderModel(self.config, name='model')
    x = model(input_ids)
    if self.config.tie_word_embeddings:
      return model.attend(x)
    return nn.Dense(self.config.vocab_size, use_bias=False, name='head')(x)


def qwen3(*, num_outputs: int, hidden_size: int = 64, intermediate_size: int = 192,
          num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
          head_dim: int = 16, rms_norm_eps: float = 1e-6, rope_theta: float = 1e6,
          tie_word_embeddings: bool = True) -> CausalLM:
  """A freshly initialisable Qwen3-architecture LM (``REGISTRY['qwen3']``).

  Args:
    num_outputs: the vocabulary size (logits per position).
    hidden_size ... tie_word_embeddings: as `LMConfig` (defaults: a ~0.1M-parameter toy).

  Returns:
    A `CausalLM` with QK-norm, no biases, SiLU gates (Qwen3's choices).
  """
  return CausalLM(LMConfig(
      vocab_size=num_outputs, hidden_size=hidden_size, intermediate_size=intermediate_size,
      num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
      num_key_value_heads=num_key_value_heads, head_dim=head_dim, rms_norm_eps=rms_norm_eps,
      rope_theta=rope_theta, tie_word_embeddings=tie_word_embeddings, qk_norm=True))


def llama(*, num_outputs: int, hidden_size: int = 64, intermediate_size: int = 192,
          num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
          head_dim: int = 16, rms_norm_eps: float = 1e-5, rope_theta: float = 5e5,
          tie_word_embeddings: bool = False) -> CausalLM:
  """A freshly initialisable Llama-architecture LM (``REGISTRY['llama']``); as `qwen3` but
  without QK-norm, with Llama 3's RoPE base and an untied ``head`` by default."""
  return CausalLM(LMConfig(
      vocab_size=num_outputs, hidden_size=hidden_size, intermediate_size=intermediate_size,
      num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
      num_key_value_heads=num_key_value_heads, head_dim=head_dim, rms_norm_eps=rms_norm_eps,
      rope_theta=rope_theta, tie_word_embeddings=tie_word_embeddings, qk_norm=False))


def hf_tensors(config: LMConfig, prefix: str = 'model') -> list:
  """Every parameter's HF tensor name, cljax path and layout, in HF's module order.

  Args:
    config: the architecture.
    prefix: the HF name of the decoder (``model``).

  Returns:
    A list of ``(hf_name, path, layout)``: ``path`` a tuple of Linen names, ``layout`` one of
    ``'linear'`` (HF ``(out, in)`` is our ``(in, out)`` kernel transposed) or ``'same'``.
  """
  out = [(f'{prefix}.embed_tokens.weight', ('model', 'embed_tokens', 'embedding'), 'same')]
  for i in range(config.num_hidden_layers):
    hf, me = f'{prefix}.layers.{i}', ('model', f'layers_{i}')
    out.append((f'{hf}.input_layernorm.weight', me + ('input_layernorm', 'scale'), 'same'))
    for proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
      out.append((f'{hf}.self_attn.{proj}.weight', me + ('self_attn', proj, 'kernel'), 'linear'))
      if config.attention_bias:
        out.append((f'{hf}.self_attn.{proj}.bias', me + ('self_attn', proj, 'bias'), 'same'))
    if config.qk_norm:
      for norm in ('q_norm', 'k_norm'):
        out.append((f'{hf}.self_attn.{norm}.weight', me + ('self_attn', norm, 'scale'), 'same'))
    out.append((f'{hf}.post_attention_layernorm.weight',
                me + ('post_attention_layernorm', 'scale'), 'same'))
    for proj in ('gate_proj', 'up_proj', 'down_proj'):
      out.append((f'{hf}.mlp.{proj}.weight', me + ('mlp', proj, 'kernel'), 'linear'))
      if config.mlp_bias:
        out.append((f'{hf}.mlp.{proj}.bias', me + ('mlp', proj, 'bias'), 'same'))
  out.append((f'{prefix}.norm.weight', ('model', 'norm', 'scale'), 'same'))
  if not config.tie_word_embeddings:
    out.append(('lm_head.weight', ('head', 'kernel'), 'linear'))
  return out


def _int(cfg: dict, key: str, source: str) -> int:
  if key not in cfg:
    raise ValueError(f'{source}: config key {key!r} is missing')
  return int(cfg[key])


def _rope(cfg: dict, source: str) -> tuple:
  """(rope_theta, rope_scaling) from a transformers 4 (``rope_theta``, ``rope_scaling``) or 5
  (``rope_parameters``) config."""
  params = dict(cfg.get('rope_parameters') or {})
  scaling = cfg.get('rope_scaling') or params
  theta = float(params.get('rope_theta', cfg.get('rope_theta', 10000.0)))
  rope_type = (scaling or {}).get('rope_type', (scaling or {}).get('type', 'default'))
  if rope_type == 'default':
    return theta, None
  if rope_type != 'llama3':
    raise ValueError(f'{source}: config key `rope_scaling` / `rope_parameters` has rope_type '
                     f'{rope_type!r}; cljax implements only "default" and "llama3"')
  keys = ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')
  missing = [k for k in keys if k not in scaling]
  if missing:
    raise ValueError(f'{source}: llama3 RoPE scaling lacks {missing}')
  return theta, tuple(sorted((k, float(scaling[k])) for k in keys))


def config_from_hf(cfg: dict, *, qk_norm: bool, source: str) -> LMConfig:
  """An `LMConfig` from a parsed HF ``config.json``.

  Args:
    cfg: the parsed JSON.
    qk_norm: the architecture's query/key norm (True for Qwen3).
    source: the file name, for errors.

  Raises:
    ValueError: a missing size, an activation not in ``ACTIVATIONS``, sliding-window attention,
      heads not divisible by key/value heads, or an unsupported RoPE type (naming the key).
  """
  heads = _int(cfg, 'num_attention_heads', source)
  hidden = _int(cfg, 'hidden_size', source)
  kv = int(cfg.get('num_key_value_heads') or heads)
  if heads % kv:
    raise ValueError(f'{source}: num_attention_heads={heads} is not a multiple of '
                     f'num_key_value_heads={kv}')
  act = cfg.get('hidden_act', 'silu')
  if act not in ACTIVATIONS:
    raise ValueError(f'{source}: config key `hidden_act` is {act!r}; cljax implements '
                     f'{sorted(ACTIVATIONS)}')
  if cfg.get('use_sliding_window'):
    raise ValueError(f'{source}: config key `use_sliding_window` is true; cljax implements only '
                     f'full causal attention')
  theta, scaling = _rope(cfg, source)
  return LMConfig(
      vocab_size=_int(cfg, 'vocab_size', source), hidden_size=hidden,
      intermediate_size=_int(cfg, 'intermediate_size', source),
      num_hidden_layers=_int(cfg, 'num_hidden_layers', source), num_attention_heads=heads,
      num_key_value_heads=kv, head_dim=int(cfg.get('head_dim') or hidden // heads),
      rms_norm_eps=float(cfg.get('rms_norm_eps', 1e-6)), rope_theta=theta, rope_scaling=scaling,
      tie_word_embeddings=bool(cfg.get('tie_word_embeddings', False)), qk_norm=qk_norm,
      attention_bias=bool(cfg.get('attention_bias', False)),
      mlp_bias=bool(cfg.get('mlp_bias', False)), hidden_act=act)



def config_to_hf(config: LMConfig, *, max_position_embeddings: int = 4096) -> dict:
  """The HF ``config.json`` of an `LMConfig` (``Qwen3ForCausalLM`` with QK-norm, else Llama).

  RoPE is written both as transformers 5's ``rope_parameters`` and as transformers 4's
  ``rope_theta`` / ``rope_scaling``.

  Args:
    config: the architecture.
    max_position_embeddings: recorded for transformers (cljax's RoPE has no length limit).

  Returns:
    A JSON-serialisable dict that `config_from_hf` maps back to ``config``.

  Raises:
    ValueError: ``mlp_bias`` with QK-norm (HF's Qwen3 has no MLP biases).
  """
  qwen3 = config.qk_norm
  if qwen3 and config.mlp_bias:
    raise ValueError('a Qwen3 (qk_norm) LM with mlp_bias has no Hugging Face architecture')
  rope = {'rope_type': 'default', 'rope_theta': config.rope_theta}
  if config.rope_scaling is not None:
    rope.update(dict(config.rope_scaling), rope_type='llama3')
    rope['original_max_position_embeddings'] = int(rope['original_max_position_embeddings'])
  out = {
      'architectures': ['Qwen3ForCausalLM' if qwen3 else 'LlamaForCausalLM'],
      'model_type': 'qwen3' if qwen3 else 'llama',
      'vocab_size': config.vocab_size, 'hidden_size': config.hidden_size,
      'intermediate_size': config.intermediate_size,
      'num_hidden_layers': config.num_hidden_layers,
      'num_attention_heads': config.num_attention_heads,
      'num_key_value_heads': config.num_key_value_heads, 'head_dim': config.head_dim,
      'hidden_act': config.hidden_act, 'rms_norm_eps': config.rms_norm_eps,
      'max_position_embeddings': max_position_embeddings,
      'tie_word_embeddings': config.tie_word_embeddings,
      'attention_bias': config.attention_bias, 'attention_dropout': 0.0,
      'rope_parameters': rope, 'rope_theta': config.rope_theta,
      'rope_scaling': (None if config.rope_scaling is None
                       else {k: v for k, v in rope.items() if k != 'rope_theta'}),
      'dtype': 'float32',
  }
  if qwen3:
    out['use_sliding_window'] = False
  else:
    out['mlp_bias'] = config.mlp_bias
  return out
