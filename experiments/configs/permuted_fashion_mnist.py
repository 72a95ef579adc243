"""Permuted Fashion-MNIST, 10 tasks, MLP 784-100-100-10: finetune vs EWC vs joint.

Needs Debian's Fashion-MNIST (``apt-get install -y dataset-fashion-mnist``):

  python launch.py --config=experiments/configs/permuted_fashion_mnist.py \
      --workdir=runs/permuted_fashion_mnist
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.name = 'permuted_fashion_mnist'
  c.dataset = 'fashion_mnist'
  c.stream = 'permuted'
  c.num_tasks = 10
  c.model = 'mlp'
  c.model_kwargs = ml_collections.ConfigDict({'hidden': (100, 100), 'use_bias': True})
  # Adam: with plain SGD, EWC's stiff quadratic (strength * Fisher * lr > 2 on the head) diverges
  # at the strengths that protect anything (see README, "Permuted Fashion-MNIST").
  c.optimizer = 'adam'
  c.learning_rate = 1e-3
  c.momentum = 0.0
  c.epochs = 3
  c.batch_size = 64
  c.eval_batch_size = 1000
  c.methods = ('finetune', 'ewc', 'joint')
  c.ewc = ml_collections.ConfigDict({
      'strength': 100.0,
      'fisher_estimator': 'exact',
      'num_samples': 1024,
  })
  return c
