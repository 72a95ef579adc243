"""Model merging on Fashion-MNIST: 8 experts from one base, every static and continual merge.

Needs Debian's Fashion-MNIST (``apt-get install -y dataset-fashion-mnist``):

  python launch.py --config=experiments/configs/merge_fashion_mnist.py \
      --workdir=runs/merge_fashion_mnist

Protocol (see `cljax.runners.merge`): an MLP 784-256-256-10 base is pretrained on 30,000 of the
60,000 training images (all 10 classes, upright). The other 30,000 feed 8 tasks with their own
heads: 2 class groups (split, 5 classes each), 4 rotations (0, 90, 180, 270 degrees) and 2 pixel
permutations. Per task: 256 held-out labeled training examples (Frank-Wolfe's proxy loss),
``max_train`` = 10,000 training examples (subsampled so that the whole run stays feasible on 2
CPU cores; the split tasks have 15,000), and the full test set of the task (10,000 images; 5,000
for a split task). Per task a linear probe on the frozen base (zero-shot reference; Adam 1e-2,
3 epochs), then an expert fine-tuned from it (LP-FT; every weight, Adam 1e-4, 10 epochs: a small
learning rate keeps the experts near the base, where task vectors add up, as in Ilharco et al.'s
fine-tuning of CLIP at 1e-5); the backbones are merged with every method (heads excluded), each
task evaluated with its own head; continual merges in 10 random orders. The base: Adam 1e-3,
5 epochs, batch 64 throughout. About 10 minutes on 2 CPU cores.

Merge hyperparameters are those of merge_digits.py (the papers' defaults; stated there).
"""

import ml_collections

from experiments.configs import merge_digits


def get_config() -> ml_collections.ConfigDict:
  c = merge_digits.get_config()
  c.name = 'merge_fashion_mnist'
  c.dataset = 'fashion_mnist'
  c.num_pretrain = 30000
  c.task_streams = (('split', 2), ('rotated', 4), ('permuted', 2))
  c.stream_kwargs = ml_collections.ConfigDict({'rotated': {'max_degrees': 360.0}})
  c.num_heldout = 256
  c.max_train = 10000
  c.max_test = 0
  c.model = 'mlp'
  c.model_kwargs = ml_collections.ConfigDict({'hidden': (256, 256), 'use_bias': True})
  c.pretrain = ml_collections.ConfigDict(
      {'optimizer': 'adam', 'learning_rate': 1e-3, 'momentum': 0.0, 'epochs': 5})
  c.probe = ml_collections.ConfigDict(
      {'optimizer': 'adam', 'learning_rate': 1e-2, 'momentum': 0.0, 'epochs': 3})
  c.finetune = ml_collections.ConfigDict(
      {'optimizer': 'adam', 'learning_rate': 1e-4, 'momentum': 0.0, 'epochs': 10})
  c.batch_size = 64
  c.eval_batch_size = 1000
  c.num_orders = 10
  return c
