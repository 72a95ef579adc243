"""Vision Transformer classifier as a Flax Linen module with HF ``ViTForImageClassification`` names.

Images are split into non-overlapping ``patch_size`` patches (a strided convolution), a learned
class token is prepended, learned position embeddings added, then pre-norm encoder layers
(LayerNorm -> multi-head self-attention -> residual, LayerNorm -> GELU MLP -> residual), a final
LayerNorm, and a linear ``head`` on the class token. Inputs are NHWC ``(B, H, W, C)`` float
images (cljax's layout; HF's ``pixel_values`` are NCHW, `hf_tensors` maps the patch kernel).

Parameter paths: ``vit/embeddings/{cls_token,position_embeddings}``,
``vit/embeddings/patch_embeddings/projection/{kernel,bias}``,
``vit/encoder/layer_<i>/attention/attention/{query,key,value}/{kernel,bias}``,
``vit/encoder/layer_<i>/attention/output/dense/...``, ``.../intermediate/dense/...``,
``.../output/dense/...``, ``.../layernorm_{before,after}/{scale,bias}``,
``vit/layernorm/{scale,bias}``, ``head/{kernel,bias}`` (HF ``classifier``; cljax names every
output layer ``head``).

References:
  Dosovitskiy et al., An Image is Worth 16x16 Words (ICLR 2021, arXiv:2010.11929), Eq. 1-4.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {'gelu': lambda x: nn.gelu(x, approximate=False),
               'gelu_new': lambda x: nn.gelu(x, approximate=True),
               'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True),
               'relu': nn.relu, 'silu': nn.silu}


class _Dense(nn.Module):
  """HF's ``nn.Linear`` wrapped one level deep (``<name>/dense``)."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.features, name='dense')(x)


class _QueryKeyValue(nn.Module):
  """The three input projections (HF ``ViTSelfAttention``'s ``query``/``key``/``value``)."""

  hidden_size: int
  qkv_bias: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple:
    proj = lambda name: nn.Dense(self.hidden_size, use_bias=self.qkv_bias, name=name)(x)
    return proj('query'), proj('key'), proj('value')


class SelfAttention(nn.Module):
  """Multi-head self-attention (HF ``ViTAttention``: ``attention`` then ``output``), no mask."""

  hidden_size: int
  num_heads: int
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    h, d = self.num_heads, self.hidden_size // self.num_heads
    qkv = _QueryKeyValue(self.hidden_size, self.qkv_bias, name='attention')(x)
    q, k, v = (t.reshape(b, n, h, d) for t in qkv)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) * (d ** -0.5)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, h * d)
    return _Dense(self.hidden_size, name='output')(out)


@dataclasses.dataclass(frozen=True)
class _Arch:
  """The sizes every encoder layer shares (see `ViTClassifier`'s attributes)."""

  hidden_size: int
  num_attention_heads: int
  intermediate_size: int
  layer_norm_eps: float
  hidden_act: str
  qkv_bias: bool
  dropout_rate: float


class EncoderLayer(nn.Module):
  """Pre-norm ViT block (HF ``ViTLayer``)."""

  arch: _Arch

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    a = self.arch
    norm = lambda name: nn.LayerNorm(a.layer_norm_eps, use_fast_variance=False, name=name)
    drop = lambda y: nn.Dropout(a.dropout_rate, deterministic=not train)(y)
    y = SelfAttention(a.hidden_size, a.num_attention_heads, a.qkv_bias,
                      name='attention')(norm('layernorm_before')(x))
    x = x + drop(y)
    y = ACTIVATIONS[a.hidden_act](
        _Dense(a.intermediate_size, name='intermediate')(norm('layernorm_after')(x)))
    return x + drop(_Dense(a.hidden_size, name='output')(y))


class _PatchEmbeddings(nn.Module):
  """Non-overlapping patches -> tokens (HF ``ViTPatchEmbeddings.projection``, a strided conv)."""

  hidden_size: int
  patch_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    return nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID',
                   name='projection')(x)


