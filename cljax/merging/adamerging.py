"""AdaMerging (Yang et al. 2024): learn task arithmetic's coefficients, one per task or one per
task and layer, by minimising the prediction entropy of the merged model on unlabelled test
inputs of every task.

The merged model is theta(lambda) = theta_0 + sum_t lambda_t tau_t (task-wise) or, leaf by leaf,
theta^l = theta_0^l + sum_t lambda_t^l tau_t^l (layer-wise: one coefficient per task and
parameter tensor, FusionBench's granularity). The coefficients start at ``init`` (0.3, the
paper's) and follow ``optimizer`` (Adam, lr 1e-3, as the paper) on

  L(lambda) = sum_t mean_{x in batch_t} H(softmax(f_t(theta(lambda), x))),
  H(p) = -sum_k p_k log(p_k + 1e-8)                                 (FusionBench's entropy_loss)

where f_t is task t's model function (one shared ``apply_fn``, or one per task, e.g. closing
over its own classification head). With ``clamp`` the coefficients are clipped to [0, 1]
where they are used (FusionBench's ``clamp_weights``). Excluded leaves stay at the base.

References:
  Yang, Wang, Shen, Liu, Guo, Wang & Tao, "AdaMerging: Adaptive Model Merging for Multi-Task
  Learning", ICLR 2024 (task-wise and layer-wise AdaMerging; entropy minimisation on
  unlabelled test data as a surrogate objective; Adam with lr 1e-3; lambda initialised to 0.3).
  FusionBench ``method/adamerging`` (``entropy_loss``; ``clamp_weights``; one weight per
  parameter tensor in the layer-wise wrapper).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from cljax.merging import leafwise
from cljax.merging import task_vectors as tvlib
from cljax.merging import validation

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]
GRANULARITIES = ('task', 'layer')


class AdaMergingInfo(NamedTuple):
  """What `adamerging_with_info` learned.

  Attributes:
    coefficients: float32 (T,) task-wise or (T, L) layer-wise lambdas, L the number of merged
      leaves in flattening order (unclamped; `merge_with_coefficients` applies them).
    loss: float32 (num_steps,), the entropy objective before each step.
  """

  coefficients: jax.Array
  loss: jax.Array


def entropy(logits: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Mean over the batch of ``-sum_k p_k log(p_k + eps)``, p = softmax(logits).

  Args:
    logits: (B, K) float, or (..., K) (every leading position is an example).
    eps: inside the log, as FusionBench's ``entropy_loss``.

  Returns:
    float32 scalar.

  References:
    Yang et al., ICLR 2024 (entropy objective); FusionBench ``adamerging/entropy_loss.py``.
  """
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(p * jnp.log(p + eps), axis=-1))


def _merge(base, p_mask, base_leaves, stacked_tvs, lam, granularity, clamp):
  if clamp:
    lam = jnp.clip(lam, 0.0, 1.0)
  merged = []
  for j, (b, tv) in enumerate(zip(base_leaves, stacked_tvs)):
    coeff = lam[:, j] if granularity == 'layer' else lam
    merged.append(b + jnp.tensordot(coeff, tv, axes=1))
  return tvlib.combine(base, p_mask, merged)


def _apply_fns(apply_fn: Union[ApplyFn, Sequence[ApplyFn]], n: int) -> tuple:
  fns = (apply_fn,) * n if callable(apply_fn) else tuple(apply_fn)
  if len(fns) != n or not all(callable(f) for f in fns):
    raise ValueError(f'apply_fn must be a callable or a sequence of {n} callables (one per task)')
  return fns


@functools.partial(jax.jit, static_argnames=('mask_flags', 'apply_fns', 'optimizer', 'num_steps',
                                             'granularity', 'clamp', 'batch_size'))
