"""Shared fixtures: small real-data configs that run in seconds on a 2-core CPU."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `experiments.configs` is importable as in `python launch.py`.
  sys.path.insert(0, ROOT)


@pytest.fixture
def tiny_config():
  """The default config (permuted digits) cut to 3 tasks, 2 epochs, a 600-example subset."""
  from experiments.configs import default
  config = default.get_config()
  config.num_tasks = 3
  config.epochs = 2
  config.max_train = 600
  config.max_test = 300
  config.batch_size = 30
  config.eval_batch_size = 100
  config.ewc.num_samples = 64
  return config