class Embeddings(nn.Module):
  """Patch embedding, class token and position embeddings (HF ``ViTEmbeddings``)."""

  hidden_size: int
  patch_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    patches = _PatchEmbeddings(self.hidden_size, self.patch_size, name='patch_embeddings')(x)
    b = patches.shape[0]
    patches = patches.reshape(b, -1, self.hidden_size)   # row-major over the patch grid, as HF
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param('cls_token', init, (1, 1, self.hidden_size), jnp.float32)
    pos = self.param('position_embeddings', init, (1, patches.shape[1] + 1, self.hidden_size),
                     jnp.float32)
    cls = jnp.broadcast_to(cls, (b, 1, self.hidden_size)).astype(patches.dtype)
    return jnp.concatenate([cls, patches], axis=1) + pos


class _Encoder(nn.Module):
  """The stack of `EncoderLayer` s (HF ``ViTEncoder``, layers ``layer_<i>``)."""

  arch: _Arch
  num_hidden_layers: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i in range(self.num_hidden_layers):
      x = EncoderLayer(self.arch, name=f'layer_{i}')(x, train=train)
    return x


class _ViTModel(nn.Module):
  """Embeddings, encoder and final LayerNorm (HF ``ViTModel`` without the pooler)."""

  arch: _Arch
  patch_size: int
  num_hidden_layers: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    a = self.arch
    x = Embeddings(a.hidden_size, self.patch_size, name='embeddings')(x)
    x = nn.Dropout(a.dropout_rate, deterministic=not train)(x)
    x = _Encoder(a, self.num_hidden_layers, name='encoder')(x, train=train)
    return nn.LayerNorm(a.layer_norm_eps, use_fast_variance=False, name='layernorm')(x)


class ViTClassifier(nn.Module):
  """Images (B, H, W, C) -> class logits (B, num_outputs).

  Attributes:
    num_outputs: number of classes (HF ``num_labels``).
    patch_size: side of the square patches; H and W must be multiples of it.
    hidden_size: token width D.
    num_hidden_layers: encoder layers.
    num_attention_heads: heads; divides ``hidden_size``.
    intermediate_size: MLP width.
    layer_norm_eps: LayerNorm epsilon (HF default 1e-12).
    hidden_act: MLP activation, a key of ``ACTIVATIONS`` ('gelu' is the exact erf GELU).
    qkv_bias: biases on the query/key/value projections.
    dropout_rate: HF ``hidden_dropout_prob``, after attention and MLP when ``train=True`` (needs
      ``rngs``); 0 by default.
  """

  num_outputs: int = 10
  patch_size: int = 4
  hidden_size: int = 64
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  intermediate_size: int = 128
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  qkv_bias: bool = True
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'ViT hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}')
    if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
      raise ValueError(f'ViT images of {x.shape[1]}x{x.shape[2]} pixels do not split into '
                       f'{self.patch_size}x{self.patch_size} patches (patch_size)')

    arch = _Arch(self.hidden_size, self.num_attention_heads, self.intermediate_size,
                 self.layer_norm_eps, self.hidden_act, self.qkv_bias, self.dropout_rate)
    tokens = _ViTModel(arch, self.patch_size, self.num_hidden_layers, name='vit')(x, train=train)
    return nn.Dense(self.num_outputs, name='head')(tokens[:, 0])


def hf_tensors(module: ViTClassifier) -> list:
  """Every parameter's HF tensor name, cljax path and layout, in HF's module order.

  Returns:
    A list of ``(hf_name, path, layout)``; ``layout`` is ``'linear'`` (HF ``(out, in)``),
    ``'conv'`` (HF ``(out, in, kh, kw)`` vs. Linen ``(kh, kw, in, out)``) or ``'same'``.
  """
  emb = ('vit', 'embeddings')
  out = [('vit.embeddings.cls_token', emb + ('cls_token',), 'same'),
         ('vit.embeddings.position_embeddings', emb + ('position_embeddings',), 'same'),
         ('vit.embeddings.patch_embeddings.projection.weight',
          emb + ('patch_embeddings', 'projection', 'kernel'), 'conv'),
         ('vit.embeddings.patch_embeddings.projection.bias',
          emb + ('patch_embeddings', 'projection', 'bias'), 'same')]

  def linear(hf: str, path: tuple, bias: bool = True) -> list:
    rows = [(f'{hf}.weight', path + ('kernel',), 'linear')]
    return rows + ([(f'{hf}.bias', path + ('bias',), 'same')] if bias else [])

  def norm(hf: str, path: tuple) -> list:
    return [(f'{hf}.weight', path + ('scale',), 'same'), (f'{hf}.bias', path + ('bias',), 'same')]

  for i in range(module.num_hidden_layers):
    hf, me = f'vit.encoder.layer.{i}', ('vit', 'encoder', f'layer_{i}')
    for proj in ('query', 'key', 'value'):
      out += linear(f'{hf}.attention.attention.{proj}',
                    me + ('attention', 'attention', proj), module.qkv_bias)
    out += linear(f'{hf}.attention.output.dense', me + ('attention', 'output', 'dense'))
    out += linear(f'{hf}.intermediate.dense', me + ('intermediate', 'dense'))
    out += linear(f'{hf}.output.dense', me + ('output', 'dense'))
    out += norm(f'{hf}.layernorm_before', me + ('layernorm_before',))
    out += norm(f'{hf}.layernorm_after', me + ('layernorm_after',))
  out += norm('vit.layernorm', ('vit', 'layernorm'))
  out += linear('classifier', ('head',))
  return out


