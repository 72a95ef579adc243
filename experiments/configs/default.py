"""The embedded default: permuted sklearn digits, 5 tasks, finetune vs EWC.

Runs on any machine with the pip requirements alone (the digits ship with scikit-learn):

  python launch.py --config=experiments/configs/default.py --workdir=runs/default

This file is also the reference for every config key; other configs start from it. Every
registered method has a block (`method_blocks`), so any method runs with stable defaults here:

  python launch.py --config.methods="('finetune','l2','ewc','online_ewc','si','mas','lwf','replay')"
"""

import ml_collections
from ml_collections import config_dict


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
  # Starting point (`cljax.runners.pretrain`): '' = `model` from `seed`; else a local Hugging Face
  # folder (`cljax.models.from_pretrained`; `model`/`model_kwargs` unused).
  c.init_from = ''
  # Or a pretraining stage on text domains before a text stream (written once to
  # <workdir>/pretrained/ as a Hugging Face folder); batch_size 0 = `batch_size`.
  c.pretrain = ml_collections.ConfigDict(dict(
      domains=(), epochs=1, max_tokens=1 << 16, optimizer='adam', learning_rate=1e-3,
      batch_size=0))
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
  c.update(method_blocks())
  return c


def method_blocks() -> dict[str, ml_collections.ConfigDict]:
  """One block per method of `cljax.methods.REGISTRY`: every keyword argument of its constructor.

  replay's ``input_shape`` is left out (the experiment fills it in from the stream). Values are
  the constructor's defaults unless a comment gives the measured reason for another; numbers are
  on this file's stream (5 permuted-digits tasks, 10 epochs, SGD 0.05 / momentum 0.9), seeds
  0 / 1 / 2 (a lone number: seed 0), forgetting as in `cljax.metrics` (Chaudhry et al. 2018),
  in points; finetune forgets 82.8 / 76.3 / 80.7 there. With SGD and momentum m a quadratic
  penalty of curvature k diverges once lr * k > 2 (1 + m) = 3.8: the largest importance (summed
  over tasks, read off each run's stage checkpoints) bounds the strength of ewc, online_ewc, si
  and mas.

  Set on the command line, e.g. ``--config.mas.strength=0.03``; gpm's ``representation_fn`` (a
  Python callable) only in a config file. A chain such as ``--config.methods="('ewc+refresh',)"``
  builds each member from its own block.
  """
  cd = ml_collections.ConfigDict
  return {
      # No hyperparameters: the lower bound, forgets 82.8/76.3/80.7.
      'finetune': cd(),
      # No hyperparameters: trains on every task seen so far, forgets 0.2.
      'joint': cd(),
      # 0.03: forgets 37.8/37.9/47.4, costs 3-5 points of new-task accuracy (0.1: 10-12, 1: 53).
      'l2': cd({'strength': 0.03, 'param_regex': '.*'}),
      # 30: forgets 15.3/16.5/30.1; the summed Fisher reaches 0.26-0.43, lr * 30 * F <= 0.65.
      'ewc': cd({'strength': 30.0, 'fisher_estimator': 'exact', 'num_samples': 1024,
                 'fisher_batch_size': 32, 'seed': 0}),
      # ewc's 30, gamma 0.9: forgets 13.2/14.5/21.3 (seed 0: gamma 1 21.9; 100, gamma 1 34.9).
      'online_ewc': cd({'strength': 30.0, 'gamma': 0.9, 'fisher_estimator': 'exact',
                        'num_samples': 1024, 'fisher_batch_size': 32, 'seed': 0}),
      # c = 1: forgets 20.9/23.3/37.4 (0.1: 26.6/41.6/32.0); Omega <= 5.2, lr * 2c * Omega <= 0.52.
      'si': cd({'strength': 1.0, 'damping': 0.1}),
      # 0.01: forgets 11.3/21.7/25.9; Omega hits 47 in 2 tasks: at 1 lr*2*47 = 4.7, NaN in task 3.
      'mas': cd({'strength': 0.01, 'num_samples': 1024, 'batch_size': 32, 'seed': 0}),
      # Li & Hoiem's lambda_o = 1, T = 2: forgets 59.9/62.8/68.9 (distilling on a new permutation).
      'lwf': cd({'strength': 1.0, 'temperature': 2.0, 'num_outputs': 0}),
      # 1000 examples in all (~200 per task after 5), 32 per step: forgets 2.8/3.8/3.1.
      'replay': cd({'buffer_size': 1000, 'num_outputs': 0, 'replay_batch_size': 32,
                    'strength': 1.0, 'seed': 0}),
      # Alone (around finetune) at the reference code's rates: forgets 80.7; chain it after
      # another method for refresh learning around that method ('ewc+refresh').
      'refresh': cd({'unlearn_rate': 1e-5,
                     'noise': 0.0, 'fisher_weight': 0.001, 'normalize': True,
                     'fisher_decay': 0.0, 'fisher_estimator': 'empirical', 'num_samples': 1024,
                     'fisher_batch_size': 32, 'seed': 0}),
      # Saha et al.'s CIFAR threshold 0.97 and 125 examples: forgets 10.5, ACC 88.0.
      'gpm': cd({'threshold': 0.97, 'threshold_increment': 0.0, 'layers': '.*kernel',
                 'num_samples': 125, 'max_rank': 0, 'freeze_others': True,
                 'representation_fn': None, 'projection': config_dict.placeholder(str),
                 'seed': 0}),
      # 10% of each kernel's rank frozen per task: forgets 49.4, new tasks at 95.6-97.2%.
      'osft': cd({'rank_fraction': 0.1, 'max_rank_fraction': 1.0, 'layers': '.*kernel'}),
      # Rank-8 steps, 16-row sketch refreshed every 50 steps, threshold 0.97: forgets 34.2.
      'coso': cd({'proj_rank': 8, 'sketch_rank': 16, 'update_gap': 50, 'threshold': 0.97,
                  'layers': '.*kernel'}),
  }
