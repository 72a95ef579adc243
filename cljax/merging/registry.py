"""The one registry of merge methods: name -> function, its kind and the data it needs.

Every merge is registered once in `REGISTRY` as a `MergeMethod`:

  * ``kind='static'``: ``fn(base, finetuned, *, <inputs>, <hyperparameters>, exclude) -> Params``;
  * ``kind='continual'``: ``fn(*, <hyperparameters>, exclude) -> ContinualMerge``
    (``init`` / ``update`` / ``params``, see `cljax.merging.continual`).

Its hyperparameters are the keyword-only parameters of ``fn`` (read from the signature, as
`cljax.methods.get` does), minus ``exclude`` (every merge takes it; it is the caller's choice of
leaves, not a method setting) and minus the entry's ``inputs``: keyword arguments that are data,
not settings, which the caller supplies (`INPUTS` describes each). A merge is data-free when it
needs no input but a PRNG key. The merge experiment (configs name hyperparameters
``<method>.<key>``) and `cljax-merge`'s recipes both look merges up here.

References: see the registered functions (`cljax.merging.static`, `cljax.merging.continual`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

from cljax.merging import continual
from cljax.merging import static

Params = Any
KINDS = ('static', 'continual')
# The data inputs a merge may take, by keyword: the caller supplies them, configs never do.
INPUTS = {
    'key': 'a jax PRNG key (DARE drop masks; TIES sampled thresholds)',
    'fishers': 'per finetuned model its diagonal Fisher information, a pytree like base',
    'loss_fn': 'loss_fn(params) -> scalar, the objective Frank-Wolfe minimises',
    'init_params': "Frank-Wolfe's starting point, a pytree like base (default: base)",
}
_COMMON = ('exclude',)


class MergeMethod(NamedTuple):
  """One registered merge.

  Attributes:
    fn: the merge (static) or its constructor (continual); hyperparameters keyword-only.
    kind: 'static' or 'continual'.
    inputs: keywords of ``fn`` that are data supplied by the caller (keys of `INPUTS`).
  """

  fn: Callable[..., Any]
  kind: str
  inputs: tuple = ()

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


REGISTRY: dict[str, MergeMethod] = {
    'average': MergeMethod(static.average, 'static'),
    'task_arithmetic': MergeMethod(static.task_arithmetic, 'static'),
    'ties': MergeMethod(static.ties, 'static', inputs=('key',)),
    'dare_task_arithmetic': MergeMethod(static.dare_task_arithmetic, 'static', inputs=('key',)),
    'dare_ties': MergeMethod(static.dare_ties, 'static', inputs=('key',)),
    'fisher': MergeMethod(static.fisher, 'static', inputs=('fishers',)),
    'magmax': MergeMethod(static.magmax, 'static'),
    'frank_wolfe': MergeMethod(static.frank_wolfe, 'static', inputs=('loss_fn', 'init_params')),
    'continual_average': MergeMethod(continual.continual_average, 'continual'),
    'continual_task_arithmetic': MergeMethod(continual.continual_task_arithmetic, 'continual'),
    'continual_ties': MergeMethod(continual.continual_ties, 'continual'),
    'opcm': MergeMethod(continual.opcm, 'continual'),
}


def names(kind: Optional[str] = None) -> list:
  """The registered names (of one kind: 'static' or 'continual'), sorted."""
  return sorted(n for n, m in REGISTRY.items() if kind is None or m.kind == kind)


def get(name: str, *, kind: Optional[str] = None) -> MergeMethod:
  """The registered merge ``name``.

  Args:
    name: a key of `REGISTRY`.
    kind: if given, the kind the caller needs ('static' or 'continual').

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
  entry = check_names(name, hparams, kind='static')
  given = {k: v for k, v in (inputs or {}).items() if k in entry.inputs and v is not None}
  missing = [k for k in entry.required_inputs if k not in given]
  if missing:
    raise ValueError(f'merge {name!r} needs input(s) {", ".join(missing)} '
                     f'({"; ".join(INPUTS[k] for k in missing)})')
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
