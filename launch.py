"""Runs an experiment: ``python launch.py --config=<file> --workdir=<dir>``.

With no flags it runs the embedded default (permuted sklearn digits, 5 tasks, finetune vs EWC)
into ``runs/default``. Override any config key on the command line, e.g.
``python launch.py --config=experiments/configs/default.py --config.num_tasks=3``.
"""

import os

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from cljax.runners import continual

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'experiments', 'configs', 'default.py')
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG,
                                          'Experiment config file (ml_collections).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (default: runs/<config name>).')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                               'Call jax.distributed.initialize() first (one process per host).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, where the cluster is not auto-detected.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (with --multihost).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (with --multihost).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _MULTIHOST.value:
    # Slurm, Cloud TPU and Open MPI are auto-detected; elsewhere pass the three flags.
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  name = os.path.splitext(os.path.basename(config_file))[0]
  config = _CONFIG.value
  # config.experiment picks the runner: continual training (default) or model merging.
  if config.get('experiment', 'continual') == 'merge':
    from cljax.runners import merge  # pylint: disable=g-import-not-at-top
    run = merge.run
  else:
    run = continual.run
  run(config, _WORKDIR.value or os.path.join('runs', name))


if __name__ == '__main__':
  app.run(main)
