"""Runs an experiment: ``python launch.py --config=<file> --workdir=<dir>``.

With no flags it runs the embedded default (permuted sklearn digits, 5 tasks, finetune vs EWC)
into ``runs/default``. Override any config key on the command line, e.g.
``python launch.py --config=experiments/configs/default.py --config.num_tasks=3``; without
``--workdir`` such a run goes to ``runs/<config name>-<hash of the overrides>``, so runs of
different overrides never share a workdir.

Output: the progress bar, the INFO lines of cljax's own modules (plain, above the bar; each
method's summary) and, on stdout, ``results: <workdir>``. Orbax's and JAX's INFO lines appear
only with ``--verbosity=0`` (INFO) or ``--verbosity=1`` (and DEBUG), in absl's format. A user
error (a bad key, value, dataset or workdir) prints one line ``launch.py: error: ...`` and exits
with status 2; ``--traceback`` (or ``--verbosity=1``) shows the Python stack instead.
"""

import hashlib
import json
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tqdm

import cljax
from cljax.runners import continual

PROG = 'launch.py'
USER_ERRORS = (ValueError, OSError, FloatingPointError)   # ValueError includes WorkdirError

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'experiments', 'configs', 'default.py')


def error_line(e: BaseException) -> str:
  """One line for a user error: ml_collections' quoted KeyError text unquoted, lines joined."""
  while (isinstance(e, (KeyError, AttributeError)) and len(e.args) == 1
         and isinstance(e.args[0], BaseException)):
    e = e.args[0]   # ml_collections raises AttributeError(KeyError('...Did you mean...'))
  if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
    text = e.args[0]   # str(KeyError) would be its repr, newlines escaped
  else:
    text = str(e)
  return '; '.join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


def _wants_stack(argv) -> bool:
  """--traceback or --verbosity >= 1 anywhere in ``argv`` (read before the flags are parsed)."""
  for i, arg in enumerate(argv):
    if arg in ('--traceback', '--traceback=true', '--traceback=True'):
      return True
    match = re.fullmatch(r'--?(?:verbosity|v)(?:=(-?\d+))?', arg)
    if match:
      value = match.group(1) or (argv[i + 1] if i + 1 < len(argv) else '')
      if re.fullmatch(r'-?\d+', value) and int(value) >= 1:
        return True
  return False


def _fail(e: BaseException, prefix: str = '') -> None:
  print(f'{PROG}: error: {prefix}{error_line(e)}', file=sys.stderr)
  sys.exit(2)


_FLAG_ERRORS = (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError)
try:   # ml_collections applies the --config.KEY overrides of sys.argv here, when defining
  _CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG,
                                            'Experiment config file (ml_collections).',
                                            lock_config=True)
except _FLAG_ERRORS as _e:
  if _wants_stack(sys.argv):
    raise
  _fail(_e, 'no config key ' if isinstance(_e, (KeyError, AttributeError)) else '')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Output directory (default: runs/<config name>, or '
                               'runs/<config name>-<hash of the --config.* overrides>).')
_TRACEBACK = flags.DEFINE_bool('traceback', False,
                               'On an error, show the Python stack instead of one line.')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                               'Call jax.distributed.initialize() first (one process per host).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, where the cluster is not auto-detected.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (with --multihost).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (with --multihost).')


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag, key or value as one error line (exit status 2)."""
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    if _wants_stack(argv):
      raise
    _fail(e)


class _TqdmHandler(std_logging.Handler):
  """Writes log records above the progress bar instead of through it."""

  def emit(self, record):
    try:
      tqdm.tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


_CLJAX_DIR = os.path.dirname(os.path.abspath(cljax.__file__))


def _from_cljax(record: std_logging.LogRecord) -> bool:
  return os.path.abspath(record.pathname).startswith(_CLJAX_DIR + os.sep)


class _BelowWarningFilter(std_logging.Filter):
  """Drops INFO / DEBUG records (Orbax's, JAX's and absl's chatter); keeps warnings and errors."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING


class _CljaxInfoFilter(std_logging.Filter):
  """Keeps the INFO records that cljax's own modules log through absl."""

  def filter(self, record):
    return record.levelno < std_logging.WARNING and _from_cljax(record)


def configure_logging() -> None:
  """cljax's progress lines always (plain, above the bar); Orbax's and JAX's INFO lines only
  with --verbosity (then everything in absl's format, as absl prints it)."""
  if flags.FLAGS['verbosity'].present:
    return
  plain = std_logging.Formatter('%(message)s')
  logging.get_absl_handler().addFilter(_BelowWarningFilter())   # absl's handler is the root's
  cljax_absl = _TqdmHandler()
  cljax_absl.addFilter(_CljaxInfoFilter())
  cljax_absl.setFormatter(plain)
  logging.get_absl_logger().addHandler(cljax_absl)   # cljax modules calling absl.logging.info
  logger = std_logging.getLogger('cljax')             # cljax modules using standard logging
  handler = _TqdmHandler()
  handler.setFormatter(plain)
  handler.addFilter(_CljaxInfoFilter())
  logger.addHandler(handler)
  logger.setLevel(std_logging.INFO)


def default_workdir(config_name: str, overrides: dict) -> str:
  """``runs/<config name>``, or ``runs/<config name>-<8 hex digits>`` hashing the overrides.

  Args:
    config_name: the config file's name without ``.py``.
    overrides: the ``--config.KEY=VALUE`` overrides, ``{key: value}`` (any order).
  """
  if not overrides:
    return os.path.join('runs', config_name)
  text = json.dumps({k: overrides[k] for k in sorted(overrides)}, sort_keys=True, default=repr)
  return os.path.join('runs', f'{config_name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}')


def main(argv):
  if len(argv) > 1:
    _fail(ValueError(f'unexpected arguments: {" ".join(argv[1:])} (flags look like --name=value)'))
  configure_logging()
  show_stack = _TRACEBACK.value or flags.FLAGS.verbosity >= 1
  try:
    if _MULTIHOST.value:
      # Slurm, Cloud TPU and Open MPI are auto-detected; elsewhere pass the three flags.
      jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                 num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    config_file = config_flags.get_config_filename(flags.FLAGS['config'])
    name = os.path.splitext(os.path.basename(config_file))[0]
    config = _CONFIG.value
    overrides = config_flags.get_override_values(flags.FLAGS['config'])
    workdir = _WORKDIR.value or default_workdir(name, overrides)
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
      raise ValueError(f'--workdir {workdir!r} is a file, not a folder; pass a folder path')
    # config.experiment picks the runner: continual training (default) or model merging.
    if config.get('experiment', 'continual') == 'merge':
      from cljax.runners import merge  # pylint: disable=g-import-not-at-top
      run = merge.run
    else:
      run = continual.run
    run(config, workdir)   # the runner logs each method's summary line
  except USER_ERRORS as e:
    if show_stack:
      raise
    _fail(e)
  except KeyboardInterrupt:
    print(f'{PROG}: interrupted; completed stages are kept in the workdir', file=sys.stderr)
    sys.exit(130)
  if jax.process_index() == 0:
    print(f'results: {workdir}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
