"""Rehearsal: training on stored data of earlier tasks.

`joint` is rehearsal with an unbounded memory: at task t it trains on the union of the training
data of tasks 0..t, the usual multitask upper bound of continual-learning papers (it is not a
continual method: its memory and compute grow with the number of tasks).

`replay` is experience replay with a bounded memory: a reservoir of ``buffer_size`` examples
held in the method state as fixed-shape arrays (so it is checkpointed and restored with the rest
of the state), and a replay minibatch drawn from it at every training step.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cljax import checks
from cljax import core
from cljax.methods import base
from cljax.methods import regularizers


def _all_seen(params, state, data: core.Batch, *, seen: Sequence[core.Batch], apply_fn,
              key) -> core.Batch:
  del params, state, data, apply_fn, key
  return core.concatenate(seen)


def joint() -> base.Method:
  """Multitask upper bound: trains at each task on all training data seen so far.

  Its ``prepare_task`` replaces the task's data by the union of every task's training data up
  to this one; in a `chain` put it first, so later members see the union.
  """
  return base.Method(
      init=lambda params: base.EmptyState(),
      loss=base.no_loss,
      gradient_transform=base.identity_transform,
      end_task=base.keep_state,
      prepare_task=_all_seen,
  )


class ReplayState(NamedTuple):
  """The replay buffer.

  Attributes:
    x: (M, *input_shape) float32, stored inputs; M = buffer_size.
    y: (M,) int32, stored labels.
    mask: (M, K) bool, stored output masks.
    seen: int32 scalar, examples of the stream offered to the reservoir so far; slots
      ``[0, min(seen, M))`` are filled.

  The keys come from the loop: replay sampling from each step's key, reservoir draws from
  `end_task`'s.
  """

  x: jax.Array
  y: jax.Array
  mask: jax.Array
  seen: jax.Array


def reservoir_draws(key: jax.Array, seen: int, n: int) -> jax.Array:
  """Vitter's random indices for examples ``seen .. seen + n - 1``: j_i ~ U{0, ..., seen + i}.

  Args:
    key: a PRNG key.
    seen: examples offered before these.
    n: examples offered now.

  Returns:
    (n,) int32.
  """
  stop = seen + jnp.arange(n, dtype=jnp.int32) + 1
  return jax.random.randint(key, (n,), 0, stop, dtype=jnp.int32)


def reservoir_slots(seen: int, draws: np.ndarray, buffer_size: int) -> np.ndarray:
  """For each slot of the buffer, the example (index into this batch) that ends in it, or -1.

  Algorithm R (Vitter 1985) over a stream in which ``seen`` examples came before: example i
  (stream index n = seen + i) fills slot n while the reservoir is not full; afterwards it
  replaces slot j_i = ``draws[i]`` if j_i < buffer_size and is dropped otherwise. When several
  examples of the batch land in one slot the last one wins, exactly as if they had been inserted
  one at a time, so the reservoir stays a uniform sample of all examples seen.

  Args:
    seen: examples offered before this batch.
    draws: (n,) ints with draws[i] in [0, seen + i] (see `reservoir_draws`).
    buffer_size: M >= 0.

  Returns:
    (M,) int64: the batch index stored in each slot, or -1 where the slot keeps its content.
  """
  draws = np.asarray(draws, dtype=np.int64)
  stream = seen + np.arange(draws.shape[0], dtype=np.int64)
  slot = np.where(stream < buffer_size, stream, draws)
  keep = slot < buffer_size
  source = np.full((buffer_size,), -1, dtype=np.int64)
  # The last writer of a slot is the largest batch index landing in it (ufunc.at handles repeats).
  np.maximum.at(source, slot[keep], np.flatnonzero(keep))
  return source


def replay_batch(state: ReplayState, key: jax.Array, size: int) -> core.Batch:
  """``size`` examples drawn uniformly with replacement from the filled part of the buffer.

  Returns a `Batch` of device arrays; when the buffer is empty it holds slot 0's placeholder
  content, which callers must ignore (see `replay`'s loss).
  """
  filled = jnp.minimum(state.seen, state.y.shape[0])
  idx = jax.random.randint(key, (size,), 0, jnp.maximum(filled, 1))
  return core.Batch(state.x[idx], state.y[idx], state.mask[idx])


def replay(
    *,
    buffer_size: int = 1000,
    input_shape: Sequence[int] | None = None,
    num_outputs: int = 0,
    replay_batch_size: int = 32,
    strength: float = 1.0,
    seed: int = 0,
) -> base.Method:
  """Experience replay with a reservoir buffer of at most ``buffer_size`` examples in total.

  Batch composition: each training step sees the current task's batch of B examples (its
  cross-entropy is the training loop's term) and ``replay_batch_size`` = R examples drawn
  uniformly, with replacement, from the buffer with the step's key; the loss term is
  ``strength`` times the mean cross-entropy of the replay examples (each under its own stored
  mask). With strength 1 the step minimizes CE(current) + CE(replay), the usual ER objective
  (the two means weighted equally, whatever B and R). The term is 0 while the buffer is empty
  (the first task).

  After each task its training examples are offered to the reservoir in order (each example
  once, whatever the number of epochs): Algorithm R keeps a uniform random sample of every
  example seen so far, never more than ``buffer_size`` of them.

  The state's shapes are fixed at ``init``, so the input shape and output count are
  hyperparameters; a task whose data do not match raises. In an experiment both are filled in:
  the input shape from the stream (`cljax.methods.get`), the output count from the model.

  Args:
    buffer_size: M >= 0, examples stored in total (0 turns replay off).
    input_shape: the shape of one input, e.g. (28, 28, 1); required when building replay
      directly (`cljax.methods.get(..., input_shape=...)` and experiments pass the stream's).
    num_outputs: K, the model's output size (masks are (K,)); 0 infers it from the ``head``
      layer (see `cljax.methods.regularizers.infer_num_outputs`).
    replay_batch_size: R >= 1, replay examples per step.
    strength: weight of the replay term, >= 0.
    seed: seeds the reservoir and the replay sampling.

  Raises:
    ValueError: buffer_size < 0, an empty or non-positive input_shape, num_outputs < 0,
      replay_batch_size < 1, a negative or non-finite strength; from ``end_task``, task data
      whose input shape or mask width differ from the state's.

  References:
    Vitter, "Random sampling with a reservoir", ACM TOMS 1985 (Algorithm R).
    Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", arXiv 1902.10486 (2019)
    (experience replay with a reservoir buffer).
  """
  checks.integer('replay.buffer_size', buffer_size, minimum=0)
  shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
  if not shape or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                          for d in shape):
    raise ValueError(f'replay.input_shape must be a non-empty sequence of positive ints (the '
                     f'shape of one input, e.g. (28, 28, 1); experiments fill it in from their '
                     f'stream), got {input_shape!r}')
  checks.integer('replay.num_outputs', num_outputs, minimum=0)
  checks.integer('replay.replay_batch_size', replay_batch_size, minimum=1)
  checks.non_negative('replay.strength', strength)
  shape = tuple(int(d) for d in shape)

  def init(params):
    k = num_outputs or regularizers.infer_num_outputs(params, name='replay.num_outputs')
    return ReplayState(
        x=jnp.zeros((buffer_size, *shape), jnp.float32),
        y=jnp.zeros((buffer_size,), jnp.int32),
        mask=jnp.ones((buffer_size, k), bool),
        seen=jnp.zeros((), jnp.int32))

  def loss(params, state, batch, *, logits, apply_fn, key):
    del batch, logits
    if buffer_size == 0:
      return jnp.zeros((), jnp.float32)
    memory = replay_batch(state, jax.random.fold_in(key, seed), replay_batch_size)
    ce = core.cross_entropy(apply_fn(params, memory.x, train=True), memory.y, memory.mask)
    return jnp.where(state.seen > 0, strength * ce, 0.0)

  def end_task(params, state, task_data, *, apply_fn, key):
    del params, apply_fn
    x, y = np.asarray(task_data.x), np.asarray(task_data.y)
    if y.ndim != 1:
      raise ValueError(f'replay stores one label per example; the task\'s labels are {y.shape} '
                       '(per-token labels are not supported yet)')
    mask = (np.ones((len(y), state.mask.shape[1]), bool) if task_data.mask is None
            else np.asarray(task_data.mask))
    if x.shape[1:] != shape:
      raise ValueError(f'replay.input_shape is {shape} but the task\'s inputs are {x.shape[1:]}')
    if mask.shape[1:] != state.mask.shape[1:]:
      raise ValueError(f'replay.num_outputs: the buffer stores {state.mask.shape[1]} outputs but '
                       f'the task\'s masks have {mask.shape[1]}')
    draw_key = jax.random.fold_in(key, seed)
    seen = int(state.seen)
    if seen + len(y) > np.iinfo(np.int32).max:
      raise OverflowError('replay: more than 2**31 - 1 examples offered to the reservoir')
    source = reservoir_slots(seen, np.asarray(reservoir_draws(draw_key, seen, len(y))),
                             buffer_size)
    write = source >= 0
    take = np.where(write, source, 0)

    def put(stored, new):
      w = write.reshape((-1,) + (1,) * (new.ndim - 1))
      return jnp.where(w, jnp.asarray(new[take], stored.dtype), stored)

    return ReplayState(put(state.x, x), put(state.y, y), put(state.mask, mask),
                       jnp.asarray(seen + len(y), jnp.int32))

  return base.Method(init=init, loss=loss, gradient_transform=base.identity_transform,
                     end_task=end_task)
