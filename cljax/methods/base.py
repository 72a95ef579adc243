"""The Method contract for continual training, and the loss pieces every method shares.

A continual-training method is a `Method`: a NamedTuple of pure functions, in the spirit of
`optax.GradientTransformation`. The training loop (`cljax.training`) only ever calls these
functions, so a method never touches the loop and the loop never special-cases a method:

  * ``init(params) -> state``: the method's state before the first task.
  * ``loss(params, state, batch, apply_fn) -> scalar``: the method's extra loss term, added to the
    cross-entropy of the current batch (0 for finetune). The loop differentiates it but reports
    the cross-entropy alone as the step's loss: the term's value is never computed in training
    (for quadratic penalties those per-leaf reductions were most of the method's step time).
  * ``output_loss(logits, state, batch, apply_fn) -> scalar`` (optional): a term on the model's
    training-mode outputs (B, K) for the batch, taken from the loop's own forward pass, so that
    cross-entropy and this term share one forward and one backward pass (LwF's distillation;
    as ``loss``, differentiated, its value not reported).
  * ``gradient_transform(state) -> optax.GradientTransformation``: chained *before* the optimizer,
    e.g. projection of gradients away from a protected subspace; `optax.identity()` for most
    methods. It is called *inside* the jitted epoch with the method state's arrays traced, so a
    transform may close over them (bases, masks) without baking constants into the compiled
    program, and one compilation serves every task.
  * ``end_task(params, state, task_data, apply_fn) -> state``: consolidation after a task
    (Fisher, anchors, bases, buffers). Runs eagerly on the host; it may call jitted helpers.
  * ``training_data(seen) -> Batch`` (optional): the data trained on during the current task,
    given every task's training data seen so far, oldest first. ``None`` means the current task
    alone; `joint` returns all of them.
  * ``after_step(state, params, updates, task_grads) -> state`` (optional): a per-step
    state update inside the jitted loop, e.g. SI's path integral. ``params`` are the parameters
    the step started from and ``updates`` the step's change (the new parameters are
    ``optax.apply_updates(params, updates)``); ``task_grads`` are the gradients of the
    cross-entropy alone (without the method's term; through ``wrap_apply``'s forward pass when
    the method has one). ``None`` (the default)
    keeps the state constant during a task, and the step then differentiates one combined loss.
  * ``before_step(params, state, batch, apply_fn) -> params`` (optional): inside the jitted loop,
    moves the parameters before the step; the step's gradient is taken at, and its update
    applied to, the returned parameters (refresh's unlearn step, Wang et al. 2024, Alg. 1).
  * ``wrap_apply(apply_fn, state, batch) -> apply_fn`` (optional): the forward pass the training
    step differentiates on ``batch`` (the cross-entropy, ``output_loss`` and ``loss`` all see
    it), for a method that acts inside backpropagation: GPM projects its Dense gradients there
    (`cljax.methods.projection.input_projected_dot`). It must not change the outputs. A
    training loop must use it: GPM's ``gradient_transform`` then leaves those gradients alone.
    Evaluation, ``prepare_data``, ``before_step`` and ``end_task`` get the plain one.
  * ``prepare_data(params, state, data, apply_fn) -> Batch`` (optional): runs eagerly once
    before a task's training, with the parameters and state at the task's start, on the data
    to train on (host arrays); returns it, e.g. with ``teacher_logits`` recorded (LwF records
    the old model's responses once, as Li & Hoiem's Algorithm 1, instead of a teacher forward
    pass every step). The result must have the same fields present for every task.

State is a pytree (a NamedTuple of arrays) whose structure, shapes and dtypes are fixed by
``init(params)``: they must not change from task to task (memory does not grow with the number of
tasks, the jitted step never retraces for a new state shape, and a stage checkpoint restores into
``init(params)``'s structure).

The model is the pair ``(apply_fn, params)`` with ``apply_fn(params, x, *, train=False,
rngs=None) -> logits``; see `cljax.models`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
State = Any
ApplyFn = Callable[..., jax.Array]


class Batch(NamedTuple):
  """A batch of examples, or a whole task's data when its arrays are host numpy arrays.

  Attributes:
    x: inputs, (B, H, W, C) float32 (images in [0, 1]).
    y: labels, (B,) int32, indices into the model's outputs in [0, num_outputs).
    mask: (B, num_outputs) bool, the outputs each example may use. Task-incremental streams
      give each task its own head (a disjoint block of outputs); masking the other outputs is
      exactly training/evaluating that head alone. All True for class- and domain-incremental
      streams.
    teacher_logits: None, or (B, num_outputs) float32: a reference model's outputs on ``x``
      recorded by a method's ``prepare_data`` hook before the task (LwF's old-model responses).
    projected_inputs: None, or ``{parameter path: (B, d) float32}``: for a protected layer that
      reads the model's input itself, that input projected off the layer's basis, recorded by
      ``prepare_data`` before the task (GPM: once per example instead of once per step).

  Batches are pytrees; transform every array of one with ``jax.tree.map(fn, batch)``, which
  skips the absent (None) optional fields.
  """

  x: Any
  y: Any
  mask: Any
  teacher_logits: Any = None
  projected_inputs: Any = None

  @property
  def size(self) -> int:
    return int(self.y.shape[0])


class Method(NamedTuple):
  """A continual-training method as pure functions; see the module docstring for the contract."""

  init: Callable[[Params], State]
  loss: Callable[[Params, State, Batch, ApplyFn], jax.Array]
  gradient_transform: Callable[[State], optax.GradientTransformation]
  end_task: Callable[[Params, State, Batch, ApplyFn], State]
  training_data: Optional[Callable[[Sequence[Batch]], Batch]] = None
  after_step: Optional[Callable[[State, Params, Params, Params], State]] = None
  prepare_data: Optional[Callable[[Params, State, Batch, ApplyFn], Batch]] = None
  output_loss: Optional[Callable[[jax.Array, State, Batch, ApplyFn], jax.Array]] = None
  before_step: Optional[Callable[[Params, State, Batch, ApplyFn], Params]] = None
  wrap_apply: Optional[Callable[[ApplyFn, State, Batch], ApplyFn]] = None


class EmptyState(NamedTuple):
  """State of a method that keeps nothing between tasks."""


def no_loss(params: Params, state: State, batch: Batch, apply_fn: ApplyFn) -> jax.Array:
  """The zero extra loss term."""
  del params, state, batch, apply_fn
  return jnp.zeros((), jnp.float32)


def identity_transform(state: State) -> optax.GradientTransformation:
  """Gradients pass through unchanged."""
  del state
  return optax.identity()


def keep_state(params: Params, state: State, task_data: Batch, apply_fn: ApplyFn) -> State:
  """`end_task` for a method that consolidates nothing."""
  del params, task_data, apply_fn
  return state


def masked_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Sets the logits of outputs outside ``mask`` to a very negative finite value.

  A finite value rather than ``-inf`` keeps ``p * log p`` at exactly 0 (not NaN) for masked
  classes, which the exact Fisher in EWC sums over.

  Args:
    logits: (B, K) float.
    mask: (B, K) bool, or None for no masking.

  Returns:
    (B, K) logits of the same dtype.
  """
  if mask is None:
    return logits
  return jnp.where(mask, logits, jnp.asarray(-1e9, logits.dtype))


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """Mean softmax cross-entropy over the batch, restricted to the outputs in ``mask``.

  Args:
    logits: (B, K) float.
    labels: (B,) int in [0, K); each label must be inside its example's mask.
    mask: (B, K) bool or None.

  Returns:
    Scalar float32, in nats.
  """
  logits = masked_logits(logits, mask).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy_count(logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """Number of examples whose arg-max over the allowed outputs equals the label; int32 scalar."""
  predictions = jnp.argmax(masked_logits(logits, mask), axis=-1)
  return jnp.sum(predictions == labels, dtype=jnp.int32)


def concatenate(batches: Sequence[Batch]) -> Batch:
  """Concatenates host batches (e.g. several tasks' data) along the example axis."""
  if not batches:
    raise ValueError('concatenate needs at least one batch')
  return jax.tree.map(lambda *parts: np.concatenate(parts, axis=0), *batches)
