"""The one registry of merge methods: name -> function, its kind and the data it needs.

Every merge is registered once in `REGISTRY` as a `MergeMethod`:

  * ``kind='static'``: ``fn(base, finetuned, *, <inputs>, <hyperparameters>, exclude) -> Params``;
  * ``kind='continual'``: ``fn(*, <hyperparameters>, exclude) -> ContinualMerge``
    (``init`` / ``update`` / ``params``, see `cljax.merging.continual`);
  * ``kind='per_task'``: ``fn(base, finetuned, *, <inputs>, <hyperparameters>, exclude) ->
    task_model``, ``task_model(t) -> Params`` task t's model (EMR-Merging: one unified task
    vector with a mask and a rescaler per task, `emr_per_task`).

Its hyperparameters are the keyword-only parameters of ``fn`` (read from the signature, as
`cljax.methods.get` does), minus ``exclude`` (every merge takes it; it is the caller's choice of
leaves, not a method setting) and minus the entry's ``inputs``: keyword arguments that are data,
not settings, which the caller supplies (`INPUTS` describes each). A merge is data-free when it
needs no input but a PRNG key. ``blockwise`` says whether a tensor may be merged in row
blocks (`cljax-merge` streams such merges block by block; the others get whole tensors). The
merge experiment (configs name hyperparameters
``<method>.<key>``) and `cljax-merge`'s recipes both look merges up here.

References: see the registered functions (`cljax.merging.static`, `cljax.merging.continual`,
`cljax.merging.slerp`, `model_stock`, `sparsify`, `tsv`, `iso`, `consensus`, `wudi`, `emr`,
`regmean`, `adamerging`, `frank_wolfe_soft`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

from cljax.merging import adamerging
from cljax.merging import consensus
from cljax.merging import continual
from cljax.merging import emr
from cljax.merging import frank_wolfe_soft
from cljax.merging import iso
from cljax.merging import model_stock
from cljax.merging import regmean
from cljax.merging import slerp
from cljax.merging import sparsify
from cljax.merging import static
from cljax.merging import task_vectors as tvlib
from cljax.merging import tsv
from cljax.merging import wudi

Params = Any
KINDS = ('static', 'continual', 'per_task')
# The data inputs a merge may take, by keyword: the caller supplies them, configs never do.
INPUTS = {
    'key': 'a jax PRNG key (DARE drop masks; TIES sampled thresholds; DELLA MagPrune masks)',
    'fishers': 'per finetuned model its diagonal Fisher information, a pytree like base',
    'loss_fn': 'loss_fn(params) -> scalar, the objective Frank-Wolfe minimises',
    'init_params': "Frank-Wolfe's starting point, a pytree like base (default: base)",
    'grams': "per finetuned model {kernel path: (in, in) Gram of the layer's inputs} (RegMean)",
    'apply_fn': 'apply_fn(params, x) -> logits (B, K), or one per task (AdaMerging, soft FW)',
    'test_inputs': 'per task an array (N_t, ...) of unlabelled test inputs (AdaMerging, soft FW)',
    'loss_fns': "per task loss_fn(params) -> scalar on labelled data (soft Frank-Wolfe's oracle)",
}
_COMMON = ('exclude',)


class MergeMethod(NamedTuple):
  """One registered merge.

  Attributes:
    fn: the merge (static) or its constructor (continual); hyperparameters keyword-only.
    kind: 'static', 'continual' or 'per_task'.
    inputs: keywords of ``fn`` that are data supplied by the caller (keys of `INPUTS`).
    blockwise: a tensor may be merged in row blocks, each block on its own, with the result of
      the whole tensor: True for the elementwise merges (TIES given its trim thresholds, DARE
      given per-block keys, which `cljax-merge` supplies); False for merges with a per-tensor
      step (norms, ranks, SVDs, solves, optimisations) and for continual_ties and OPCM.
  """

  fn: Callable[..., Any]
  kind: str
  inputs: tuple = ()
  blockwise: bool = True

  @property
  def hparams(self) -> dict:
    """{name: default} of the hyperparameters (``inspect.Parameter.empty`` when required)."""
    return {k: p.default for k, p in inspect.signature(self.fn).parameters.items()
            if p.kind == p.KEYWORD_ONLY and k not in self.inputs and k not in _COMMON}

  @property
  def required_inputs(self) -> tuple:
    """The inputs ``fn`` cannot run without (no default in its signature)."""
    params = inspect.signature(self.fn).parameters
    return tuple(k for k in self.inputs if params[k].default is inspect.Parameter.empty)

  @property
  def data_free(self) -> bool:
    """True when the merge needs nothing but the models, its hyperparameters and a key."""
    return all(k == 'key' for k in self.required_inputs)


def emr_per_task(base: Params, finetuned: Sequence[Params], *,
                 exclude: tvlib.Exclude = None) -> Callable[[int], Params]:
  """EMR-Merging as a per-task merge: the elected unified task vector and each task's modulator.

  Args:
    base: base params theta_0, a pytree of float arrays.
    finetuned: T >= 1 params pytrees with base's structure, shapes and dtypes.
    exclude: regex(es) of leaves that are not merged (base's value is kept).

  Returns:
    ``task_model(t) -> Params``: ``theta_0 + lambda_t * M_t * tau_uni`` for task t in [0, T),
    in base's structure and dtypes (`cljax.merging.emr.emr_task_model`).

  Raises:
    ValueError: as `cljax.merging.emr.emr` (mismatching inputs, a task whose masked unified
      vector is 0); ``task_model`` raises for a task out of range.

  References:
    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024.
  """
  result = emr.emr(base, finetuned, exclude=exclude)
  return lambda t: emr.emr_task_model(base, result, t)


REGISTRY: dict[str, MergeMethod] = {
    'average': MergeMethod(static.average, 'static'),
    'task_arithmetic': MergeMethod(static.task_arithmetic, 'static'),
    'ties': MergeMethod(static.ties, 'static', inputs=('key',)),
    'dare_task_arithmetic': MergeMethod(static.dare_task_arithmetic, 'static', inputs=('key',)),
    'dare_ties': MergeMethod(static.dare_ties, 'static', inputs=('key',)),
    'fisher': MergeMethod(static.fisher, 'static', inputs=('fishers',)),
    'magmax': MergeMethod(static.magmax, 'static'),
    'frank_wolfe': MergeMethod(static.frank_wolfe, 'static', inputs=('loss_fn', 'init_params'),
                               blockwise=False),
    'slerp': MergeMethod(slerp.slerp, 'static', blockwise=False),
    'nuslerp': MergeMethod(slerp.nuslerp, 'static', blockwise=False),
    'multislerp': MergeMethod(slerp.multislerp, 'static', blockwise=False),
    'model_stock': MergeMethod(model_stock.model_stock, 'static', blockwise=False),
    'breadcrumbs': MergeMethod(sparsify.breadcrumbs, 'static', blockwise=False),
    'della': MergeMethod(sparsify.della, 'static', inputs=('key',), blockwise=False),
    'tsv': MergeMethod(tsv.tsv, 'static', blockwise=False),
    'iso_c': MergeMethod(iso.iso_c, 'static', blockwise=False),
    'iso_cts': MergeMethod(iso.iso_cts, 'static', blockwise=False),
    'consensus': MergeMethod(consensus.consensus, 'static', blockwise=False),
    'wudi': MergeMethod(wudi.wudi, 'static', blockwise=False),
    'regmean': MergeMethod(regmean.regmean, 'static', inputs=('grams',), blockwise=False),
    'adamerging': MergeMethod(adamerging.adamerging, 'static',
                              inputs=('apply_fn', 'test_inputs'), blockwise=False),
    'soft_frank_wolfe': MergeMethod(frank_wolfe_soft.soft_frank_wolfe, 'static',
                                    inputs=('loss_fns', 'apply_fn', 'test_inputs'),
                                    blockwise=False),
    'emr': MergeMethod(emr_per_task, 'per_task', blockwise=False),
    'continual_average': MergeMethod(continual.continual_average, 'continual'),
    'continual_task_arithmetic': MergeMethod(continual.continual_task_arithmetic, 'continual'),
    'continual_ties': MergeMethod(continual.continual_ties, 'continual', blockwise=False),
    'opcm': MergeMethod(continual.opcm, 'continual', blockwise=False),
}


def names(kind: Optional[str] = None) -> list:
  """The registered names (of one kind: 'static', 'continual' or 'per_task'), sorted."""
  return sorted(n for n, m in REGISTRY.items() if kind is None or m.kind == kind)


def get(name: str, *, kind: Optional[str] = None) -> MergeMethod:
  """The registered merge ``name``.

  Args:
    name: a key of `REGISTRY`.
    kind: if given, the kind the caller needs ('static', 'continual' or 'per_task').

  Returns:
    Its `MergeMethod`.

  Raises:
    ValueError: an unknown name (or one of another kind), listing the choices.
  """
  if kind is not None and kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}; got {kind!r}')
  entry = REGISTRY.get(name)
  if entry is None or (kind is not None and entry.kind != kind):
    raise ValueError(f'unknown {kind + " " if kind else ""}merge {name!r}; choose from '
                     f'{names(kind)}')
  return entry


def check_names(name: str, hparams: Optional[Mapping[str, Any]] = None, *,
                kind: Optional[str] = None) -> MergeMethod:
  """Checks a merge name and its hyperparameters' names (not their values).

  Args:
    name: a key of `REGISTRY`.
    hparams: hyperparameters by keyword (a config's ``<name>`` block).
    kind: if given, the kind the caller needs.

  Returns:
    The `MergeMethod`.

  Raises:
    ValueError: an unknown name, or hyperparameters the merge does not take, named
      ``<name>.<key>`` (an input such as ``key`` is not a hyperparameter either).
  """
  entry = get(name, kind=kind)
  accepted = entry.hparams
  unknown = sorted(set(hparams or {}) - set(accepted))
  if unknown:
    raise ValueError(f'unknown hyperparameter(s) {", ".join(f"{name}.{k}" for k in unknown)}; '
                     f'{name} takes {sorted(accepted) or "none"}')
  return entry


def _given_inputs(name: str, entry: MergeMethod, inputs: Optional[Mapping[str, Any]]) -> dict:
  """The inputs ``entry`` takes from ``inputs`` (None counts as absent); raises for missing ones."""
  given = {k: v for k, v in (inputs or {}).items() if k in entry.inputs and v is not None}
  missing = [k for k in entry.required_inputs if k not in given]
  if missing:
    raise ValueError(f'merge {name!r} needs input(s) {", ".join(missing)} '
                     f'({"; ".join(INPUTS[k] for k in missing)})')
  return given


def merge(name: str, base: Params, finetuned: Sequence[Params], *,
          hparams: Optional[Mapping[str, Any]] = None, exclude: Any = None,
          inputs: Optional[Mapping[str, Any]] = None) -> Params:
  """Runs the static merge ``name``.

  Args:
    name: a static key of `REGISTRY`.
    base: base params pytree.
    finetuned: n >= 1 pytrees with base's structure, shapes and dtypes.
    hparams: the merge's hyperparameters by keyword.
    exclude: regex(es) of leaves that are not merged.
    inputs: data by `INPUTS` keyword; those the merge takes are passed (None counts as absent),
      the others ignored, so a caller may offer everything it has.

  Returns:
    The merged params (base's structure and dtypes).

  Raises:
    ValueError: an unknown name or hyperparameter (``<name>.<key>``), a required input missing
      (naming it), or what the merge raises.
  """
  return _call(name, 'static', base, finetuned, hparams, exclude, inputs)


def per_task_merge(name: str, base: Params, finetuned: Sequence[Params], *,
                   hparams: Optional[Mapping[str, Any]] = None, exclude: Any = None,
                   inputs: Optional[Mapping[str, Any]] = None) -> Callable[[int], Params]:
  """Runs the per-task merge ``name`` (one model per task, e.g. EMR-Merging).

  Args:
    name: a per_task key of `REGISTRY`.
    base: base params pytree.
    finetuned: T >= 1 pytrees with base's structure, shapes and dtypes (task t's is the t-th).
    hparams: the merge's hyperparameters by keyword.
    exclude: regex(es) of leaves that are not merged.
    inputs: data by `INPUTS` keyword, as `merge`.

  Returns:
    ``task_model(t) -> Params``, task t's model (base's structure and dtypes).

  Raises:
    ValueError: an unknown name or hyperparameter (``<name>.<key>``), a required input missing
      (naming it), or what the merge raises.
  """
  return _call(name, 'per_task', base, finetuned, hparams, exclude, inputs)


def _call(name, kind, base, finetuned, hparams, exclude, inputs):
  """`merge` / `per_task_merge`: check the name and hyperparameters, pass the inputs it takes."""
  entry = check_names(name, hparams, kind=kind)
  given = _given_inputs(name, entry, inputs)
  return entry.fn(base, finetuned, exclude=exclude, **given, **dict(hparams or {}))


def continual_merge(name: str, *, hparams: Optional[Mapping[str, Any]] = None,
                    exclude: Any = None) -> continual.ContinualMerge:
  """Builds the continual merge ``name``.

  Args:
    name: a continual key of `REGISTRY`.
    hparams: its hyperparameters by keyword.
    exclude: regex(es) of leaves that are not merged.

  Returns:
    A `ContinualMerge` (``init`` / ``update`` / ``params``).

  Raises:
    ValueError: an unknown name or hyperparameter (``<name>.<key>``), or a bad value (from the
      constructor).
  """
  entry = check_names(name, hparams, kind='continual')
  return entry.fn(exclude=exclude, **dict(hparams or {}))
