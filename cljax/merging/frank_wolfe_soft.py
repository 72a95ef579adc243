"""FW-Merging, soft variant (Chen et al. 2025): Frank-Wolfe iterations whose linear oracle picks
one model per task and whose step is a learned (AdaMerging) combination of the picks.

cljax's `static.frank_wolfe` is the hard variant: each step moves towards one picked model by
the fixed step 2 / (t + 2). The soft variant differs in both the oracle and the step; per
iteration s = 0 .. num_iterations - 1, from theta_0 = the base:

  1. For each task t in turn: g_t = grad of ``loss_fns[t]`` (a labelled proxy loss of task t)
     at theta_s; pick the model, among those not yet picked in this iteration, minimising
     sum_l cos(g_t^l, x_i^l) over the merged leaves l, with x_i the model's weights
     (``score_on='checkpoints'``, the authors' code) or its task vector theta_i - theta_base
     (``'task_vectors'``, cljax's hard variant). Stop when every model is picked.
  2. Step, ``merge_fn='adamerging'`` (the authors' default): layer-wise AdaMerging with
     theta_s as the base and the picks as the finetuned models (task vectors
     theta_pick - theta_s), coefficients initialised to 0.3 at s = 0 and to ``ada_init``
     (1e-8) after, trained by entropy minimisation on the unlabelled ``test_inputs``
     (`cljax.merging.adamerging`); ``'task_arithmetic'``: theta_{s+1} = theta_s +
     0.3 gamma_s sum_picks (theta_pick - theta_s), gamma_0 = 1,
     gamma_s = step_size * 2 / (s + 2).

References:
  Chen et al., "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization", arXiv
  2503.12649 (FW-Soft: a soft linear-minimisation oracle whose step is an adaptive merge of
  the selected models).
  FusionBench ``method/fw_merging/fw_soft.py`` (``FrankWolfeSoftAlgorithm``: per-task
  selection of distinct models by summed layer cosine with the raw checkpoints, layer-wise
  AdaMerging with init 0.3 then ada_coeff 1e-8, lr 1e-3; config ``fw_soft.yaml``:
  max_iters 10, ada_iters 500, step_size 0.1).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.merging import adamerging as adalib
from cljax.merging import leafwise
from cljax.merging import task_vectors as tvlib
from cljax.merging import validation

Params = Any
MERGE_FNS = ('adamerging', 'task_arithmetic')
SCORES = ('checkpoints', 'task_vectors')


class SoftFrankWolfeInfo(NamedTuple):
  """What `soft_frank_wolfe_with_info` did.

  Attributes:
    selected: int (num_iterations, k) array, the models picked at each iteration in task order
      (k = min(number of tasks, number of models)).
    entropy: float (num_iterations, ada_steps) AdaMerging losses per iteration
      (``merge_fn='adamerging'``; empty otherwise).
  """

  selected: np.ndarray
  entropy: np.ndarray


def _alignment(grads: list, xs: list) -> float:
  """sum_l cos(g^l, x^l); a zero-norm leaf contributes 0."""
  total = 0.0
  for g, x in zip(grads, xs):
    denom = jnp.linalg.norm(g) * jnp.linalg.norm(x)
    total += float(jnp.where(denom > 0, jnp.vdot(g, x) / jnp.where(denom > 0, denom, 1.0), 0.0))
  return total


def soft_frank_wolfe_with_info(
    base: Params, finetuned: Sequence[Params], *,
    loss_fns: Sequence[Callable[[Params], jax.Array]],
    apply_fn: Union[adalib.ApplyFn, Sequence[adalib.ApplyFn]], test_inputs: Sequence[jax.Array],
    num_iterations: int = 10, merge_fn: str = 'adamerging', ada_steps: int = 500,
    ada_init: float = 1e-8, learning_rate: float = 1e-3, step_size: float = 0.1,
    score_on: str = 'checkpoints', batch_size: Any = None,
    exclude: tvlib.Exclude = None) -> tuple:
  """Soft FW-Merging; returns ``(params, info)``.

  Args:
    base: base params theta_0, a pytree of float arrays.
    finetuned: n >= 1 candidate models with base's structure, shapes and dtypes.
    loss_fns: one differentiable ``loss_fn(params) -> scalar`` per task (labelled data closed
      over; the authors' cross-entropy on training batches), for the oracle's gradients.
    apply_fn, test_inputs: AdaMerging's model function(s) and per-task unlabelled inputs
      (`adamerging.adamerging_with_info`); ``test_inputs`` has one array per task.
    num_iterations: Frank-Wolfe iterations, >= 1 (the authors' 10).
    merge_fn: 'adamerging' or 'task_arithmetic'.
    ada_steps: AdaMerging steps per iteration (the authors' 500).
    ada_init: AdaMerging's initial coefficients after the first iteration (the authors' 1e-8).
    learning_rate: AdaMerging's Adam learning rate (1e-3).
    step_size: the 'task_arithmetic' step's scale, in (0, 1] (the authors' 0.1).
    score_on: 'checkpoints' (the authors') or 'task_vectors'.
    batch_size: AdaMerging's rows per step (None: all).
    exclude: regex(es) of leaves that are not merged (base's value; no score).

  Returns:
    ``(params, info)``: params with base's structure and dtypes, a `SoftFrankWolfeInfo`.

  Raises:
    ValueError: mismatching or non-finite inputs; loss_fns and test_inputs of different lengths or
      not callables; bad num_iterations, merge_fn, score_on or step_size; as AdaMerging.

  References:
    Chen et al., arXiv 2503.12649 (FW-Soft); FusionBench ``FrankWolfeSoftAlgorithm``.
  """
  validation.check_choice(merge_fn, name='merge_fn', choices=MERGE_FNS)
  validation.check_choice(score_on, name='score_on', choices=SCORES)
  step_size = validation.check_interval(step_size, name='step_size', low=0.0, high=1.0,
                                        low_open=True)
  if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 1:
    raise ValueError(f'num_iterations must be an int >= 1; got {num_iterations!r}')
  if not isinstance(loss_fns, Sequence) or not loss_fns or not all(callable(f) for f in loss_fns):
    raise ValueError('loss_fns must be a non-empty sequence of callables (one per task)')
  if isinstance(test_inputs, (str, bytes)) or not isinstance(test_inputs, Sequence) or \
      len(test_inputs) != len(loss_fns):
    raise ValueError(f'test_inputs must hold one array per task ({len(loss_fns)} loss_fns)')
  learning_rate = validation.check_interval(learning_rate, name='learning_rate', low=0.0,
                                            high=float('inf'), low_open=True)
  optimizer = optax.adam(learning_rate)   # one object: every iteration reuses the compiled loop
  p = leafwise.prepare(base, finetuned, exclude, method='soft_frank_wolfe')
  models = list(finetuned)
  candidates = p.models if score_on == 'checkpoints' else p.task_vectors()
  k = min(len(loss_fns), len(models))
  merged = base
  selected, entropy = [], []
  for s in range(num_iterations):
    picks = []
    for loss_fn in loss_fns[:k]:
      grads = tvlib.upcast(tvlib.included_leaves(jax.grad(loss_fn)(merged), p.mask))
      scores = [(_alignment(grads, c), i) for i, c in enumerate(candidates) if i not in picks]
      picks.append(min(scores)[1])
    selected.append(picks)
    chosen = [models[i] for i in picks]
    if merge_fn == 'adamerging':
      merged, info = adalib.adamerging_with_info(
          merged, chosen, apply_fn=apply_fn, test_inputs=test_inputs, granularity='layer',
          init=0.3 if s == 0 else ada_init, num_steps=ada_steps, optimizer=optimizer,
          batch_size=batch_size, exclude=exclude)
      entropy.append(np.asarray(info.loss))
    else:
      gamma = 1.0 if s == 0 else 2.0 / (s + 2) * step_size
      cur = tvlib.upcast(tvlib.included_leaves(merged, p.mask))
      picked = [tvlib.upcast(tvlib.included_leaves(m, p.mask)) for m in chosen]
      leaves = [c + 0.3 * gamma * sum(m[j] - c for m in picked) for j, c in enumerate(cur)]
      merged = leafwise.finish(base, p, leaves, method='soft_frank_wolfe')
  entropy_arr = np.stack(entropy) if entropy else np.zeros((0, 0), np.float32)
  return merged, SoftFrankWolfeInfo(np.asarray(selected, np.int32), entropy_arr)


def soft_frank_wolfe(
    base: Params, finetuned: Sequence[Params], *,
    loss_fns: Sequence[Callable[[Params], jax.Array]],
    apply_fn: Union[adalib.ApplyFn, Sequence[adalib.ApplyFn]], test_inputs: Sequence[jax.Array],
    num_iterations: int = 10, merge_fn: str = 'adamerging', ada_steps: int = 500,
    ada_init: float = 1e-8, learning_rate: float = 1e-3, step_size: float = 0.1,
    score_on: str = 'checkpoints', batch_size: Any = None,
    exclude: tvlib.Exclude = None) -> Params:
  """Soft FW-Merging; `soft_frank_wolfe_with_info` without the record.

  See `soft_frank_wolfe_with_info` for the algorithm, arguments and errors.

  References:
    Chen et al., arXiv 2503.12649 (FW-Soft).
  """
  params, _ = soft_frank_wolfe_with_info(
      base, finetuned, loss_fns=loss_fns, apply_fn=apply_fn, test_inputs=test_inputs,
      num_iterations=num_iterations, merge_fn=merge_fn, ada_steps=ada_steps, ada_init=ada_init,
      learning_rate=learning_rate, step_size=step_size, score_on=score_on,
      batch_size=batch_size, exclude=exclude)
  return params
