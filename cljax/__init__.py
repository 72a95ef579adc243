"""cljax: continual learning and model merging for JAX.

The public modules (algorithms are pure and import neither Orbax, TFDS, absl nor matplotlib):

  cljax.core        Batch, losses and evaluation sums over (B,) or (B, L) labels
  cljax.tree        parameter paths and regex selection over them
  cljax.methods     continual-training methods (the `Method` contract, `chain`) by name
  cljax.merging     task vectors, static merges, continual merges (init/update/params)
  cljax.subspace    SVD bases by energy threshold, GPM basis growth, projections
  cljax.fisher      diagonal Fisher information (EWC, Fisher merging)
  cljax.metrics     ACC, BWT, FWT, forgetting from the accuracy matrix
  cljax.models      bundled Flax Linen models and the (apply_fn, params) pair
  cljax.training    fit_task (jitted, scanned epochs) and evaluation
  cljax.continual   run_stream: the per-task order (prepare, fit, end_task, evaluate, save)
  cljax.sharding    device meshes, parameter sharding rules, process-local batches
  cljax.data        real data sources and continual task streams
  cljax.checkpoint  Orbax stage checkpoints (the only module importing Orbax)
  cljax.runners     run(config, workdir): the experiments behind launch.py
"""

from cljax import continual
from cljax import core
from cljax import fisher
from cljax import merging
from cljax import methods
from cljax import metrics
from cljax import models
from cljax import sharding
from cljax import subspace
from cljax import training
from cljax import tree
from cljax.core import Batch
from cljax.methods.base import Method, chain

__version__ = '0.1.0'

__all__ = ['Batch', 'Method', 'chain', 'continual', 'core', 'fisher', 'merging', 'methods',
           'metrics', 'models', 'sharding', 'subspace', 'training', 'tree']
