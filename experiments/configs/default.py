"""The embedded default: permuted sklearn digits, 5 tasks, finetune vs EWC.

Runs on any machine with the pip requirements alone (the digits ship with scikit-learn):

  python launch.py --config=experiments/configs/default.py --workdir=runs/default

This file is also the reference for every config key; other configs start from it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'default'
  # Data: 'digits' | 'fashion_mnist' | 'tfds:<name>'; data_dir '' = the source's default.
  c.dataset = 'digits'
  c.data_dir = ''
  c.download = False  # TFDS only: download and prepare a missing dataset (needs network).
  c.max_train = 0  # 0 = all examples; else a deterministic subset per split.
  c.max_test = 0
  # Stream: 'permuted' | 'rotated' | 'split'; scenario '' = the stream's default
  # ('domain' for permuted/rotated, 'class' for split; 'task' gives each task its own head).
  c.stream = 'permuted'
  c.scenario = ''
  c.stream_kwargs = ml_collections.ConfigDict()
  c.num_tasks = 5
  c.seed = 0
  # Model: 'mlp' | 'cnn'; model_kwargs are the module's attributes.
  c.model = 'mlp'
  c.model_kwargs = ml_collections.ConfigDict({'hidden': (100, 100), 'use_bias': True})
  # Optimisation (a fresh optimizer state at every task).
  c.optimizer = 'sgd'
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.epochs = 10
  c.batch_size = 32
  c.eval_batch_size = 512
  # Devices: a (data, model) mesh over num_devices (0 = all, over all hosts). Parameters are
  # replicated unless a sharding rule (regex over 'layer/param' paths, spec per dimension with
  # None | 'data' | 'model') splits them, e.g. (('dense0/kernel', (None, 'model')),).
  c.num_devices = 0
  c.model_axis = 1
  c.sharding_rules = ()
  # Methods, each run on the same stream; per-method hyperparameters under the method's name.
  c.methods = ('finetune', 'ewc')
  c.ewc = ml_collections.ConfigDict({
      'strength': 30.0,
      'fisher_estimator': 'exact',
      'num_samples': 1024,
  })
  return c
