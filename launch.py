"""Runs a continual-learning experiment: ``python launch.py --config=<file> --workdir=<dir>``.

With no flags it runs the embedded default (permuted sklearn digits, 5 tasks, finetune vs EWC)
into ``runs/default``. Override any config key on the command line, e.g.
``python launch.py --config=experiments/configs/default.py --config.num_tasks=3``.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from cljax import experiment

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'experiments', 'configs', 'default.py')
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG,
                                          'Experiment config file (ml_collections).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (default: runs/<config name>).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  name = os.path.splitext(os.path.basename(config_file))[0]
  experiment.run(_CONFIG.value, _WORKDIR.value or os.path.join('runs', name))


if __name__ == '__main__':
  app.run(main)
