"""The starting point of a continual run: random init, a Hugging Face folder, or a pretraining stage.

Continual-pretraining papers start from a pretrained model. A config says where it comes from:

- ``config.init_from``: a local Hugging Face model folder (`cljax.models.from_pretrained`), e.g. one
  a previous run wrote; ``config.model`` / ``model_kwargs`` are then not used.
- ``config.pretrain.domains``: text domains (names of `cljax.data.text.DOMAINS` or
  ``stream_kwargs.files`` entries) to pretrain ``config.model`` on, with plain fine-tuning, before the
  stream. The result is written once to ``<workdir>/pretrained/`` as a Hugging Face folder (so
  `transformers`, `cljax-merge` and later runs can read it) with ``pretrain.json`` (its losses and
  held-out NLL); every method of the run, and a resumed run, starts from that folder.
- neither: ``config.model`` initialised from ``config.seed``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from cljax import checks
from cljax import core
from cljax import methods as methods_lib
from cljax import models
from cljax import sharding
from cljax import training
from cljax.data import streams

FOLDER = 'pretrained'
SUMMARY = 'pretrain.json'


def wanted(config: ml_collections.ConfigDict) -> bool:
  """Whether the run has a pretraining stage."""
  return bool(config.get('pretrain') and config.pretrain.domains) and not config.get('init_from')


def check(config: ml_collections.ConfigDict) -> None:
  """Checks ``init_from`` / ``pretrain`` before anything is written.

  Raises:
    ValueError: both ``init_from`` and ``pretrain.domains`` set, pretraining with a stream that is
      not a text stream, or a bad ``pretrain.*`` value (naming the key).
    FileNotFoundError: ``init_from`` is not a folder with a ``config.json``.
  """
  init_from, block_ = config.get('init_from', ''), config.get('pretrain')
  if init_from and block_ and block_.domains:
    raise ValueError('config.init_from and config.pretrain.domains are both set: start from the '
                     'folder or pretrain, not both')
  if init_from and not os.path.isfile(os.path.join(init_from, 'config.json')):
    raise FileNotFoundError(f'config.init_from={init_from!r} is not a Hugging Face model folder '
                            '(no config.json)')
  if not wanted(config):
    return
  if config.stream not in streams.DATASET_FREE:
    raise ValueError(f'config.pretrain.domains pretrains on text, but config.stream='
                     f'{config.stream!r} is not a text stream ({sorted(streams.DATASET_FREE)})')
  checks.integer('pretrain.epochs', block_.epochs, minimum=1)
  checks.integer('pretrain.max_tokens', block_.max_tokens, minimum=2)
  checks.integer('pretrain.batch_size', block_.batch_size, minimum=0)
  checks.positive('pretrain.learning_rate', block_.learning_rate)


def _stream_kwargs(config: ml_collections.ConfigDict) -> dict:
  kwargs = dict(config.stream_kwargs)
  kwargs.pop('domains', None)
  kwargs['max_tokens'] = config.pretrain.max_tokens
  return kwargs


def pretraining_data(config: ml_collections.ConfigDict) -> streams.Stream:
  """The pretraining domains as a text stream (one task per domain), tokenized as the run's stream."""
  domains = tuple(config.pretrain.domains)
  return streams.make_stream(config.stream, None, num_tasks=len(domains), seed=config.seed,
                             scenario=config.scenario or None, domains=domains,
                             **_stream_kwargs(config))


def _pretrain(config: ml_collections.ConfigDict, num_outputs: int, mesh, folder: str) -> None:
  """Trains ``config.model`` on the pretraining domains and saves it to ``folder`` atomically."""
  stream = pretraining_data(config)
  if stream.num_outputs > num_outputs:
    raise ValueError(f'config.pretrain.domains tokenize to {stream.num_outputs} ids but the '
                     f'stream has {num_outputs}')
  module = models.make_model(config.model, num_outputs=num_outputs, **dict(config.model_kwargs))
  apply_fn = models.linen_apply_fn(module)
  params = models.init_params(module, jax.random.key(config.seed), stream.input_shape)
  data = core.concatenate([t.train for t in stream.tasks])
  method = methods_lib.get('finetune', {})
  optimizer = training.make_optimizer(config.pretrain.optimizer,
                                      learning_rate=config.pretrain.learning_rate)
  started = time.time()
  result = training.fit_task(apply_fn, method, optimizer, params, method.init(params), data,
                             epochs=config.pretrain.epochs,
                             batch_size=config.pretrain.batch_size or config.batch_size,
                             seed=config.seed, mesh=mesh, key=jax.random.key(config.seed))
  wall = time.time() - started
  evaluator = training.Evaluator(apply_fn, [t.test for t in stream.tasks],
                                 batch_size=config.eval_batch_size, mesh=mesh)
  ev = evaluator.evaluate_all(result.params)
  tmp = folder + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)  # A stage killed while saving left it half-written.
  models.save_pretrained(tmp, jax.device_get(result.params), like=module)
  summary = dict(domains=list(config.pretrain.domains), train_examples=int(data.size),
                 steps=int(len(result.losses)), first_loss=float(result.losses[0]),
                 final_loss=float(np.mean(result.losses[-10:])), wall_time_s=wall,
                 test_nll=[float(v) for v in ev.nll], test_accuracy=[float(v) for v in ev.accuracy])
  with open(os.path.join(tmp, SUMMARY), 'w') as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, folder)


def starting_folder(config: ml_collections.ConfigDict, workdir: str, *, num_outputs: int,
                    mesh) -> Optional[str]:
  """The Hugging Face folder every method starts from, pretraining it first if needed.

  Returns:
    ``config.init_from``; or ``<workdir>/pretrained`` (trained now unless already there) when
    ``config.pretrain.domains`` is set; or None (random init).
  """
  if config.get('init_from'):
    return config.init_from
  if not wanted(config):
    return None
  folder = os.path.join(workdir, FOLDER)
  if not os.path.isfile(os.path.join(folder, 'config.json')):
    _pretrain(config, num_outputs, mesh, folder)
  return folder


def load(folder: str) -> tuple[Any, Any]:
  """``(apply_fn, params)`` of a starting folder (float32 master params)."""
  return models.from_pretrained(folder)