def _train(base, base_leaves, stacked_tvs, lam0, inputs, *, mask_flags, apply_fns, optimizer,
           num_steps, granularity, clamp, batch_size):
  mask = jax.tree.unflatten(jax.tree.structure(base), list(mask_flags))

  def loss_fn(lam, step):
    params = _merge(base, mask, base_leaves, stacked_tvs, lam, granularity, clamp)
    total = 0.0
    for f, x in zip(apply_fns, inputs):
      if batch_size is not None and batch_size < x.shape[0]:
        start = (step * batch_size) % x.shape[0]
        x = jnp.take(x, (start + jnp.arange(batch_size)) % x.shape[0], axis=0)
      total = total + entropy(f(params, x))
    return total

  def step(carry, t):
    lam, state = carry
    loss, grad = jax.value_and_grad(loss_fn)(lam, t)
    updates, state = optimizer.update(grad, state, lam)
    return (optax.apply_updates(lam, updates), state), loss

  (lam, _), losses = jax.lax.scan(step, (lam0, optimizer.init(lam0)), jnp.arange(num_steps))
  return lam, losses


def merge_with_coefficients(base: Params, finetuned: Sequence[Params], coefficients: Any, *,
                            clamp: bool = False, exclude: tvlib.Exclude = None) -> Params:
  """``base + sum_t lambda_t tau_t`` with task-wise (T,) or layer-wise (T, L) coefficients.

  Args:
    base: base params.
    finetuned: T params pytrees with base's structure, shapes and dtypes.
    coefficients: (T,) or (T, L) lambdas, L the number of merged leaves (flattening order).
    clamp: clip the coefficients to [0, 1] first.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    Params with base's structure and dtypes.

  Raises:
    ValueError: mismatching or non-finite inputs; coefficients of the wrong shape.

  References:
    Yang et al., ICLR 2024 (task-wise / layer-wise merged model).
  """
  p = leafwise.prepare(base, finetuned, exclude, method='adamerging')
  lam = jnp.asarray(coefficients, jnp.float32)
  n, leaves = len(p.models), len(p.base)
  if lam.shape not in ((n,), (n, leaves)):
    raise ValueError(f'adamerging: coefficients of shape {lam.shape}; expected ({n},) or '
                     f'({n}, {leaves}) for {n} models and {leaves} merged leaves')
  granularity = 'task' if lam.ndim == 1 else 'layer'
  stacked = [jnp.stack(group) for group in zip(*p.task_vectors())]
  merged = _merge(base, p.mask, p.base, stacked, lam, granularity, bool(clamp))
  return leafwise.finish(base, p, tvlib.included_leaves(merged, p.mask), method='adamerging')