def module_from_hf(cfg: dict, *, source: str) -> ViTClassifier:
  """A `ViTClassifier` from a parsed HF ``ViTConfig`` ``config.json``.

  ``num_labels`` comes from ``id2label`` (what transformers writes); ``hidden_dropout_prob``
  becomes ``dropout_rate``. ``attention_probs_dropout_prob`` is not implemented (evaluation is
  unaffected; HF's ViT checkpoints set it to 0).

  Args:
    cfg: the parsed JSON.
    source: the file name, for errors.

  Returns:
    The module.

  Raises:
    ValueError: a missing size or an unknown ``hidden_act`` (naming the key and ``source``).
  """
  missing = [k for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads',
                         'intermediate_size', 'patch_size') if k not in cfg]
  if missing:
    raise ValueError(f'{source}: config key(s) {missing} missing')
  act = cfg.get('hidden_act', 'gelu')
  if act not in ACTIVATIONS:
    raise ValueError(f'{source}: config key `hidden_act` is {act!r}; cljax implements '
                     f'{sorted(ACTIVATIONS)}')
  num_labels = cfg.get('num_labels') or len(cfg.get('id2label') or {}) or 2
  return ViTClassifier(
      num_outputs=int(num_labels), patch_size=int(cfg['patch_size']),
      hidden_size=int(cfg['hidden_size']), num_hidden_layers=int(cfg['num_hidden_layers']),
      num_attention_heads=int(cfg['num_attention_heads']),
      intermediate_size=int(cfg['intermediate_size']),
      layer_norm_eps=float(cfg.get('layer_norm_eps', 1e-12)), hidden_act=act,
      qkv_bias=bool(cfg.get('qkv_bias', True)),
      dropout_rate=float(cfg.get('hidden_dropout_prob', 0.0)))


def config_to_hf(module: ViTClassifier, params: dict) -> dict:
  """The HF ``ViTConfig`` ``config.json`` of a module and its params.

  The image size and channel count are not module attributes; they are read from the params
  (square images: ``position_embeddings`` holds (image_size / patch_size)^2 + 1 tokens, the
  patch kernel ``(p, p, num_channels, D)``).

  Args:
    module: the `ViTClassifier`.
    params: its parameters.

  Returns:
    A JSON-serialisable dict that `module_from_hf` maps back to ``module``.

  Raises:
    ValueError: the patch grid is not square.
  """
  emb = params['vit']['embeddings']
  patches = int(emb['position_embeddings'].shape[1]) - 1
  side = int(round(patches ** 0.5))
  if side * side != patches:
    raise ValueError(f'vit/embeddings/position_embeddings holds {patches} patch positions, not '
                     f'a square grid: HF ViT configs describe square images only')
  labels = {str(i): f'LABEL_{i}' for i in range(module.num_outputs)}
  return {
      'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
      'hidden_size': module.hidden_size, 'num_hidden_layers': module.num_hidden_layers,
      'num_attention_heads': module.num_attention_heads,
      'intermediate_size': module.intermediate_size, 'hidden_act': module.hidden_act,
      'hidden_dropout_prob': module.dropout_rate, 'attention_probs_dropout_prob': 0.0,
      'layer_norm_eps': module.layer_norm_eps, 'image_size': side * module.patch_size,
      'patch_size': module.patch_size,
      'num_channels': int(emb['patch_embeddings']['projection']['kernel'].shape[2]),
      'qkv_bias': module.qkv_bias, 'id2label': labels,
      'label2id': {v: int(k) for k, v in labels.items()}, 'dtype': 'float32',
  }
