"""`cljax-merge`: merge safetensors / Orbax checkpoints out of core from a mergekit-style YAML.

  cljax-merge merge.yml ./merged-model [--dtype bfloat16] [--max-shard-size 5GB] [--force]
  python -m cljax.merge_io.cli merge.yml ./merged-model

The config format is `cljax.merge_io.mergekit_config`'s (mergekit's common subset plus cljax's
methods); the merge is `cljax.merge_io.checkpoint_merge.merge_checkpoints`. Flags override the
config's ``dtype``, ``parameters.trim`` and ``exclude``. Exit status 0 on success, 1 when the
config, the inputs or the output folder are wrong (one line on stderr naming the problem;
``--traceback`` shows the Python stack instead), 2 for a bad command line (one line too), 130 on
Ctrl-C; in these failure cases no output folder is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator, Optional, Sequence

from cljax.merge_io import checkpoint_merge
from cljax.merge_io import mergekit_config

PROG = 'cljax-merge'


class _Parser(argparse.ArgumentParser):
  """argparse with a usage error as one line (``cljax-merge: error: ...``, exit status 2)."""

  def error(self, message):
    self.exit(2, f'{PROG}: error: {" ".join(message.splitlines())} (see {PROG} --help)\n')


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog=PROG,
      description='Merge Hugging Face safetensors or Orbax checkpoints out of core (one tensor '
                  'block at a time) with cljax.merging, from a mergekit-style YAML config, into '
                  'a Hugging Face safetensors folder.',
      epilog='Methods: ' + ', '.join(mergekit_config.METHODS) + '. See the README section '
             '"Merging checkpoints out of core" for the config keys and the differences from '
             'mergekit.')
  parser.add_argument('config', help='YAML merge config (mergekit format subset)')
  parser.add_argument('output', help='output folder to create (Hugging Face layout)')
  parser.add_argument('--dtype', choices=checkpoint_merge.OUTPUT_DTYPES,
                      help='dtype of the merged floating tensors (default: the config\'s dtype, '
                           'else each tensor keeps the base model\'s dtype)')
  parser.add_argument('--max-shard-size', default='5GB',
                      help="largest shard, e.g. '5GB', '500MB', '2GiB' (default: 5GB)")
  parser.add_argument('--force', action='store_true',
                      help='replace an existing output folder (only after the merge succeeded)')
  parser.add_argument('--seed', type=int, default=0, help='seed of DARE\'s random drops')
  parser.add_argument('--trim', choices=mergekit_config.TRIM_MODES,
                      help='TIES trim ranking (overrides parameters.trim; default per_tensor)')
  parser.add_argument('--exclude', action='append', default=None, metavar='REGEX',
                      help='tensor names (re.fullmatch) kept at the base\'s values; repeatable; '
                           'replaces the config\'s exclude')
  parser.add_argument('--block-entries', type=int,
                      default=checkpoint_merge.DEFAULT_BLOCK_ENTRIES,
                      help='most entries of a tensor merged at once (memory vs. speed; DARE\'s '
                           'masks depend on it)')
  parser.add_argument('--no-progress', action='store_true', help='hide the progress bars')
  parser.add_argument('--traceback', action='store_true',
                      help='on an error, show the Python stack instead of one line')
  return parser


class _LineFormatter(logging.Formatter):
  """``cljax-merge: LEVEL: message``, the message on one line."""

  def format(self, record):
    return f'{PROG}: {record.levelname}: ' + ' '.join(record.getMessage().splitlines())


class _StderrHandler(logging.StreamHandler):
  """A StreamHandler writing to the current ``sys.stderr`` (not the one at creation)."""

  def __init__(self):
    super().__init__(sys.stderr)

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    del value   # always the current sys.stderr


@contextlib.contextmanager
def _logging_to_stderr() -> Iterator[None]:
  """cljax's INFO lines on stderr, once, while the command runs; the loggers restored after.

  One handler on the ``cljax`` logger and no propagation to the root logger, where some imports
  (Orbax's stack) install a handler that printed every line a second time.
  """
  logger = logging.getLogger('cljax')
  saved = logger.level, logger.propagate
  handler = _StderrHandler()
  handler.setFormatter(_LineFormatter())
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  try:
    yield
  finally:
    logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def _error_line(e: BaseException) -> str:
  if isinstance(e, OSError) and e.strerror and e.filename:   # e.g. an unwritable output folder
    return f'{e.filename}: {e.strerror}'
  return ' '.join(str(e).splitlines())


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status.

  Args:
    argv: the arguments after the program name (default ``sys.argv[1:]``).

  Returns:
    0 on success, 1 on a configuration / input / output error, 130 when interrupted.
  """
  args = _parser().parse_args(argv)
  with _logging_to_stderr():
    return _run(args)


def _run(args: argparse.Namespace) -> int:
  """`main` after parsing: the merge, its one-line errors and its summary line."""
  checkpoint_merge.return_freed_blocks_to_os()
  try:
    config = mergekit_config.load_config(args.config)
    if args.trim is not None:
      if args.trim == 'global' and config.method == 'continual_ties':
        raise ValueError('--trim global: continual_ties out of core supports per_tensor only')
      config = config._replace(trim=args.trim)
    if args.exclude is not None:
      config = config._replace(exclude=tuple(args.exclude))
    with open(args.config) as f:
      text = f.read()
    summary = checkpoint_merge.merge_checkpoints(
        config, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
        force=args.force, seed=args.seed, progress=not args.no_progress,
        block_entries=args.block_entries, config_text=text)
  except (ValueError, OSError) as e:   # OSError: FileNotFoundError, FileExistsError, permissions
    if args.traceback:
      raise
    print(f'{PROG}: error: {_error_line(e)}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f'{PROG}: interrupted; no output written', file=sys.stderr)
    return 130
  print(f'{PROG}: wrote {summary.output}: {summary.num_tensors} tensors '
        f'({summary.num_merged} merged), {summary.num_parameters:,} parameters, '
        f'{summary.num_shards} shard(s), {summary.output_bytes / 1e9:.3f} GB in '
        f'{summary.seconds:.1f} s ({summary.input_bytes / 1e6 / max(summary.seconds, 1e-9):.0f} '
        f'MB/s read)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
