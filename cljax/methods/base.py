"""The Method contract for continual training, and `chain`, which composes methods.

A continual-training method is a `Method`: a NamedTuple of pure functions, in the spirit of
`optax.GradientTransformation`. The training loop (`cljax.training`, `cljax.continual`) only ever
calls these functions, so a method never touches the loop and the loop never special-cases a
method. Four fields are required, three are optional hooks (None: not used):

  * ``init(params) -> state``: the method's state before the first task.
  * ``loss(params, state, batch, *, logits, apply_fn, key) -> scalar``: the method's term, added
    to the batch's cross-entropy. ``logits`` are the loop's own training-mode outputs on
    ``batch.x`` (so a term on the outputs, e.g. LwF's distillation, shares the loop's forward and
    backward pass); ``apply_fn`` is the forward pass the step differentiates; ``key`` the step's
    PRNG key. The loop differentiates the term but reports the cross-entropy alone: the term's
    value is never computed in training (for quadratic penalties those per-leaf reductions were
    most of the method's step time).
  * ``gradient_transform(state) -> optax.GradientTransformation``: chained *before* the
    optimizer, e.g. projection of gradients away from a protected subspace. Called *inside* the
    jitted epoch with the state's arrays traced, so one compilation serves every task.
  * ``end_task(params, state, data, *, apply_fn, key) -> state``: consolidation after a task
    (Fisher, anchors, bases, buffers) on the task's own training data (host arrays). Runs
    eagerly on the host; it may call jitted helpers.
  * ``update(state, params, updates, task_grads, *, key) -> state`` (optional): a per-step state
    update inside the jitted loop, e.g. SI's path integral. ``params`` are where the step's
    gradient was taken (after ``intercept``), ``updates`` the optimizer's change from there (reading the new parameters as well would make XLA
    copy every parameter each step), ``task_grads`` the gradients of the cross-entropy alone.
    Without it the step differentiates one combined loss (one backward pass).
  * ``prepare_task(params, state, data, *, seen, apply_fn, key) -> Batch`` (optional): runs
    eagerly once before a task's training, at the task's start. ``data`` is what the task trains
    on so far (the task's own training data, or an earlier method's result in a `chain`), ``seen``
    every task's training data up to and including this one, oldest first. It returns the data to
    train on: `joint` returns all of ``seen``; LwF adds the old model's outputs to ``aux``; GPM
    the inputs projected off its bases. The result must have the same fields for every task.
  * ``intercept(params, state, batch, *, apply_fn, key) -> (params, apply_fn)`` (optional): acts
    inside the forward/backward pass of a step. It returns the parameters the step's gradient is
    taken at and its update applied to (refresh's unlearn step, Wang et al. 2024), and the
    forward pass the step differentiates (GPM projects Dense gradients inside backpropagation;
    it must not change the outputs). Evaluation, ``prepare_task`` and ``end_task`` use the plain
    model.

State is a pytree whose structure, shapes and dtypes are fixed by ``init(params)``: they must not
change from task to task (memory does not grow with the number of tasks, the jitted step never
retraces, and a stage checkpoint restores into ``init(params)``'s structure).

Randomness: the loop hands every hook a key, per step ``fold_in(task_key, step)`` (per task for
``prepare_task`` / ``end_task``), so a method holds no key in its state and a resumed run draws
the same numbers. In a `chain`, member i receives ``fold_in(key, i)``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from cljax.core import ApplyFn, Batch  # pylint: disable=unused-import  (re-exported)

Params = Any
State = Any


class Method(NamedTuple):
  """A continual-training method as pure functions; see the module docstring for the contract."""

  init: Callable[[Params], State]
  loss: Callable[..., jax.Array]
  gradient_transform: Callable[[State], optax.GradientTransformation]
  end_task: Callable[..., State]
  update: Optional[Callable[..., State]] = None
  prepare_task: Optional[Callable[..., Batch]] = None
  intercept: Optional[Callable[..., tuple]] = None


class EmptyState(NamedTuple):
  """State of a method that keeps nothing between tasks."""


def no_loss(params: Params, state: State, batch: Batch, *, logits: jax.Array, apply_fn: ApplyFn,
            key: jax.Array) -> jax.Array:
  """The zero method term."""
  del params, state, batch, logits, apply_fn, key
  return jnp.zeros((), jnp.float32)


def identity_transform(state: State) -> optax.GradientTransformation:
  """Gradients pass through unchanged."""
  del state
  return optax.identity()


def keep_state(params: Params, state: State, data: Batch, *, apply_fn: ApplyFn,
               key: jax.Array) -> State:
  """`end_task` for a method that consolidates nothing."""
  del params, data, apply_fn, key
  return state


def _member_key(key: Any, i: int) -> Any:
  return None if key is None else jax.random.fold_in(key, i)


def chain(*methods: Method) -> Method:
  """One method running every one of ``methods``: losses add up, hooks run in order.

  * state: a tuple of the members' states;
  * ``loss``: the sum of the members' terms, all on the same logits;
  * ``gradient_transform``: ``optax.chain`` of the members' transforms, in order;
  * ``prepare_task``: the members' hooks in order, each on the data the previous returned
    (``chain(joint(), lwf())`` records the teacher's outputs on all seen data);
  * ``intercept``: the members' hooks in order, each on the previous one's parameters and
    forward pass (in ``chain(gpm(), refresh(...))`` refresh's ascent gradient comes through GPM's
    projected backward pass, but its displacement is not passed through any gradient transform:
    frozen or protected directions can move by it);
  * ``update`` (present when any member has one) and ``end_task``: each member on its own state.

  Member i receives ``fold_in(key, i)`` as its key, so members draw independent numbers (a
  chain of one method is that method, with the key unfolded).

  Raises:
    ValueError: no methods, or an argument that is not a `Method`.
  """
  if not methods:
    raise ValueError('chain needs at least one method')
  for i, m in enumerate(methods):
    if not isinstance(m, Method):
      raise ValueError(f'chain argument {i} is a {type(m).__name__}, not a cljax Method')
  if len(methods) == 1:
    return methods[0]
  members = tuple(enumerate(methods))

  def init(params):
    return tuple(m.init(params) for m in methods)

  def loss(params, state, batch, *, logits, apply_fn, key):
    return sum(m.loss(params, s, batch, logits=logits, apply_fn=apply_fn, key=_member_key(key, i))
               for (i, m), s in zip(members, state))

  def gradient_transform(state):
    return optax.chain(*(m.gradient_transform(s) for m, s in zip(methods, state)))

  def end_task(params, state, data, *, apply_fn, key):
    return tuple(m.end_task(params, s, data, apply_fn=apply_fn, key=_member_key(key, i))
                 for (i, m), s in zip(members, state))

  def update(state, params, updates, task_grads, *, key):
    return tuple(s if m.update is None else
                 m.update(s, params, updates, task_grads, key=_member_key(key, i))
                 for (i, m), s in zip(members, state))

  def prepare_task(params, state, data, *, seen, apply_fn, key):
    for (i, m), s in zip(members, state):
      if m.prepare_task is not None:
        data = m.prepare_task(params, s, data, seen=seen, apply_fn=apply_fn,
                              key=_member_key(key, i))
    return data

  def intercept(params, state, batch, *, apply_fn, key):
    for (i, m), s in zip(members, state):
      if m.intercept is not None:
        params, apply_fn = m.intercept(params, s, batch, apply_fn=apply_fn,
                                       key=_member_key(key, i))
    return params, apply_fn

  def has(field: str) -> bool:
    return any(getattr(m, field) is not None for m in methods)

  return Method(init=init, loss=loss, gradient_transform=gradient_transform, end_task=end_task,
                update=update if has('update') else None,
                prepare_task=prepare_task if has('prepare_task') else None,
                intercept=intercept if has('intercept') else None)