def adamerging_with_info(base: Params, finetuned: Sequence[Params], *,
                         apply_fn: Union[ApplyFn, Sequence[ApplyFn]],
                         test_inputs: Sequence[jax.Array], granularity: str = 'layer',
                         init: float = 0.3, num_steps: int = 500, learning_rate: float = 1e-3,
                         optimizer: Optional[optax.GradientTransformation] = None,
                         batch_size: Optional[int] = None, clamp: bool = False,
                         exclude: tvlib.Exclude = None) -> tuple:
  """AdaMerging: coefficients learned by entropy minimisation; returns (params, info).

  Args:
    base: base params theta_0, a pytree of float arrays.
    finetuned: T >= 1 params pytrees with base's structure, shapes and dtypes.
    apply_fn: ``apply_fn(params, x) -> logits`` (B, K), or T of them (task t's model, e.g. with
      its own head); traced under jit (must be hashable: a function, not a lambda rebuilt per
      call, to reuse the compiled loop).
    test_inputs: T arrays (N_t, ...) of unlabelled test inputs, one per task.
    granularity: 'task' (T coefficients) or 'layer' (T x L, one per merged leaf).
    init: the coefficients' initial value (the paper's 0.3).
    num_steps: optimisation steps, >= 1 (the paper's 500).
    learning_rate: Adam's, when ``optimizer`` is None (the paper's 1e-3).
    optimizer: any optax transformation of the coefficients (overrides learning_rate).
    batch_size: rows of each task's inputs per step, taken in order and wrapping around
      (step s uses rows s*B .. s*B + B - 1 mod N_t); None uses all rows every step.
    clamp: clip the coefficients to [0, 1] where used (FusionBench's ``clamp_weights``).
    exclude: regex(es) of leaves that are not merged (base's value; no coefficient).

  Returns:
    ``(params, info)``: the merged params (base's structure and dtypes) at the final
    coefficients, and an `AdaMergingInfo`.

  Raises:
    ValueError: mismatching or non-finite inputs; a wrong number of apply_fns or input arrays;
      bad granularity, init, num_steps, learning_rate or batch_size.

  References:
    Yang et al., ICLR 2024 (AdaMerging); FusionBench ``method/adamerging``.
  """
  validation.check_choice(granularity, name='granularity', choices=GRANULARITIES)
  init = validation.check_finite_scalar(init, name='init')
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f'num_steps must be an int >= 1; got {num_steps!r}')
  if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                 or batch_size < 1):
    raise ValueError(f'batch_size must be None or an int >= 1; got {batch_size!r}')
  if optimizer is None:
    learning_rate = validation.check_interval(learning_rate, name='learning_rate', low=0.0,
                                              high=float('inf'), low_open=True)
    optimizer = optax.adam(learning_rate)
  p = leafwise.prepare(base, finetuned, exclude, method='adamerging')
  n = len(p.models)
  fns = _apply_fns(apply_fn, n)
  if isinstance(test_inputs, (str, bytes)) or not isinstance(test_inputs, Sequence) or \
      len(test_inputs) != n:
    raise ValueError(f'test_inputs must be a sequence of {n} arrays (one batch of unlabelled '
                     f'inputs per task)')
  xs = [jnp.asarray(x) for x in test_inputs]
  for t, x in enumerate(xs):
    if x.ndim < 1 or x.shape[0] == 0:
      raise ValueError(f'test_inputs[{t}] has shape {x.shape}; it needs at least one example')
  stacked = [jnp.stack(group) for group in zip(*p.task_vectors())]
  shape = (n,) if granularity == 'task' else (n, len(p.base))
  lam, losses = _train(base, p.base, stacked, jnp.full(shape, init, jnp.float32), xs,
                       mask_flags=tuple(jax.tree.leaves(p.mask)), apply_fns=fns,
                       optimizer=optimizer, num_steps=num_steps, granularity=granularity,
                       clamp=bool(clamp), batch_size=batch_size)
  merged = _merge(base, p.mask, p.base, stacked, lam, granularity, bool(clamp))
  params = leafwise.finish(base, p, tvlib.included_leaves(merged, p.mask), method='adamerging')
  return params, AdaMergingInfo(lam, losses)


def adamerging(base: Params, finetuned: Sequence[Params], *,
               apply_fn: Union[ApplyFn, Sequence[ApplyFn]], test_inputs: Sequence[jax.Array],
               granularity: str = 'layer', init: float = 0.3, num_steps: int = 500,
               learning_rate: float = 1e-3,
               optimizer: Optional[optax.GradientTransformation] = None,
               batch_size: Optional[int] = None, clamp: bool = False,
               exclude: tvlib.Exclude = None) -> Params:
  """AdaMerging; `adamerging_with_info` without the learned coefficients and losses.

  See `adamerging_with_info` for the arguments and errors.

  References:
    Yang et al., ICLR 2024.
  """
  params, _ = adamerging_with_info(base, finetuned, apply_fn=apply_fn, test_inputs=test_inputs,
                                   granularity=granularity, init=init, num_steps=num_steps,
                                   learning_rate=learning_rate, optimizer=optimizer,
                                   batch_size=batch_size, clamp=clamp, exclude=exclude)
  return params
